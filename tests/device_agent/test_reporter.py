"""Store-and-forward over a real Mosquitto the tests start on a free loopback port."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from device_agent.protocol import notify_topic, parse_device_topic, status_topic, telemetry_topic
from device_agent.reporter import Reporter
from device_agent.store import TelemetryStore
from device_agent.transport import Backoff, PublishHandle, TransportConfigError
from device_agent.transport.mqtt import MqttTransport, TlsOptions
from tests.brokers import (
    DEVICE_ACL,
    FIXTURE_USERS,
    SERVER_USER,
    MessageCollector,
    MosquittoBroker,
    Received,
    broker_fixture,  # noqa: F401  (provides the ``broker`` fixture)
    publish_once,
)
from tests.device_agent.test_store import sample_body, summary_body

REPO = Path(__file__).resolve().parents[2]
MiB = 1024 * 1024
TELEMETRY = "edgefleet/v1/devices/+/telemetry/#"


@pytest.fixture
def cleanup() -> Iterator[list[Callable[[], None]]]:
    """Callbacks run at teardown in reverse order (stop reporters, transports, collectors)."""
    todo: list[Callable[[], None]] = []
    yield todo
    for fn in reversed(todo):
        fn()


def transport_for(
    b: MosquittoBroker,
    cleanup: list[Callable[[], None]],
    device: str = "dev-a",
    password: str | None = None,
    **kw: Any,
) -> MqttTransport:
    t = MqttTransport(
        device,
        b.host,
        b.port,
        username=device,
        password=password if password is not None else FIXTURE_USERS[device],
        backoff=Backoff(0.05, 0.5, rng=random.Random(1)),
        keepalive=10,
        **kw,
    )
    t.start()
    cleanup.append(lambda: t.stop(timeout=1))
    return t


def server_collector(
    b: MosquittoBroker,
    cleanup: list[Callable[[], None]],
    topics: list[str],
    client_id: str = "ingest",
) -> MessageCollector:
    c = MessageCollector(b, topics, SERVER_USER, FIXTURE_USERS[SERVER_USER], client_id=client_id)
    c.start()
    cleanup.append(c.stop)
    return c


def telemetry_seqs(messages: list[Received]) -> set[int]:
    return {r["seq"] for m in messages if "/telemetry/" in m.topic for r in m.json()["records"]}


def test_broker_killed_mid_drain_every_record_arrives(
    tmp_path: Path, cleanup: list[Callable[[], None]]
) -> None:
    # Mosquitto keeps messages queued for a subscriber in memory and writes them to
    # disk on autosave; saving on every change (as a production broker should) means
    # the SIGKILL below cannot take away what the broker already acknowledged
    broker = MosquittoBroker(
        tmp_path / "broker", users=FIXTURE_USERS, acl=DEVICE_ACL, autosave_on_changes=1
    ).start()
    cleanup.append(broker.stop)
    collector = server_collector(broker, cleanup, [TELEMETRY])
    store = TelemetryStore(tmp_path / "t.db", max_bytes=32 * MiB)
    cleanup.append(store.close)
    appended = store.append_many([("sample", sample_body(i), float(i)) for i in range(20_000)])
    appended += store.append_many([("summary", summary_body(w), float(w)) for w in range(20)])
    transport = transport_for(broker, cleanup)
    reporter = Reporter(store, transport, "dev-a", batch_size=20, inflight=1).start()
    cleanup.append(reporter.stop)

    assert collector.wait_for_count(2000, 30)
    broker.kill()
    left = store.stats()["rows"]["samples"]
    assert left > 0, "the broker must die while the store still holds rows"
    broker.start()

    everything = set(appended)
    assert collector.wait_for_seqs(everything, 60), (
        f"missing {len(everything - collector.telemetry_seqs())} records"
    )
    assert telemetry_seqs(collector.snapshot()) == everything
    deadline = time.monotonic() + 10
    while store.pending(limit=1) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert store.pending(limit=1) == [], "every row was acknowledged and deleted"
    assert transport.connection_epoch >= 2
    assert reporter.counters.acked == len(appended)


def test_broker_down_while_50k_records_are_produced_store_stays_bounded_and_drops_are_reported(
    broker: MosquittoBroker, tmp_path: Path, cleanup: list[Callable[[], None]]
) -> None:
    collector = server_collector(broker, cleanup, [TELEMETRY])
    max_bytes = 2 * MiB
    path = tmp_path / "t.db"
    store = TelemetryStore(path, max_bytes=max_bytes)
    cleanup.append(store.close)
    broker.stop()  # graceful: the collector's session is kept for when it comes back
    transport = transport_for(broker, cleanup)
    reporter = Reporter(store, transport, "dev-a", batch_size=200, inflight=20).start()
    cleanup.append(reporter.stop)

    sample_seqs: list[int] = []
    summary_seqs: list[int] = []
    largest = 0
    produced = 0
    for window in range(50):  # 50 windows x (999 sampled predictions + 1 summary) = 50,000
        for flush in range(0, 999, 111):
            sample_seqs += store.append_many(
                [
                    ("sample", sample_body(window * 1000 + flush + j), time.time())
                    for j in range(111)
                ]
            )
            on_disk = sum(os.path.getsize(p) for p in (path, Path(f"{path}-wal")) if p.exists())
            largest = max(largest, on_disk)
        body = summary_body(window)
        body["dropped"] = store.take_dropped()
        summary_seqs.append(store.append("summary", body, time.time()))
        produced += 1000
    assert produced == 50_000
    assert largest <= max_bytes, f"store grew to {largest} bytes, bound is {max_bytes}"
    assert not transport.connected and reporter.counters.published == 0
    stats = store.stats()
    assert stats["dropped"]["samples"] > 40_000 and stats["dropped"]["summary"] == 0
    buffered = {r.seq for r in store.pending(limit=1_000_000)}

    broker.start()
    body = summary_body(50)  # the next window ends after the broker is back
    body["dropped"] = store.take_dropped()
    final = store.append("summary", body, time.time())
    reporter.notify()
    expected = buffered | {final}
    assert collector.wait_for_seqs(expected, 60)

    records = {r["seq"]: r for r in _records(collector.snapshot())}
    assert set(records) == expected
    got_summaries = sorted(s for s, r in records.items() if r["kind"] == "summary")
    assert got_summaries == summary_seqs + [final], "no summary was dropped"
    got_samples = sorted(s for s, r in records.items() if r["kind"] == "samples")
    assert got_samples == sample_seqs[-len(got_samples) :], "the newest samples survived"
    reported = sum(records[s]["body"]["dropped"]["samples"] for s in got_summaries)
    assert reported == store.stats()["dropped"]["samples"] == len(sample_seqs) - len(got_samples)


def _records(messages: list[Received]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for m in messages:
        if "/telemetry/" in m.topic:
            payload = m.json()
            device, channel, kind = parse_device_topic(m.topic)
            assert payload["device_id"] == device and channel == "telemetry"
            for r in payload["records"]:
                assert r["kind"] == kind and set(r) == {"seq", "kind", "ts", "body"}
                out.append(r)
    return out


def test_rows_are_deleted_only_after_puback_and_the_inflight_cap_holds(
    broker: MosquittoBroker, tmp_path: Path, cleanup: list[Callable[[], None]]
) -> None:
    store = TelemetryStore(tmp_path / "t.db", max_bytes=8 * MiB)
    cleanup.append(store.close)
    seqs = store.append_many([("sample", sample_body(i), 0.0) for i in range(500)])
    transport = transport_for(broker, cleanup)
    assert transport.wait_connected(10)
    broker.pause()  # the TCP session stays up, but no PUBACK will come
    cleanup.append(broker.resume)
    reporter = Reporter(
        store, transport, "dev-a", batch_size=10, inflight=3, poll_interval=0.05
    ).start()
    cleanup.append(reporter.stop)
    deadline = time.monotonic() + 10
    while reporter.counters.batches_published < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)  # give a cap violation the chance to happen
    assert reporter.counters.batches_published == 3 == reporter.in_flight
    assert reporter.counters.acked == 0
    assert [r.seq for r in store.pending(limit=1000)] == seqs, "nothing deleted without PUBACK"

    broker.resume()
    deadline = time.monotonic() + 30
    while store.pending(limit=1) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert store.pending(limit=1) == []
    assert reporter.counters.acked == 500 and reporter.counters.batches_acked == 50


def test_events_and_summaries_drain_before_samples(
    broker: MosquittoBroker, tmp_path: Path, cleanup: list[Callable[[], None]]
) -> None:
    collector = server_collector(broker, cleanup, [TELEMETRY])
    store = TelemetryStore(tmp_path / "t.db", max_bytes=8 * MiB)
    cleanup.append(store.close)
    store.append_many([("sample", sample_body(i), 0.0) for i in range(300)])
    summary = store.append("summary", summary_body(0), 0.0)
    event = store.append("event", {"type": "install", "outcome": "installed"}, 0.0)
    transport = transport_for(broker, cleanup)
    reporter = Reporter(store, transport, "dev-a", batch_size=100, inflight=1).start()
    cleanup.append(reporter.stop)
    assert collector.wait_for_count(302, 30)
    kinds = [parse_device_topic(m.topic)[2] for m in collector.snapshot()]
    assert kinds[:2] == ["events", "summary"]
    first = [m.json()["records"][0]["seq"] for m in collector.snapshot()[:2]]
    assert first == [event, summary]


AGENT_SCRIPT = """
import sys, time
from device_agent.transport.mqtt import MqttTransport
t = MqttTransport("dev-a", "127.0.0.1", int(sys.argv[1]), username="dev-a", password="pw-a",
                  keepalive=5, status_extra={"model": "mlp", "version": 3}).start()
