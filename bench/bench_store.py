"""Telemetry store-and-forward throughput against peers measured in the same run.

    python bench/bench_store.py [--records 20000] [--batch 200] [--inflight 100]

Rows compared (records per second, higher is better):

* append: ``TelemetryStore.append_many`` in flushes of 100 records (WAL, bound
  checks, seq bookkeeping) vs a bare ``sqlite3`` ``executemany`` of the same JSON
  into one plain table, also WAL + synchronous=NORMAL, one transaction per flush;
* drain: the :class:`Reporter` publishing the stored records at QoS 1 through
  :class:`MqttTransport` to a local Mosquitto until every row is acknowledged and
  deleted, vs a bare paho loop publishing the same batch payloads at QoS 1 and
  waiting for every PUBACK.

The broker is started on a free loopback port and stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import paho.mqtt.client as mqtt  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from device_agent.protocol import telemetry_topic  # noqa: E402
from device_agent.reporter import Reporter, encode_batch  # noqa: E402
from device_agent.store import TelemetryStore  # noqa: E402
from device_agent.transport import Backoff  # noqa: E402
from device_agent.transport.mqtt import MqttTransport  # noqa: E402
from tests.brokers import MosquittoBroker  # noqa: E402

FLUSH = 100


def body(i: int) -> dict[str, object]:
    return {
        "name": "mlp",
        "version": 3,
        "predicted": i % 4,
        "inputs": {"x": [round((i * 7 + j) % 97 / 97.0, 6) for j in range(16)]},
        "outputs": {"probabilities": [0.1, 0.2, 0.3, 0.4]},
    }


def bench_append_ours(path: Path, bodies: list[dict[str, object]]) -> float:
    store = TelemetryStore(path, max_bytes=256 * 1024 * 1024)
    t0 = time.perf_counter()
    for i in range(0, len(bodies), FLUSH):
        store.append_many([("sample", b, 1.0) for b in bodies[i : i + FLUSH]])
    dt = time.perf_counter() - t0
    store.close()
    return len(bodies) / dt


def bench_append_bare(path: Path, bodies: list[dict[str, object]]) -> float:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("CREATE TABLE t (seq INTEGER PRIMARY KEY, kind TEXT, ts REAL, body TEXT)")
    t0 = time.perf_counter()
    for i in range(0, len(bodies), FLUSH):
        rows = [
            ("samples", 1.0, json.dumps(b, separators=(",", ":"))) for b in bodies[i : i + FLUSH]
        ]
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO t (kind, ts, body) VALUES (?, ?, ?)", rows)
        conn.execute("COMMIT")
    dt = time.perf_counter() - t0
    conn.close()
    return len(bodies) / dt


def bench_drain_ours(
    broker: MosquittoBroker, path: Path, n: int, batch: int, inflight: int
) -> float:
    store = TelemetryStore(path, max_bytes=256 * 1024 * 1024)
    transport = MqttTransport(
        "bench-ours", broker.host, broker.port, max_inflight=inflight, backoff=Backoff(0.05, 0.5)
    ).start()
    if not transport.wait_connected(10):
        raise SystemExit(f"cannot connect to the bench broker: {transport.last_error}")
    reporter = Reporter(
        store, transport, "bench-ours", batch_size=batch, inflight=inflight, poll_interval=0.01
    )
    t0 = time.perf_counter()
    reporter.start()
    while reporter.counters.acked < n:
        time.sleep(0.005)
    dt = time.perf_counter() - t0
    reporter.stop()
    transport.stop()
    store.close()
    return n / dt


def bench_drain_bare(
    broker: MosquittoBroker, path: Path, n: int, batch: int, inflight: int
) -> float:
    store = TelemetryStore(path, max_bytes=256 * 1024 * 1024)
    records = store.pending(limit=n)
    store.close()
    payloads = [encode_batch("bench-bare", records[i : i + batch]) for i in range(0, n, batch)]
    topic = telemetry_topic("bench-bare", "samples")
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-bare")
    c.max_inflight_messages_set(inflight)
    c.connect(broker.host, broker.port)
    c.loop_start()
    t0 = time.perf_counter()
    infos = [c.publish(topic, p, qos=1) for p in payloads]
    for info in infos:
        info.wait_for_publish(60)
    dt = time.perf_counter() - t0
    c.disconnect()
    c.loop_stop()
    return n / dt


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=20_000)
    ap.add_argument("--batch", type=int, default=200)
    ap.add_argument("--inflight", type=int, default=100)
    args = ap.parse_args(argv)
    n = args.records
    bodies = [body(i) for i in range(n)]
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        ours_append = bench_append_ours(d / "ours.db", bodies)
        bare_append = bench_append_bare(d / "bare.db", bodies)
        with MosquittoBroker(d / "broker", persistence=False) as broker:
            bare_drain = bench_drain_bare(broker, d / "ours.db", n, args.batch, args.inflight)
            ours_drain = bench_drain_ours(broker, d / "ours.db", n, args.batch, args.inflight)
    print(
        f"{n} sample records, ~{len(json.dumps(bodies[0]))} B bodies, flush={FLUSH}, "
        f"batch={args.batch}, inflight={args.inflight}"
    )
    print(f"{'phase':<8} {'edgefleet rec/s':>16} {'bare peer rec/s':>16} {'ratio':>7}  peer")
    rows = [
        ("append", ours_append, bare_append, "sqlite3 executemany, one table"),
        ("drain", ours_drain, bare_drain, "paho publish loop, same payloads"),
    ]
    for name, ours, bare, peer in rows:
        print(f"{name:<8} {ours:>16,.0f} {bare:>16,.0f} {ours / bare:>7.2f}  {peer}")


if __name__ == "__main__":
    main()
