"""Alert evaluation and sample export cost on a real SQLite file (WAL, migrated).

A group of ``--devices`` devices, each with ``--windows`` window summaries of one model in
the last 10 minutes and ``--samples`` sampled inferences in all (16 float32 inputs, 3
outputs each). Measured, median of ``--rounds``:

* ``alert round``: :meth:`AlertEvaluator.run_once` over seven rules, one of each kind
  (drift, error rate, p99 latency, accuracy, silent, stale, records lost);
* ``report summarize`` (peer): the report's own query of the same model figures over the
  same window and devices (:func:`fleet_server.report.queries.summarize`), once;
* ``export``: :func:`write_samples_parquet` of every sample (rows/s, file size);
* ``select samples`` (peer): reading the same rows from the database only.

    python bench/bench_alerts.py [--devices 1000] [--windows 10] [--samples 50000]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from device_agent.payloads import encode_array  # noqa: E402
from device_agent.protocol import LATENCY_BUCKETS_MS, telemetry_topic  # noqa: E402
from fleet_server.alerts.service import AlertEvaluator  # noqa: E402
from fleet_server.db.alerts import AlertRule  # noqa: E402
from fleet_server.db.models import Device, Group  # noqa: E402
from fleet_server.db.session import make_engine, make_sessionmaker, upgrade_database  # noqa: E402
from fleet_server.db.types import utcnow  # noqa: E402
from fleet_server.ingest import TelemetryWriter, parse_message  # noqa: E402
from fleet_server.metrics import ServerMetrics  # noqa: E402
from fleet_server.report.export import write_samples_parquet  # noqa: E402
from fleet_server.report.queries import Window, summarize  # noqa: E402

KINDS = [
    ("drift", "m", 0.2),
    ("error_rate", "m", 0.05),
    ("latency_p99", "m", 50.0),
    ("accuracy", "m", 0.9),
    ("silent", None, 0.0),
    ("stale", None, 0.0),
    ("records_lost", None, 10.0),
]


def fill(engine: object, devices: int, windows: int, samples: int, now: float) -> None:
    sessions = make_sessionmaker(engine)  # type: ignore[arg-type]
    with sessions() as s:
        s.add(Group(id="g-1", name="gateways", selector={"site": "north"}))
        s.flush()  # before the rules that name it
        for i in range(devices):
            s.add(
                Device(
                    id=f"cam-{i:05d}",
                    device_class="cam",
                    labels={"site": "north"},
                    credential_hash=f"{i:064d}",
                    last_seen_at=utcnow(),
                )
            )
        for i, (kind, model, threshold) in enumerate(KINDS):
            s.add(
                AlertRule(
                    id=f"ar-{i}",
                    name=f"r-{kind}",
                    kind=kind,
                    group_id="g-1",
                    model=model,
                    threshold=threshold,
                    clear_threshold=threshold * 0.8 if kind != "accuracy" else 0.92,
                    window_seconds=600,
                    for_seconds=0,
                    min_samples=0,
                    webhooks=[],
                    enabled=True,
                    created_by="bench",
                )
            )
        s.commit()
    writer = TelemetryWriter(engine)  # type: ignore[arg-type]
    hist = [0] * (len(LATENCY_BUCKETS_MS) + 1)
    hist[8] = 99  # count - errors
    rng = np.random.default_rng(0)
    per_device = max(samples // devices, 1)
    for i in range(devices):
        dev = f"cam-{i:05d}"
        recs = []
        seq = 0
        for w in range(windows):
            seq += 1
            body = {
                "window_start": now - 600 + w * 50,
                "window_end": now - 550 + w * 50,
                "name": "m",
                "version": 1,
                "count": 100,
                "errors": 1,
                "latency_ms": {"p50": 4, "p95": 4, "p99": 4, "mean": 4},
                "latency_hist": hist,
                "drift": {
                    "features": [
                        {"name": f"f{k}", "psi": 0.05, "counts": [5] * 10} for k in range(16)
                    ],
                    "psi_max": 0.05,
                },
                "shadow": None,
                "dropped": {},
                "labels": {"count": 10, "correct": 9, "labelled": [10], "correct_by_class": [9]},
            }
            recs.append({"seq": seq, "kind": "summary", "ts": now - 300, "body": body})
        payload = json.dumps({"device_id": dev, "records": recs}).encode()
        msgs = [parse_message(telemetry_topic(dev, "summary"), payload, now - 300)]
        srecs = [
            {
                "seq": seq + 1 + k,
                "kind": "samples",
                "ts": now - 200,
                "body": {
                    "name": "m",
                    "version": 1,
                    "predicted": 2,
                    "inputs": {"x": encode_array(rng.normal(size=(1, 16)).astype(np.float32))},
                    "outputs": {"y": encode_array(rng.dirichlet([1, 1, 1], 1).astype(np.float32))},
                },
            }
            for k in range(per_device)
        ]
        payload = json.dumps({"device_id": dev, "records": srecs}).encode()
        msgs.append(parse_message(telemetry_topic(dev, "samples"), payload, now - 200))
        for m in msgs:
            assert not m.rejected, m.rejected
        writer.write(msgs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--windows", type=int, default=10)
    ap.add_argument("--samples", type=int, default=50_000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        engine = make_engine(f"sqlite:///{tmp}/bench.db")
        upgrade_database(engine)
        now = time.time()
        t = time.perf_counter()
        fill(engine, args.devices, args.windows, args.samples, now)
        print(f"filled in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        sessions = make_sessionmaker(engine)
        evaluator = AlertEvaluator(engine, sessions, ServerMetrics())
        rounds = []
        for _ in range(args.rounds):
            t = time.perf_counter()
            evaluator.run_once(now=now)
            rounds.append(time.perf_counter() - t)
        devices = {f"cam-{i:05d}" for i in range(args.devices)}
        with sessions() as s:
            t = time.perf_counter()
            figures = summarize(s, Window(name="m", since=now - 600, until=now, devices=devices))
            peer = time.perf_counter() - t
        assert figures["inferences"] == args.devices * args.windows * 100, figures["inferences"]
        out = Path(tmp) / "samples.parquet"
        exports = []
        for _ in range(3):
            with sessions() as s:
                t = time.perf_counter()
                stats = write_samples_parquet(s, out, model="m", since=now - 3600, until=now)
                exports.append(time.perf_counter() - t)
        with sessions() as s:
            from sqlalchemy import text

            t = time.perf_counter()
            n = sum(1 for _ in s.execute(text("SELECT body FROM telemetry_samples")))
            select_s = time.perf_counter() - t
        size = os.path.getsize(out)
        engine.dispose()
    summaries = args.devices * args.windows
    buf = io.StringIO()
    buf.write(
        f"{args.devices} devices, {summaries} summaries in the window, {stats.rows} samples\n"
    )
    buf.write("| operation | time (s) | rate |\n|---|---:|---:|\n")
    med = statistics.median(rounds)
    buf.write(f"| alert round, 7 rules | {med:.3f} | {med / len(KINDS) * 1000:.0f} ms per rule |\n")
    buf.write(
        f"| report summarize, 1 model figure set (peer) | {peer:.3f} "
        f"| {summaries / peer:,.0f} rows/s |\n"
    )
    ex = statistics.median(exports)
    buf.write(
        f"| samples export to Parquet | {ex:.3f} "
        f"| {stats.rows / ex:,.0f} rows/s, {size / 1e6:.1f} MB |\n"
    )
    buf.write(
        f"| SELECT the sample bodies only (peer) | {select_s:.3f} | {n / select_s:,.0f} rows/s |\n"
    )
    print(buf.getvalue(), end="")


if __name__ == "__main__":
    main()
