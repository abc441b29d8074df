"""Telemetry ingestion rate: records per second from the broker into the database.

One run, on one real Mosquitto (started here on a free loopback port) and a
real SQLite file (WAL), three ways:

* ``broker only``   - a bare paho MQTT 5 subscriber on the same shared
  subscription that only counts records (the peer: what the broker and paho
  deliver at all, the ceiling for any ingestion on this machine);
* ``writer only``   - :func:`parse_message` + :class:`TelemetryWriter` straight
  from the payload bytes, no broker (the database side alone);
* ``ingest worker`` - :class:`IngestWorker`: broker -> queue -> parse -> batched
  ``INSERT ... ON CONFLICT DO NOTHING`` -> manual PUBACK.

For the two broker variants, the messages are queued in the broker first (the
subscriber's persistent session is subscribed, then offline while a publisher
sends everything), and the clock runs from the subscriber's connect until the
last record is counted (peer) or committed (worker), so publishing does not
compete for the CPU with what is measured. Beside the rate, the script prints the CPU
time of its own process per record over the same interval (all its threads; the broker
is another process): on a loaded machine the rate follows the load, the CPU time much
less, so compare versions by both. Messages carry 200 summary records
each, as the agent's reporter batches them.

    python bench/bench_ingest.py [--messages 200] [--records 200]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from device_agent.protocol import telemetry_topic  # noqa: E402
from fleet_server.db.session import make_engine  # noqa: E402
from fleet_server.db.telemetry import create_telemetry_tables  # noqa: E402
from fleet_server.ingest import (  # noqa: E402
    IngestConfig,
    IngestWorker,
    TelemetryWriter,
    parse_message,
)
from tests.brokers import MosquittoBroker  # noqa: E402
from tests.fleet_server.ingest.test_parse import summary_body  # noqa: E402

DEVICES = 20


def make_messages(n_messages: int, per_message: int) -> list[tuple[str, bytes]]:
    out = []
    seqs = [0] * DEVICES
    for i in range(n_messages):
        dev = i % DEVICES
        records = []
        for _ in range(per_message):
            seqs[dev] += 1
            records.append(
                {
                    "seq": seqs[dev],
                    "kind": "summary",
                    "ts": 1.7e9 + seqs[dev],
                    "body": summary_body(count=1200, errors=seqs[dev] % 5),
                }
            )
        device_id = f"bench-{dev:03d}"
        out.append(
            (
                telemetry_topic(device_id, "summary"),
                json.dumps({"device_id": device_id, "records": records}).encode(),
            )
        )
    return out


def prequeue(
    broker: MosquittoBroker, client_id: str, share: str, messages: list[tuple[str, bytes]]
) -> None:
    """Subscribe a persistent session, disconnect it, publish everything."""
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 600
    sub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    done = threading.Event()
    sub.on_subscribe = lambda *a: done.set()
    sub.connect(broker.host, broker.port, clean_start=True, properties=props)
    sub.loop_start()
    sub.subscribe(f"$share/{share}/edgefleet/v1/devices/+/telemetry/#", qos=1)
    if not done.wait(10):
        raise RuntimeError("subscriber did not subscribe")
    sub.disconnect()
    sub.loop_stop()
    pub = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=f"pub-{client_id}", protocol=mqtt.MQTTv5
    )
    pub.max_inflight_messages_set(1000)
    pub.connect(broker.host, broker.port)
    pub.loop_start()
    infos = [pub.publish(t, p, qos=1) for t, p in messages]
    for info in infos:
        info.wait_for_publish(60)
    pub.disconnect()
    pub.loop_stop()


def run_peer(
    broker: MosquittoBroker, messages: list[tuple[str, bytes]], total: int
) -> tuple[float, float]:
    prequeue(broker, "peer", "peer", messages)
    count = [0]
    done = threading.Event()

    def on_message(_c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        count[0] += len(json.loads(msg.payload)["records"])
        if count[0] >= total:
            done.set()

    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="peer", protocol=mqtt.MQTTv5)
    c.on_message = on_message
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 600
    t0, c0 = time.perf_counter(), time.process_time()
    c.connect(broker.host, broker.port, clean_start=False, properties=props)
    c.loop_start()
    if not done.wait(300):
        raise RuntimeError(f"peer received only {count[0]} of {total} records")
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    c.disconnect()
    c.loop_stop()
    return total / elapsed, cpu / total


def run_writer(
    tmp: Path, messages: list[tuple[str, bytes]], total: int, batch_records: int
) -> tuple[float, float]:
    eng = make_engine(f"sqlite:///{tmp / 'writer.db'}")
    create_telemetry_tables(eng)
    w = TelemetryWriter(eng)
    per = max(1, batch_records // max(1, total // len(messages)))
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(0, len(messages), per):
        now = time.time()
        w.write([parse_message(t, p, now) for t, p in messages[i : i + per]])
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    eng.dispose()
    return total / elapsed, cpu / total


def run_worker(
    broker: MosquittoBroker,
    tmp: Path,
    messages: list[tuple[str, bytes]],
    total: int,
    batch_records: int,
) -> tuple[float, float]:
    eng = make_engine(f"sqlite:///{tmp / 'worker.db'}")
    create_telemetry_tables(eng)
    prequeue(broker, "bench-ingest", "edgefleet-ingest", messages)
    cfg = IngestConfig(
        host=broker.host,
        port=broker.port,
        client_id="bench-ingest",
        batch_records=batch_records,
        session_expiry=600,
    )
    worker = IngestWorker(cfg, eng)
    t0, c0 = time.perf_counter(), time.process_time()
    worker.start()
    deadline = time.monotonic() + 300
    while worker.stats.stored < total and time.monotonic() < deadline:
        time.sleep(0.005)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    worker.stop()
    eng.dispose()
    if worker.stats.stored < total:
        raise RuntimeError(f"worker stored only {worker.stats.stored} of {total}")
    return total / elapsed, cpu / total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=200)
    ap.add_argument("--records", type=int, default=200, help="records per message")
    ap.add_argument("--batch-records", type=int, default=5000)
    args = ap.parse_args()
    messages = make_messages(args.messages, args.records)
    total = args.messages * args.records
    size = sum(len(p) for _, p in messages)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        with MosquittoBroker(
            tmp / "broker", persistence=False, max_queued_messages=args.messages * 2
        ) as broker:
            rows = [
                ("broker only (peer)", run_peer(broker, messages, total)),
                ("writer only", run_writer(tmp, messages, total, args.batch_records)),
                ("ingest worker", run_worker(broker, tmp, messages, total, args.batch_records)),
            ]
    print(
        f"\n{total} summary records in {args.messages} messages "
        f"({size / total:.0f} bytes/record), SQLite WAL, batch {args.batch_records} records"
    )
    print(f"{'variant':<22}{'records/s':>12}{'vs peer':>10}{'CPU us/record':>16}")
    peer = rows[0][1][0]
    for name, (rate, cpu) in rows:
        print(f"{name:<22}{rate:>12,.0f}{rate / peer:>10.0%}{cpu * 1e6:>16.1f}")
    print("target: ingest worker >= 20,000 records/s on SQLite")


if __name__ == "__main__":
    main()
