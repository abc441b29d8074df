"""The ingestion worker against a real Mosquitto (per-device ACL) and real SQLite files."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import Engine, func, select

from device_agent.protocol import telemetry_topic
from fleet_server.db.session import make_engine
from fleet_server.db.telemetry import TelemetrySummary, create_telemetry_tables
from fleet_server.ingest import IngestConfig, IngestConfigError, IngestWorker
from tests.brokers import DEVICE_ACL, SERVER_USER, MosquittoBroker
from tests.fleet_server.ingest.test_parse import payload, summary_body
from tests.pg import fresh_database

DEVICES = {f"dev-{i}": f"pw-{i}" for i in range(4)}
USERS = {**DEVICES, SERVER_USER: "pw-server"}


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    b = MosquittoBroker(tmp_path / "broker", users=USERS, acl=DEVICE_ACL)
    b.start()
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    eng = make_engine(f"sqlite:///{tmp_path / 'server.db'}")
    create_telemetry_tables(eng)
    yield eng
    eng.dispose()


def config(broker: MosquittoBroker, client_id: str, **kw: Any) -> IngestConfig:
    return IngestConfig(
        host=broker.host,
        port=broker.port,
        username=SERVER_USER,
        password="pw-server",
        client_id=client_id,
        **kw,
    )


class Device:
    """A device publishing telemetry batches with its own credentials (QoS 1, acked)."""

    def __init__(self, broker: MosquittoBroker, device_id: str) -> None:
        self.id = device_id
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device_id, protocol=mqtt.MQTTv5)
        self.c.username_pw_set(device_id, DEVICES[device_id])
        self.c.max_inflight_messages_set(1000)
        self.c.connect(broker.host, broker.port)
        self.c.loop_start()

    def send(self, seqs: range | list[int], claimed: str | None = None) -> None:
        raw = payload(claimed or self.id, [(s, "summary", summary_body()) for s in seqs])
        info = self.c.publish(telemetry_topic(self.id, "summary"), raw, qos=1)
        info.wait_for_publish(10)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def stored(engine: Engine) -> int:
    with engine.connect() as c:
        return int(c.execute(select(func.count()).select_from(TelemetrySummary)).scalar_one())


def wait_until(cond: Callable[[], bool], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def test_records_are_stored_and_duplicates_dropped(broker: MosquittoBroker, engine: Engine) -> None:
    with IngestWorker(config(broker, "ingest-1"), engine) as w:
        d = Device(broker, "dev-0")
        d.send(range(1, 51))
        d.send(range(1, 51))  # the whole batch again (a lost PUBACK on the device side)
        d.send(range(40, 61))  # overlapping
        d.close()
        assert wait_until(lambda: w.stats.records == 121)
        assert wait_until(lambda: w.stats.stored + w.stats.duplicates == 121)
    assert stored(engine) == 60
    assert (w.stats.stored, w.stats.duplicates) == (60, 61)


def test_payload_with_another_device_id_is_dropped_and_counted(
    broker: MosquittoBroker, engine: Engine
) -> None:
    with IngestWorker(config(broker, "ingest-1"), engine) as w:
        d = Device(broker, "dev-0")
        d.send(range(1, 11), claimed="dev-1")  # own topic (ACL allows), someone else's id
        d.send(range(1, 6))
        d.close()
        assert wait_until(lambda: w.stats.messages == 2 and w.stats.stored == 5)
    assert w.stats.spoofed_messages == 1
    with engine.connect() as c:
        owners = set(c.execute(select(TelemetrySummary.device_id)).scalars())
    assert owners == {"dev-0"} and stored(engine) == 5


def test_broker_acl_stops_a_device_publishing_under_another_id(
    broker: MosquittoBroker, engine: Engine
) -> None:
    with IngestWorker(config(broker, "ingest-1"), engine) as w:
        d = Device(broker, "dev-0")
        raw = payload("dev-1", [(1, "summary", summary_body())])
        d.c.publish(telemetry_topic("dev-1", "summary"), raw, qos=1).wait_for_publish(10)
        d.send(range(1, 3))  # a legitimate message after it, to know the worker is caught up
        d.close()
        assert wait_until(lambda: w.stats.messages >= 1 and w.stats.stored == 2)
        time.sleep(0.2)
    assert w.stats.messages == 1  # the broker never delivered the foreign-topic message
    assert stored(engine) == 2


def split_between_two_workers(broker: MosquittoBroker, engine: Engine) -> None:
    w1 = IngestWorker(config(broker, "ingest-a"), engine).start()
    w2 = IngestWorker(config(broker, "ingest-b"), engine).start()
    try:
        devices = [Device(broker, d) for d in DEVICES]
        for d in devices:
            for k in range(25):  # 25 messages x 20 records per device
                d.send(range(k * 20 + 1, k * 20 + 21))
        for d in devices:
            d.close()
        total = 4 * 25 * 20
        assert wait_until(lambda: w1.stats.records + w2.stats.records == total, 30)
        assert wait_until(lambda: stored(engine) == total)
    finally:
        w1.stop()
        w2.stop()
    # each message went to exactly one worker, and both got a share
    assert w1.stats.messages + w2.stats.messages == 100
    assert w1.stats.messages > 0 and w2.stats.messages > 0
    assert w1.stats.duplicates + w2.stats.duplicates == 0
    assert w1.stats.stored + w2.stats.stored == total


def test_two_workers_share_the_subscription_and_store_each_record_once(
    broker: MosquittoBroker, engine: Engine
) -> None:
    split_between_two_workers(broker, engine)


def test_two_workers_on_postgresql_store_each_record_once(broker: MosquittoBroker) -> None:
    with fresh_database("edgefleet_ingest") as url:
        eng = make_engine(url)
        try:
            create_telemetry_tables(eng)
            split_between_two_workers(broker, eng)
        finally:
            eng.dispose()


def test_database_outage_holds_messages_until_it_can_write(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    eng = make_engine(f"sqlite:///{tmp_path / 'late.db'}")  # tables missing: every write fails
    try:
        with IngestWorker(config(broker, "ingest-1"), eng) as w:
            d = Device(broker, "dev-0")
            d.send(range(1, 31))
            d.close()
            assert wait_until(lambda: w.stats.write_errors >= 2)
            assert w.stats.stored == 0
            create_telemetry_tables(eng)  # the database comes back
            assert wait_until(lambda: w.stats.stored == 30)
        assert stored(eng) == 30
    finally:
        eng.dispose()


def test_unacknowledged_messages_are_redelivered_after_restart(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    eng = make_engine(f"sqlite:///{tmp_path / 'late.db'}")  # no tables yet
    try:
        w = IngestWorker(config(broker, "ingest-1", session_expiry=60), eng).start()
        d = Device(broker, "dev-0")
        d.send(range(1, 11))
        assert wait_until(lambda: w.stats.write_errors >= 1)
        w.stop(timeout=1)  # gives up on the batch: nothing was acknowledged
        create_telemetry_tables(eng)
        w2 = IngestWorker(config(broker, "ingest-1", session_expiry=60), eng).start()
        try:
            assert wait_until(lambda: stored(eng) == 10)
        finally:
            w2.stop()
            d.close()
    finally:
        eng.dispose()


def test_wrong_credentials_fail_start_with_a_clear_error(
    broker: MosquittoBroker, engine: Engine
) -> None:
    cfg = IngestConfig(
        host=broker.host,
        port=broker.port,
        username=SERVER_USER,
        password="wrong",
        client_id="ingest-x",
    )
    with pytest.raises(IngestConfigError, match="not subscribed"):
        IngestWorker(cfg, engine).start(timeout=2)


def test_bad_share_group_is_refused(engine: Engine) -> None:
    with pytest.raises(IngestConfigError, match="share_group"):
        IngestWorker(IngestConfig(share_group="a/b"), engine)
