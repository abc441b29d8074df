"""Turn one telemetry MQTT message into table rows. Pure: bytes in, rows out.

Checks, in order:

1. the topic is ``edgefleet/v1/devices/{id}/telemetry/{kind}``
   (:class:`NotTelemetryTopicError`);
2. the payload is a JSON object with ``device_id`` and a ``records`` list
   (:class:`MalformedTelemetryError`);
3. the payload's ``device_id`` equals the topic's (:class:`SpoofedDeviceError`):
   the broker ACL lets a device publish only under its own id, and this is the
   second check of the same rule, so a misconfigured broker cannot let one device
   write another's telemetry;
4. every record holds to the wire contract (:mod:`.contract`: the dataclasses of
   :mod:`device_agent.protocol`, checked strictly -- non-negative counts, errors <=
   count, histogram total = count - errors, finite numbers, bounded sizes); a record
   that does not is dropped and counted by reason (``rejected``) without losing the
   good records beside it, so it never reaches a rollout gate.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from device_agent.protocol import MAX_MESSAGE_BYTES, parse_device_topic
from fleet_server.ingest.contract import check_message
from fleet_server.ingest.errors import (
    MalformedTelemetryError,
    NotTelemetryTopicError,
    SpoofedDeviceError,
)
from fleet_server.ingest.jsoncodec import DEFAULT, Codec

KIND_ALIASES: Mapping[str, str] = {
    "summary": "summary",
    "summaries": "summary",
    "sample": "samples",
    "samples": "samples",
    "event": "events",
    "events": "events",
}
MAX_NAME = 200


@dataclass
class ParsedMessage:
    """Rows for each table from one message, plus what was dropped.

    Values of JSON columns are JSON text already (the writer stores them as is).
    """

    device_id: str
    rows: dict[str, list[dict[str, Any]]] = field(
        default_factory=lambda: {"summary": [], "samples": [], "events": []}
    )
    records: int = 0
    bad_records: int = 0
    #: rejected records by reason (see :data:`fleet_server.ingest.contract.RECORD_REASONS`)
    rejected: dict[str, int] = field(default_factory=dict)

    def reject(self, reason: str) -> None:
        self.bad_records += 1
        self.rejected[reason] = self.rejected.get(reason, 0) + 1


def topic_device(topic: str) -> str:
    """The device id of a telemetry topic; :class:`NotTelemetryTopicError` otherwise."""
    try:
        device_id, channel, kind = parse_device_topic(topic)
    except ValueError as e:
        raise NotTelemetryTopicError(str(e)) from e
    if channel != "telemetry" or kind is None or not device_id:
        raise NotTelemetryTopicError(f"not a telemetry topic: {topic!r}")
    return device_id


def parse_message(
    topic: str, payload: bytes, received_at: float, codec: Codec = DEFAULT
) -> ParsedMessage:
    """Parse and check one message (see the module docstring for the order of checks)."""
    device_id = topic_device(topic)
    if len(payload) > MAX_MESSAGE_BYTES:  # before decoding anything
        raise MalformedTelemetryError(
            f"message from {device_id} is {len(payload)} bytes, above {MAX_MESSAGE_BYTES}"
        )
    try:
        obj = codec.loads(payload)
    except (UnicodeDecodeError, ValueError) as e:
        raise MalformedTelemetryError(f"payload from {device_id} is not JSON: {e}") from e
    if not isinstance(obj, dict) or not isinstance(obj.get("records"), list):
        raise MalformedTelemetryError(
            f"payload from {device_id} is not {{'device_id': ..., 'records': [...]}}"
        )
    claimed = obj.get("device_id")
    if claimed != device_id:
        raise SpoofedDeviceError(
            f"payload claims device {claimed!r} but was published under {device_id!r}; "
            "check the broker ACL (a device may publish only under its own id)"
        )
    reasons = check_message(payload, device_id)
    out = ParsedMessage(device_id)
    for index, rec in enumerate(obj["records"]):
        out.records += 1
        if index in reasons:
            out.reject(reasons[index])
            continue
        try:
            row = _record_row(device_id, rec, received_at, codec)
        except ValueError:  # a body the codec cannot re-encode
            row = None
        if row is None:
            out.reject("invalid")
        else:
            out.rows[row[0]].append(row[1])
    return out


def _num(x: Any) -> float | None:
    if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x):
        return float(x)
    return None


def _int(x: Any) -> int | None:
    return x if isinstance(x, int) and not isinstance(x, bool) else None


def _str(x: Any, limit: int = MAX_NAME) -> str | None:
    return x[:limit] if isinstance(x, str) else None


def _dict(x: Any) -> dict[str, Any]:
    return x if isinstance(x, dict) else {}


def _record_row(
    device_id: str, rec: Any, received_at: float, codec: Codec
) -> tuple[str, dict[str, Any]] | None:
    if not isinstance(rec, dict):
        return None
    seq, ts, body = _int(rec.get("seq")), _num(rec.get("ts")), rec.get("body")
    raw_kind = rec.get("kind")
    kind = KIND_ALIASES.get(raw_kind) if isinstance(raw_kind, str) else None
    if (
        seq is None
        or seq < 0
        or seq >= 2**63
        or ts is None
        or kind is None
        or not isinstance(body, dict)
    ):
        return None
    base = {"device_id": device_id, "seq": seq, "ts": ts, "received_at": received_at}
    if kind == "summary":
        row = _summary(body, codec)
    elif kind == "events":
        row = _event(body, codec)
    else:
        row = {
            "name": _str(body.get("name")),
            "version": _int(body.get("version")),
            "predicted": None
            if body.get("predicted") is None
            else str(body.get("predicted"))[:100],
            "body": codec.dumps(body),
        }
    if row is None:
        return None
    row.update(base)
    return kind, row


def _summary(b: dict[str, Any], codec: Codec) -> dict[str, Any] | None:
    name, version = _str(b.get("name")), _int(b.get("version"))
    count, errors = _int(b.get("count")), _int(b.get("errors"))
    if name is None or version is None or count is None or errors is None:
        return None
    lat = _dict(b.get("latency_ms"))
    drift = b.get("drift") if isinstance(b.get("drift"), dict) else None
    features: str | None = None
    pred: str | None = None
    psi_max = None
    if drift is not None:
        psi_max = _num(drift.get("psi_max"))
        feats = drift.get("features")
        if isinstance(feats, list):
            parts = []
            for f in feats:
                if isinstance(f, dict) and isinstance(f.get("name"), str):
                    counts = codec.int_list(f.get("counts"))
                    if counts is not None:
                        parts.append(f"{codec.dumps(f['name'])}: {counts}")
            features = "{" + ", ".join(parts) + "}"
        p = drift.get("prediction")
        if isinstance(p, dict):
            pred = codec.int_list(p.get("counts"))
    sh = _dict(b.get("shadow"))
    sh_lat = _dict(sh.get("latency_ms"))
    dropped = b.get("dropped")
    lb = _dict(b.get("labels"))
    pv = _dict(b.get("previous"))
    return {
        "window_start": _num(b.get("window_start")),
        "window_end": _num(b.get("window_end")),
        "name": name,
        "version": version,
        "slot": _str(b.get("slot"), 8),
        "rollout_id": _str(b.get("rollout_id"), 40),
        "count": count,
        "errors": errors,
        "latency_hist": codec.int_list(b.get("latency_hist")),
        "p95_ms": _num(lat.get("p95")),
        "drift_psi_max": psi_max,
        "feature_counts": features,
        "prediction_counts": pred,
        "shadow_name": _str(sh.get("name")) if sh else None,
        "shadow_version": _int(sh.get("version")) if sh else None,
        "shadow_count": _int(sh.get("count")) if sh else None,
        "shadow_errors": _int(sh.get("errors")) if sh else None,
        "shadow_agreement": _num(sh.get("agreement")) if sh else None,
        "shadow_p95_ms": _num(sh_lat.get("p95")),
        "dropped": codec.dumps(dropped) if isinstance(dropped, dict) else None,
        "labels_count": _int(lb.get("count")) if lb else None,
        "labels_correct": _int(lb.get("correct")) if lb else None,
        "labels": codec.dumps(lb) if lb else None,
        "previous_version": _int(pv.get("version")) if pv else None,
        "previous_count": _int(pv.get("count")) if pv else None,
        "previous_errors": _int(pv.get("errors")) if pv else None,
        "previous_agreement": _num(pv.get("agreement")) if pv else None,
    }


def _event(b: dict[str, Any], codec: Codec) -> dict[str, Any] | None:
    etype = _str(b.get("type"), 40)
    if etype is None:
        return None
    shadow = b.get("shadow")
    return {
        "type": etype,
        "outcome": _str(b.get("outcome"), 40),
        "name": _str(b.get("name")),
        "version": _int(b.get("version")),
        "bundle_id": _str(b.get("bundle_id"), 40),
        "rollout_id": _str(b.get("rollout_id"), 40),
        "shadow": shadow if isinstance(shadow, bool) else None,
        "error_code": _str(b.get("error_code"), 100),
        "message": _str(b.get("message"), 2000),
        "body": codec.dumps(b),
    }
