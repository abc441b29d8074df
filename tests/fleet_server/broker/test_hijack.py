"""The shared-group hijack, against the broker configuration the server itself writes.

One enrolled device's credentials join the server's own shared-subscription group
(``$share/edgefleet-ingest/edgefleet/v1/devices/+/telemetry/#``) or subscribe to every
device's telemetry. With Mosquitto's file ACL the SUBSCRIBE is granted, the broker rotates
the group's messages across its members, and the rogue member's share is dropped at
delivery: honest devices get their PUBACK and lose records for good. The broker rules must
refuse the subscription when it is made, so every honest record reaches the ingestion worker.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import Engine, func, select

from device_agent.protocol import telemetry_topic
from fleet_server.broker.beside import BrokerBeside
from fleet_server.broker.mosquitto import SERVER_USER
from fleet_server.db.session import make_engine
from fleet_server.db.telemetry import TelemetrySummary, create_telemetry_tables
from fleet_server.ingest import IngestConfig, IngestWorker
from tests.fleet_server.ingest.test_parse import payload, summary_body

HONEST = [f"dev-{i}" for i in range(3)]
ROGUE = "rogue-1"
RECORDS_PER_DEVICE = 40

ROGUE_FILTERS = [
    "$share/edgefleet-ingest/edgefleet/v1/devices/+/telemetry/#",
    "$share/edgefleet-ingest/#",
    "edgefleet/v1/devices/+/telemetry/#",
    "edgefleet/v1/devices/dev-0/telemetry/summary",
    "#",
]


def wait_until(cond: Callable[[], bool], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


class Client:
    """A paho client that records its CONNACK, SUBACK reason codes and received messages."""

    def __init__(self, port: int, user: str, password: str, version: int) -> None:
        self.connack: list[Any] = []
        self.subacks: list[list[Any]] = []
        self.received: list[str] = []
        self._lock = threading.Lock()
        self.c = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"{user}-{time.monotonic_ns()}",
            protocol=mqtt.MQTTv311 if version == 4 else mqtt.MQTTv5,
        )
        self.c.username_pw_set(user, password)
        self.c.max_inflight_messages_set(1000)
        self.c.on_connect = lambda _c, _u, _f, rc, _p: self.connack.append(rc)
        self.c.on_subscribe = lambda _c, _u, _m, rcs, _p: self.subacks.append(list(rcs))
        self.c.on_message = self._on_message
        self.c.connect("127.0.0.1", port, keepalive=30)
        self.c.loop_start()
        assert wait_until(lambda: bool(self.connack), 10), f"{user}: no CONNACK"
        assert not self.connack[0].is_failure, f"{user}: {self.connack[0]}"

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.received.append(msg.topic)

    def subscribe(self, topic: str) -> list[Any]:
        before = len(self.subacks)
        self.c.subscribe(topic, qos=1)
        assert wait_until(lambda: len(self.subacks) > before, 10), f"no SUBACK for {topic}"
        return self.subacks[before]

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


@pytest.fixture(params=["mosquitto", "embedded"])
def beside(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BrokerBeside]:
    b = BrokerBeside(request.param, tmp_path / "broker")
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


def stored(engine: Engine) -> int:
    with engine.connect() as c:
        return int(c.execute(select(func.count()).select_from(TelemetrySummary)).scalar_one())


def test_enrolled_device_joining_the_ingest_share_group_loses_no_honest_record(
    beside: BrokerBeside, engine: Engine
) -> None:
    for d in [*HONEST, ROGUE]:
        beside.add_device(d, f"pw-{d}")
    config = IngestConfig(
        host="127.0.0.1",
        port=beside.port,
        username=SERVER_USER,
        password=beside.server_password,
        client_id="ingest-1",
        mqtt_version=beside.mqtt_version,
    )
    clients: list[Client] = []
    with IngestWorker(config, engine) as worker:
        rogues = [Client(beside.port, ROGUE, f"pw-{ROGUE}", beside.mqtt_version) for _ in range(4)]
        clients += rogues
        refused = []
        for topic in ROGUE_FILTERS:
            for r in rogues[:1]:
                refused.append((topic, all(rc.is_failure for rc in r.subscribe(topic))))
        for r in rogues[1:]:
            r.subscribe(ROGUE_FILTERS[0])
        honest = [Client(beside.port, d, f"pw-{d}", beside.mqtt_version) for d in HONEST]
        clients += honest
        for d, c in zip(HONEST, honest, strict=True):
            for seq in range(1, RECORDS_PER_DEVICE + 1):
                raw = payload(d, [(seq, "summary", summary_body())])
                c.c.publish(telemetry_topic(d, "summary"), raw, qos=1).wait_for_publish(10)
        total = len(HONEST) * RECORDS_PER_DEVICE
        wait_until(lambda: stored(engine) >= total, 10)
        time.sleep(0.3)
        got = stored(engine)
        rogue_got = sum(len(r.received) for r in rogues)
    for c in clients:
        c.close()
    granted = [t for t, ok in refused if not ok]
    assert (got, rogue_got, granted) == (total, 0, []), (
        f"{total - got} of {total} honest records lost; the rogue received {rogue_got} "
        f"messages; the broker granted it {granted}"
    )
    assert worker.stats.stored == total


def test_server_still_reads_every_device_and_notifies_one(beside: BrokerBeside) -> None:
    """The rules that refuse the rogue still let the server subscribe and notify."""
    beside.add_device("dev-0", "pw-dev-0")
    server = Client(beside.port, SERVER_USER, beside.server_password, beside.mqtt_version)
    device = Client(beside.port, "dev-0", "pw-dev-0", beside.mqtt_version)
    try:
        assert not any(rc.is_failure for rc in server.subscribe("edgefleet/v1/devices/+/status"))
        assert not any(
            rc.is_failure for rc in device.subscribe("edgefleet/v1/devices/dev-0/notify")
        )
        server.c.publish(
            "edgefleet/v1/devices/dev-0/notify", json.dumps({"assignment_id": "a"}), qos=1
        ).wait_for_publish(5)
        device.c.publish("edgefleet/v1/devices/dev-0/status", b'{"state":"online"}', qos=1)
        assert wait_until(lambda: "edgefleet/v1/devices/dev-0/notify" in device.received, 5)
        assert wait_until(lambda: "edgefleet/v1/devices/dev-0/status" in server.received, 5)
    finally:
        server.close()
        device.close()


def test_removed_device_loses_its_open_session_at_once(beside: BrokerBeside) -> None:
    beside.add_device("dev-0", "pw-dev-0")
    device = Client(beside.port, "dev-0", "pw-dev-0", beside.mqtt_version)
    disconnected: list[Any] = []
    device.c.on_disconnect = lambda *_a: disconnected.append(True)
    device.c.reconnect_delay_set(30, 60)  # no quick comeback to hide the cut
    try:
        beside.remove_device("dev-0")
        assert wait_until(lambda: bool(disconnected), 10), "the session stayed open"
    finally:
        device.close()