assert t.wait_connected(10)
print("connected", flush=True)
time.sleep(120)
"""


def _status(messages: list[Received]) -> list[dict[str, Any]]:
    return [m.json() for m in messages if m.topic == status_topic("dev-a")]


def test_last_will_offline_is_retained_when_the_agent_process_is_killed(
    broker: MosquittoBroker, tmp_path: Path, cleanup: list[Callable[[], None]]
) -> None:
    watcher = server_collector(broker, cleanup, [status_topic("dev-a")], client_id="watch")
    script = tmp_path / "agent.py"
    script.write_text(AGENT_SCRIPT)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(broker.port)],
        stdout=subprocess.PIPE,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"connected"
        assert watcher.wait_for(lambda m: any(s["state"] == "online" for s in _status(m)), 10)
        online = _status(watcher.snapshot())[-1]
        assert online["model"] == "mlp" and online["version"] == 3
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
    assert watcher.wait_for(lambda m: _status(m)[-1]["state"] == "offline", 10)
    late = MessageCollector(
        broker,
        [status_topic("dev-a")],
        SERVER_USER,
        FIXTURE_USERS[SERVER_USER],
        client_id="late",
        clean_session=True,
    )
    late.start()
    cleanup.append(late.stop)
    assert late.wait_for(lambda m: len(m) >= 1, 10)
    first = late.snapshot()[0]
    assert first.retain and first.json() == {"state": "offline", "device_id": "dev-a"}


def test_clean_stop_publishes_retained_offline(
    broker: MosquittoBroker, cleanup: list[Callable[[], None]]
) -> None:
    transport = transport_for(broker, [])
    assert transport.wait_connected(10)
    transport.stop(timeout=5)
    late = MessageCollector(
        broker,
        [status_topic("dev-a")],
        SERVER_USER,
        FIXTURE_USERS[SERVER_USER],
        client_id="late",
        clean_session=True,
    )
    late.start()
    cleanup.append(late.stop)
    assert late.wait_for(lambda m: len(m) >= 1, 10)
    assert late.snapshot()[0].retain and late.snapshot()[0].json()["state"] == "offline"


def test_device_cannot_publish_under_another_devices_topic(
    broker: MosquittoBroker, cleanup: list[Callable[[], None]]
) -> None:
    collector = server_collector(broker, cleanup, ["edgefleet/v1/devices/#"])
    transport = transport_for(broker, cleanup, "dev-a")
    assert transport.wait_connected(10)
    forged = {
        "device_id": "dev-b",
        "records": [{"seq": 1, "kind": "events", "ts": 0.0, "body": {"type": "forged"}}],
    }
    own = {
        "device_id": "dev-a",
        "records": [{"seq": 1, "kind": "events", "ts": 0.0, "body": {"type": "genuine"}}],
    }
    handles: list[PublishHandle] = [
        transport.publish(telemetry_topic("dev-b", "events"), json.dumps(forged).encode()),
        transport.publish(status_topic("dev-b"), b'{"state": "online"}', retain=True),
        transport.publish(telemetry_topic("dev-a", "events"), json.dumps(own).encode()),
    ]
    assert all(h.wait(10) for h in handles)
    # one client's messages arrive in order: once the genuine one is here, a forged
    # one published before it would have been too
    assert collector.wait_for(
        lambda m: any(x.topic == telemetry_topic("dev-a", "events") for x in m), 10
    )
    assert not [m.topic for m in collector.snapshot() if "/dev-b/" in m.topic]


def test_notify_reaches_its_device_and_no_other(
    broker: MosquittoBroker, cleanup: list[Callable[[], None]]
) -> None:
    transport = transport_for(broker, cleanup, "dev-a")
    assert transport.wait_connected(10)
    snoop = MessageCollector(
        broker,
        [notify_topic("dev-b"), notify_topic("dev-a")],
        "dev-a",
        FIXTURE_USERS["dev-a"],
        client_id="dev-a-snoop",
    )
    snoop.start()
    cleanup.append(snoop.stop)
    time.sleep(0.2)  # let the transport's own notify subscription land too
    server_pw = FIXTURE_USERS[SERVER_USER]
    publish_once(broker, SERVER_USER, server_pw, notify_topic("dev-b"), b'{"for": "b"}')
    publish_once(broker, SERVER_USER, server_pw, notify_topic("dev-a"), b'{"for": "a"}')
    note = transport.notifications.get(timeout=10)
    assert note.topic == notify_topic("dev-a") and json.loads(note.payload) == {"for": "a"}
    assert snoop.wait_for(lambda m: any(x.topic == notify_topic("dev-a") for x in m), 10)
    assert [m.topic for m in snoop.snapshot()] == [notify_topic("dev-a")]


def test_wrong_password_is_reported_and_rows_are_kept(
    broker: MosquittoBroker, tmp_path: Path, cleanup: list[Callable[[], None]]
) -> None:
    store = TelemetryStore(tmp_path / "t.db", max_bytes=MiB)
    cleanup.append(store.close)
    store.append_many([("sample", sample_body(i), 0.0) for i in range(10)])
    transport = transport_for(broker, cleanup, password="wrong")
    reporter = Reporter(store, transport, "dev-a", poll_interval=0.05).start()
    cleanup.append(reporter.stop)
    deadline = time.monotonic() + 10
    while "refused" not in transport.last_error and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "refused the connection" in transport.last_error
    assert not transport.connected
    assert len(store.pending(limit=100)) == 10 and reporter.counters.published == 0


def test_transport_config_errors_by_name(tmp_path: Path) -> None:
    with pytest.raises(TransportConfigError, match="host is empty"):
        MqttTransport("dev-a", "")
    with pytest.raises(TransportConfigError, match="not a TCP port"):
        MqttTransport("dev-a", "127.0.0.1", 70000)
    with pytest.raises(TransportConfigError, match="ca_file .* does not exist"):
        MqttTransport("dev-a", "127.0.0.1", tls=TlsOptions(ca_file=tmp_path / "missing.pem"))
    with pytest.raises(TransportConfigError, match="backoff"):
        Backoff(initial=5, maximum=1)


def test_transport_from_config_reads_the_password_file(
    broker: MosquittoBroker, tmp_path: Path, cleanup: list[Callable[[], None]]
) -> None:
    from device_agent.config import AgentConfig

    (tmp_path / "mqtt.pw").write_text("pw-b\n")
    cfg = AgentConfig.from_dict(
        {
            "device": {"id": "dev-b"},
            "mqtt": {
                "host": broker.host,
                "port": broker.port,
                "password_file": str(tmp_path / "mqtt.pw"),
            },
        }
    )
    t = MqttTransport.from_config(cfg, backoff=Backoff(0.05, 0.5))
    t.start()
    cleanup.append(lambda: t.stop(timeout=1))
    assert t.wait_connected(10), t.last_error
    cfg.mqtt.password_file = tmp_path / "absent.pw"
    with pytest.raises(TransportConfigError, match="password_file"):
        MqttTransport.from_config(cfg)


def test_backoff_grows_exponentially_with_jitter_and_stays_bounded() -> None:
    b = Backoff(initial=0.5, maximum=8.0, jitter=0.5, rng=random.Random(7))
    delays = [b.next() for _ in range(12)]
    ceilings = [min(8.0, 0.5 * 2**n) for n in range(12)]
    assert all(c / 2 <= d <= c for d, c in zip(delays, ceilings, strict=True))
    assert max(delays) <= 8.0 and len({round(d, 6) for d in delays[6:]}) > 1, "jittered"
    b.reset()
    assert b.next() <= 0.5


def _wait(cond: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_batches_in_flight_when_the_broker_dies_are_resent_and_counted_as_retries(
    broker: MosquittoBroker, tmp_path: Path, cleanup: list[Callable[[], None]]
) -> None:
    store = TelemetryStore(tmp_path / "t.db", max_bytes=8 * MiB)
    cleanup.append(store.close)
    store.append_many([("sample", sample_body(i), 0.0) for i in range(500)])
    transport = transport_for(broker, cleanup)
    assert transport.wait_connected(10)
    broker.pause()  # the next publishes reach the socket, never the broker
    reporter = Reporter(
        store, transport, "dev-a", batch_size=10, inflight=3, poll_interval=0.05
    ).start()
    cleanup.append(reporter.stop)
    assert _wait(lambda: reporter.in_flight == 3, 10)
    broker.kill()
    assert _wait(lambda: not transport.connected, 30)
    assert len(store.pending(limit=1000)) == 500, "a dropped connection deletes nothing"
    broker.start()
    assert _wait(lambda: not store.pending(limit=1), 30)
    assert reporter.counters.retries == 3
    assert reporter.counters.acked == 500 and reporter.counters.batches_acked == 50


def test_rows_in_flight_when_the_agent_stops_are_sent_again_after_restart(
    broker: MosquittoBroker, tmp_path: Path, cleanup: list[Callable[[], None]]
) -> None:
    collector = server_collector(broker, cleanup, [TELEMETRY])
    path = tmp_path / "t.db"
    store = TelemetryStore(path, max_bytes=8 * MiB)
    appended = set(store.append_many([("sample", sample_body(i), 0.0) for i in range(300)]))
    transport = transport_for(broker, [])
    assert transport.wait_connected(10)
    broker.pause()
    reporter = Reporter(
        store, transport, "dev-a", batch_size=10, inflight=3, poll_interval=0.05
    ).start()
    assert _wait(lambda: reporter.in_flight == 3, 10)
    reporter.stop()
    transport.stop(timeout=0.2)
    store.close()  # the agent is gone; nothing was acknowledged
    broker.resume()

    store = TelemetryStore(path, max_bytes=8 * MiB)
    cleanup.append(store.close)
    assert {r.seq for r in store.pending(limit=1000)} == appended
    transport = transport_for(broker, cleanup)
    reporter = Reporter(store, transport, "dev-a", batch_size=50, inflight=4).start()
    cleanup.append(reporter.stop)
    assert collector.wait_for_seqs(appended, 30)
    assert telemetry_seqs(collector.snapshot()) == appended
    assert _wait(lambda: not store.pending(limit=1), 10)


def test_mqtt5_broker_refusal_is_counted_and_the_rows_are_kept(
    broker: MosquittoBroker, tmp_path: Path, cleanup: list[Callable[[], None]]
) -> None:
    store = TelemetryStore(tmp_path / "t.db", max_bytes=MiB)
    cleanup.append(store.close)
    seqs = store.append_many([("event", {"type": "install", "n": i}, 0.0) for i in range(5)])
    # authenticated as dev-a but configured to report as dev-b: the ACL refuses it
    transport = transport_for(broker, cleanup, "dev-a", mqtt_version=5)
    reporter = Reporter(store, transport, "dev-b", poll_interval=0.05).start()
    cleanup.append(reporter.stop)
    assert _wait(lambda: reporter.counters.rejected == 1, 10)
    assert reporter.counters.acked == 0
    assert [r.seq for r in store.pending()] == seqs


def test_stop_returns_promptly_when_the_broker_hangs(
    broker: MosquittoBroker, cleanup: list[Callable[[], None]]
) -> None:
    transport = transport_for(broker, [])
    assert transport.wait_connected(10)
    broker.pause()
    cleanup.append(broker.resume)
    blob = b"x" * (1024 * 1024)
    handles = [transport.publish(telemetry_topic("dev-a", "samples"), blob) for _ in range(40)]
    started = time.monotonic()
    transport.stop(timeout=0.5)
    assert time.monotonic() - started < 8
    assert not transport.connected
    assert not any(h.done for h in handles), "nothing the broker never acknowledged is done"


def test_batch_payload_is_the_protocol_shape_without_re_encoding_bodies(tmp_path: Path) -> None:
    from device_agent.reporter import encode_batch

    with TelemetryStore(tmp_path / "t.db", max_bytes=MiB) as s:
        s.append_many(
            [
                ("sample", {"label": "café ☕", "x": [1.5e-300, -0.0]}, 1.25),
                ("sample", {"nested": {"a": None}}, 1_800_000_000.123456),
            ]
        )
        records = s.pending()
    payload = json.loads(encode_batch("dev-ä", records))
    assert payload == {"device_id": "dev-ä", "records": [r.to_wire() for r in records]}


def test_reporter_refuses_a_zero_batch_size_or_window() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Reporter(None, None, "dev-a", batch_size=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least 1"):
        Reporter(None, None, "dev-a", inflight=0)  # type: ignore[arg-type]
