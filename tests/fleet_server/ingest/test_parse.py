"""Parsing telemetry messages: each kind of bad input rejected by name, nothing good lost."""

from __future__ import annotations

import json
from typing import Any

import pytest

from device_agent.protocol import LATENCY_BUCKETS_MS, telemetry_topic
from fleet_server.ingest import (
    MalformedTelemetryError,
    NotTelemetryTopicError,
    SpoofedDeviceError,
    parse_message,
)


def summary_body(
    name: str = "m",
    version: int = 7,
    count: int = 1000,
    errors: int = 2,
    psi: float | None = 0.05,
    preds: list[int] | None = None,
    shadow: dict[str, Any] | None = None,
) -> dict[str, Any]:
    hist = [0] * (len(LATENCY_BUCKETS_MS) + 1)
    hist[8] = count - errors  # 2..5 ms
    return {
        "window_start": 0.0,
        "window_end": 60.0,
        "name": name,
        "version": version,
        "slot": "a",
        "rollout_id": "r-1",
        "count": count,
        "errors": errors,
        "latency_ms": {"p50": 3.0, "p95": 4.8, "p99": 4.9, "mean": 3.1},
        "latency_hist": hist,
        "drift": None
        if psi is None
        else {
            "features": [{"name": "f0", "psi": psi, "ks": 0.1, "counts": [250, 250, 250, 250]}],
            "psi_max": psi,
            "ks_max": 0.1,
            "prediction": {"counts": preds or [500, 300, 200], "psi": 0.01},
        },
        "shadow": shadow,
        "dropped": {"samples": 0, "summaries": 0},
    }


def install_body(outcome: str = "installed", version: int = 7) -> dict[str, Any]:
    return {
        "type": "install",
        "outcome": outcome,
        "name": "m",
        "version": version,
        "bundle_id": "b-1",
        "error_code": None if outcome == "installed" else "smoke",
        "message": "",
        "state": "done",
        "ts": 5.0,
        "rollout_id": "r-1",
        "shadow": False,
    }


def payload(device_id: str, records: list[tuple[int, str, dict[str, Any]]]) -> bytes:
    return json.dumps(
        {
            "device_id": device_id,
            "records": [
                {"seq": seq, "kind": kind, "ts": 1.0 + seq, "body": body}
                for seq, kind, body in records
            ],
        }
    ).encode()


TOPIC = telemetry_topic("dev-a", "summary")


def test_summary_event_and_sample_records_become_rows() -> None:
    p = payload(
        "dev-a",
        [
            (1, "summary", summary_body()),
            (2, "events", install_body()),
            (
                3,
                "samples",
                {"name": "m", "version": 7, "predicted": 2, "inputs": {}, "outputs": {}},
            ),
        ],
    )
    m = parse_message(TOPIC, p, 100.0)
    assert (m.device_id, m.records, m.bad_records) == ("dev-a", 3, 0)
    s = m.rows["summary"][0]
    assert (s["seq"], s["name"], s["version"], s["count"], s["errors"]) == (1, "m", 7, 1000, 2)
    # JSON columns come out as JSON text, ready for the writer
    assert json.loads(s["feature_counts"]) == {"f0": [250, 250, 250, 250]}
    assert json.loads(s["prediction_counts"]) == [500, 300, 200]
    assert sum(json.loads(s["latency_hist"])) == 998 and s["drift_psi_max"] == 0.05
    assert s["p95_ms"] == 4.8 and s["received_at"] == 100.0
    assert m.rows["events"][0]["outcome"] == "installed"
    assert m.rows["samples"][0]["predicted"] == "2"


def test_shadow_section_is_kept() -> None:
    body = summary_body(
        shadow={
            "name": "m",
            "version": 8,
            "count": 900,
            "errors": 9,
            "agreement": 0.97,
            "latency_ms": {"p95": 6.0},
        }
    )
    s = parse_message(TOPIC, payload("dev-a", [(1, "summary", body)]), 1.0).rows["summary"][0]
    assert (s["shadow_version"], s["shadow_count"], s["shadow_errors"]) == (8, 900, 9)
    assert s["shadow_agreement"] == 0.97 and s["shadow_p95_ms"] == 6.0


def test_payload_claiming_another_device_is_rejected_as_spoofed() -> None:
    with pytest.raises(SpoofedDeviceError, match="dev-b"):
        parse_message(TOPIC, payload("dev-b", [(1, "summary", summary_body())]), 1.0)


