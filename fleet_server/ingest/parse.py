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

Checks 2 to 4 are one pass of :func:`.contract.validate_message` over the bytes, and the
rows are built from the objects it validated: a summary message (the bulk of the
traffic) is decoded once. Event and sample rows also keep the record's whole body as the
device sent it, unknown fields included (the contract carries those along without typing
them), so a message holding such records is decoded a second time, into plain JSON, for
those bodies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from device_agent.protocol import (
    EventBody,
    EventRecord,
    LabelSummary,
    SampleBody,
    SummaryBody,
    SummaryRecord,
    parse_device_topic,
)
from fleet_server.ingest.contract import validate_message
from fleet_server.ingest.errors import NotTelemetryTopicError
from fleet_server.ingest.jsoncodec import DEFAULT, Codec

#: characters of an event's message kept in its column (the whole text stays in its body)
MAX_EVENT_MESSAGE = 2000


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
    checked = validate_message(payload, device_id)
    out = ParsedMessage(device_id)
    out.records = len(checked.records)
    for reason in checked.rejected.values():
        out.reject(reason)
    dumps = codec.dumps
    raw_records: list[Any] | None = None
    for index, rec in enumerate(checked.records):
        if rec is None:
            continue
        if isinstance(rec, SummaryRecord):
            kind, row = "summary", _summary(rec.body, dumps)
        else:
            if raw_records is None:
                raw_records = _raw_records(payload, codec)
            try:
                body = dumps(raw_records[index]["body"])
            except (ValueError, LookupError, TypeError):  # a body the codec cannot store
                out.reject("invalid")
                continue
            if isinstance(rec, EventRecord):
                kind, row = "events", _event(rec.body, body)
            else:
                kind, row = "samples", _sample(rec.body, body)
        row["device_id"] = device_id
        row["seq"] = rec.seq
        row["ts"] = rec.ts
        row["received_at"] = received_at
        out.rows[kind].append(row)
    return out


def _raw_records(payload: bytes, codec: Codec) -> list[Any]:
    """The records as plain JSON, for the bodies of event and sample rows; an empty list
    (every such record then rejected as ``invalid``) if the codec cannot decode them."""
    try:
        records = codec.loads(payload)["records"]
    except (ValueError, LookupError, TypeError):
        return []
    return records if isinstance(records, list) else []


def _summary(b: SummaryBody, dumps: Any) -> dict[str, Any]:
    lat, drift, sh, pv = b.latency_ms, b.drift, b.shadow, b.previous
    psi_max = features = pred = None
    if drift is not None:
        psi_max = drift.psi_max
        features = dumps({f.name: f.counts for f in drift.features})
        if drift.prediction is not None:
            pred = dumps(drift.prediction.counts)
    lb = b.labels
    return {
        "window_start": b.window_start,
        "window_end": b.window_end,
        "name": b.name,
        "version": b.version,
        "slot": b.slot,
        "rollout_id": b.rollout_id,
        "count": b.count,
        "errors": b.errors,
        "latency_hist": None if b.latency_hist is None else dumps(b.latency_hist),
        "p95_ms": None if lat is None else lat.p95,
        "drift_psi_max": psi_max,
        "feature_counts": features,
        "prediction_counts": pred,
        "shadow_name": None if sh is None else sh.name,
        "shadow_version": None if sh is None else sh.version,
        "shadow_count": None if sh is None else sh.count,
        "shadow_errors": None if sh is None else sh.errors,
        "shadow_agreement": None if sh is None else sh.agreement,
        "shadow_p95_ms": None if sh is None or sh.latency_ms is None else sh.latency_ms.p95,
        "dropped": None if b.dropped is None else dumps(b.dropped),
        "labels_count": None if lb is None else lb.count,
        "labels_correct": None if lb is None else lb.correct,
        "labels": None if lb is None else dumps(_labels(lb)),
        "previous_version": None if pv is None else pv.version,
        "previous_count": None if pv is None else pv.count,
        "previous_errors": None if pv is None else pv.errors,
        "previous_agreement": None if pv is None else pv.agreement,
    }


def _labels(lb: LabelSummary) -> dict[str, Any]:
    out: dict[str, Any] = {
        "count": lb.count,
        "correct": lb.correct,
        "labelled": lb.labelled,
        "correct_by_class": lb.correct_by_class,
    }
    if lb.confusion is not None:
        out["confusion"] = lb.confusion
    return out


def _event(b: EventBody, body: str) -> dict[str, Any]:
    return {
        "type": b.type,
        "outcome": b.outcome,
        "name": b.name,
        "version": b.version,
        "bundle_id": b.bundle_id,
        "rollout_id": b.rollout_id,
        "shadow": b.shadow,
        "error_code": b.error_code,
        "message": None if b.message is None else b.message[:MAX_EVENT_MESSAGE],
        "body": body,
    }


def _sample(b: SampleBody, body: str) -> dict[str, Any]:
    return {
        "name": b.name,
        "version": b.version,
        "predicted": None if b.predicted is None else str(b.predicted)[:100],
        "body": body,
    }
