"""Poisoned telemetry against the wire contract: rejected by reason, counted per device,
never stored (so never seen by a rollout gate); the good records beside it are kept."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from prometheus_client import generate_latest
from sqlalchemy import Engine, func, select

from device_agent.protocol import (
    MAX_MESSAGE_BYTES,
    MAX_RECORDS_PER_MESSAGE,
    ContractError,
    SummaryBody,
    telemetry_topic,
)
from fleet_server.db.session import make_engine
from fleet_server.db.telemetry import TelemetrySummary, create_telemetry_tables
from fleet_server.ingest import IngestConfig, IngestWorker, MalformedTelemetryError, parse_message
from fleet_server.ingest.gaps import records_lost
from fleet_server.ingest.store import TelemetryWriter
from fleet_server.metrics import ServerMetrics
from tests.brokers import DEVICE_ACL, SERVER_USER, MosquittoBroker, publish_once
from tests.fleet_server.ingest.test_parse import install_body, summary_body

if TYPE_CHECKING:
    from tests.server_fixtures import Fleet

TOPIC = telemetry_topic("dev-a", "summary")


def message(records: list[dict[str, Any]], device_id: str = "dev-a") -> bytes:
    return json.dumps({"device_id": device_id, "records": records}).encode()


def rec(seq: int, body: Any, kind: str = "summary") -> dict[str, Any]:
    return {"seq": seq, "kind": kind, "ts": 1.0 + seq, "body": body}


POISON: list[tuple[str, dict[str, Any], str]] = [
    ("negative count", summary_body(count=-5, errors=0), "negative_count"),
    ("errors above count", summary_body(count=10, errors=11), "errors_exceed_count"),
    (
        "a quadrillion inferences, no error",
        {**summary_body(), "count": 10**15, "errors": 0},
        "out_of_bounds",
    ),
    (
        "histogram total differs from count - errors",
        {**summary_body(), "count": 5000},
        "histogram_mismatch",
    ),
    ("count as a string", {**summary_body(), "count": "1000"}, "bad_type"),
    ("count as a float", {**summary_body(), "count": 1000.0}, "bad_type"),
    ("count as a bool", {**summary_body(), "errors": True}, "bad_type"),
    ("unknown summary field", {**summary_body(), "extra": 1}, "bad_fields"),
    ("missing count", {k: v for k, v in summary_body().items() if k != "count"}, "bad_fields"),
    ("name of 10,000 characters", summary_body(name="m" * 10_000), "out_of_bounds"),
    (
        "shadow errors above its count",
        summary_body(shadow={"name": "s", "version": 1, "count": 5, "errors": 9}),
        "errors_exceed_count",
    ),
    ("negative dropped", {**summary_body(), "dropped": {"samples": -1}}, "negative_count"),
]


@pytest.mark.parametrize(("what", "body", "reason"), POISON, ids=[p[0] for p in POISON])
def test_poisoned_summary_is_rejected_by_reason_and_its_neighbour_kept(
    what: str, body: dict[str, Any], reason: str
) -> None:
    m = parse_message(TOPIC, message([rec(1, summary_body()), rec(2, body)]), 1.0)
    assert (m.records, m.rejected, len(m.rows["summary"])) == (2, {reason: 1}, 1), what
    assert m.rows["summary"][0]["seq"] == 1


@pytest.mark.parametrize("literal", [b"1e999999", b"NaN", b"Infinity", b"-Infinity"])
def test_non_finite_number_is_rejected(literal: bytes) -> None:
    raw = message([rec(1, summary_body()), rec(2, summary_body())])
    raw = raw.replace(b'"p95": 4.8', b'"p95": ' + literal, 1)  # only the first record
    try:
        m = parse_message(TOPIC, raw, 1.0)
    except MalformedTelemetryError:  # the JSON decoder refused the literal outright
        return
    assert (m.rejected, [r["seq"] for r in m.rows["summary"]]) == ({"not_finite": 1}, [2])


def test_event_and_sample_records_hold_to_the_contract() -> None:
    good_sample = {"name": "m", "version": 7, "predicted": 1, "inputs": {}, "outputs": {}}
    m = parse_message(
        telemetry_topic("dev-a", "events"),
        message(
            [
                rec(1, install_body(), "events"),
                rec(2, {**install_body(), "message": "x" * 5000}, "events"),
                rec(3, good_sample, "samples"),
                rec(4, {**good_sample, "version": -1}, "samples"),
                rec(5, install_body(), "gossip"),
            ]
        ),
        1.0,
    )
    assert m.rejected == {"out_of_bounds": 1, "negative_count": 1, "unknown_kind": 1}
    assert (len(m.rows["events"]), len(m.rows["samples"])) == (1, 1)


def test_oversized_message_and_too_many_records_are_refused_whole() -> None:
    with pytest.raises(MalformedTelemetryError, match="bytes"):
        parse_message(TOPIC, b" " * (MAX_MESSAGE_BYTES + 1), 1.0)
    many = [rec(i, summary_body()) for i in range(1, MAX_RECORDS_PER_MESSAGE + 2)]
    with pytest.raises(MalformedTelemetryError, match="records"):
        parse_message(TOPIC, message(many), 1.0)


def test_device_side_constructs_the_same_contract() -> None:
    """The dataclasses check without pydantic: the device can hold itself to them."""
    SummaryBody(**summary_body())  # type: ignore[arg-type]
    with pytest.raises(ContractError) as e:
        SummaryBody(**{**summary_body(), "errors": 2000})  # type: ignore[arg-type]
    assert e.value.code == "errors_exceed_count"


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    eng = make_engine(f"sqlite:///{tmp_path / 'server.db'}")
    create_telemetry_tables(eng)
    yield eng
    eng.dispose()


def test_poisoned_summaries_are_counted_per_device_on_metrics_and_never_stored(
    tmp_path: Path, engine: Engine
) -> None:
    users = {"dev-a": "pw-a", "dev-b": "pw-b", SERVER_USER: "pw-s"}
    with MosquittoBroker(tmp_path / "broker", users=users, acl=DEVICE_ACL) as broker:
        config = IngestConfig(
            host=broker.host,
            port=broker.port,
            username=SERVER_USER,
            password="pw-s",
            client_id="ingest-contract",
        )
        with IngestWorker(config, engine) as worker:
            for dev, pw in (("dev-a", "pw-a"), ("dev-b", "pw-b")):
                records = [rec(i + 1, body) for i, (_w, body, _r) in enumerate(POISON)]
                records.append(rec(len(POISON) + 1, summary_body()))
                publish_once(
                    broker, dev, pw, telemetry_topic(dev, "summary"), message(records, dev)
                )
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and worker.stats.records < 2 * (len(POISON) + 1):
                time.sleep(0.05)
            time.sleep(0.3)
            metrics = ServerMetrics()
            metrics.export_ingest(worker, lambda: records_lost(engine))
    with engine.connect() as c:
        rows = c.execute(select(TelemetrySummary.device_id, TelemetrySummary.count)).all()
        total = c.execute(select(func.count()).select_from(TelemetrySummary)).scalar_one()
    assert total == 2 and {r.count for r in rows} == {1000}
    by_device = worker.rejections.by_device()
    expected: dict[str, int] = {}
    for _w, _b, reason in POISON:
        expected[reason] = expected.get(reason, 0) + 1
    assert by_device == {"dev-a": expected, "dev-b": expected}
    text = generate_latest(metrics.registry).decode()
    assert 'edgefleet_ingest_rejected{device="dev-b",reason="negative_count"} 2.0' in text


def test_holes_in_a_devices_sequence_become_records_lost(engine: Engine) -> None:
    now = time.time()
    writer = TelemetryWriter(engine)
    old, fresh = now - 600, now

    def batch(device: str, seqs: list[int], received_at: float, kind: str = "summary") -> None:
        recs = [rec(s, summary_body() if kind == "summary" else install_body(), kind) for s in seqs]
        writer.write(
            [parse_message(telemetry_topic(device, kind), message(recs, device), received_at)]
        )

    batch("dev-a", [1, 2, 3, 7, 8], old)  # 4..6 lost before a summary
    batch("dev-a", [10], old, "events")  # 9 lost before an event
    batch("dev-a", [10_000_000], old)  # the device's store started over: not a loss
    batch("dev-b", [1, 2, 3, 4], old)  # nothing lost
    batch("dev-c", [1, 5], fresh)  # may still be on its way
    lost = {(x.device_id, x.kind): x.records for x in records_lost(engine, now=now)}
    assert lost == {("dev-a", "summary"): 3, ("dev-a", "events"): 1}
    batch("dev-a", [4, 5, 6, 9], old)  # late arrivals fill the holes
    assert records_lost(engine, now=now) == []


def test_device_list_shows_records_lost_per_kind(fleet: Fleet) -> None:
    fleet.enroll("cam-1")
    fleet.enroll("cam-2")
    writer = TelemetryWriter(fleet.ctx.engine)
    old = time.time() - 600
    recs = [rec(s, summary_body()) for s in (1, 2, 6)]
    writer.write([parse_message(telemetry_topic("cam-1", "summary"), message(recs, "cam-1"), old)])
    r = fleet.client.get("/api/v1/devices", headers=fleet.admin)
    lost = {d["id"]: d["records_lost"] for d in r.json()["items"]}
    assert lost == {"cam-1": {"summary": 3}, "cam-2": {}}