@pytest.mark.parametrize(
    "topic",
    [
        "edgefleet/v1/devices/dev-a/status",
        "other/v1/devices/dev-a/telemetry/summary",
        "edgefleet/v1/devices/dev-a/notify",
        "edgefleet/v1/devices",
    ],
)
def test_non_telemetry_topic_is_rejected(topic: str) -> None:
    with pytest.raises(NotTelemetryTopicError):
        parse_message(topic, payload("dev-a", []), 1.0)


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b"\xff\xfe",
        b"[]",
        b'{"device_id": "dev-a"}',
        b'{"device_id": "dev-a", "records": {}}',
    ],
)
def test_malformed_payload_is_rejected(raw: bytes) -> None:
    with pytest.raises(MalformedTelemetryError):
        parse_message(TOPIC, raw, 1.0)


@pytest.mark.parametrize(
    "bad",
    [
        {"seq": -1, "kind": "summary", "ts": 1.0},
        {"seq": True, "kind": "summary", "ts": 1.0},
        {"seq": 2**63, "kind": "summary", "ts": 1.0},
        {"seq": "7", "kind": "summary", "ts": 1.0},
        {"seq": 7, "kind": "bogus", "ts": 1.0},
        {"seq": 7, "kind": "summary", "ts": "yesterday"},
        {"seq": 7, "kind": "summary", "ts": 1.0, "body": "text"},
        {"seq": 7, "kind": "summary", "ts": 1.0, "body": {"name": "m"}},  # no version/count
        {"seq": 7, "kind": "events", "ts": 1.0, "body": {"outcome": "installed"}},  # no type
    ],
)
def test_bad_record_is_dropped_and_counted_without_losing_its_neighbours(
    bad: dict[str, Any],
) -> None:
    bad.setdefault("body", summary_body())
    good = {"seq": 1, "kind": "summary", "ts": 1.0, "body": summary_body()}
    raw = json.dumps({"device_id": "dev-a", "records": [good, bad]}).encode()
    m = parse_message(TOPIC, raw, 1.0)
    assert (m.records, m.bad_records, len(m.rows["summary"])) == (2, 1, 1)


@pytest.mark.parametrize("hist", [[1, True], [1.5, 2], ["3"], [[1]], "1,2", {"a": 1}])
def test_summary_whose_histogram_is_not_a_list_of_integers_is_rejected(hist: Any) -> None:
    body = summary_body()
    body["latency_hist"] = hist
    m = parse_message(TOPIC, payload("dev-a", [(1, "summary", body)]), 1.0)
    assert m.rows["summary"] == [] and m.rejected == {"bad_type": 1}


def test_singular_kind_aliases_are_accepted() -> None:
    m = parse_message(TOPIC, payload("dev-a", [(1, "event", install_body())]), 1.0)
    assert len(m.rows["events"]) == 1


def test_fast_and_standard_codecs_produce_the_same_rows() -> None:
    from fleet_server.ingest.jsoncodec import FAST, STDLIB

    assert FAST is not None, "orjson is in the server extra; install it"
    body = summary_body(
        shadow={
            "name": "m",
            "version": 8,
            "count": 9,
            "errors": 0,
            "agreement": 1.0,
            "latency_ms": {"p95": 1.0},
        }
    )
    raw = payload(
        "dev-a",
        [
            (1, "summary", body),
            (2, "events", install_body()),
            (3, "samples", {"name": "m", "version": 7, "predicted": "cat"}),
        ],
    )
    a, b = (parse_message(TOPIC, raw, 5.0, codec=c) for c in (FAST, STDLIB))
    for kind in a.rows:
        for ra, rb in zip(a.rows[kind], b.rows[kind], strict=True):
            assert ra.keys() == rb.keys()
            for k in ra:
                same = (
                    json.loads(ra[k]) == json.loads(rb[k])
                    if isinstance(ra[k], str) and ra[k][:1] in ("[", "{")
                    else ra[k] == rb[k]
                )
                assert same, (kind, k, ra[k], rb[k])


def test_integer_beyond_64_bits_in_a_body_does_not_lose_the_message() -> None:
    big = {"seq": 2, "kind": "events", "ts": 1.0, "body": {**install_body(), "n": 2**70}}
    good = {"seq": 1, "kind": "summary", "ts": 1.0, "body": summary_body()}
    raw = json.dumps({"device_id": "dev-a", "records": [good, big]}).encode()
    m = parse_message(TOPIC, raw, 1.0)
    assert m.records == 2 and len(m.rows["summary"]) == 1
    assert m.bad_records + len(m.rows["events"]) == 1
