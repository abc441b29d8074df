"""50,000 real predictions while the broker is down: the buffer stays bounded, the
summaries survive, and the dropped-sample counts reach the server once it is back."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from device_agent.agent import Agent
from device_agent.bundle import unpack_bundle
from device_agent.config import AgentConfig
from device_agent.model import load_model
from device_agent.reporter import Reporter
from device_agent.store import TelemetryStore
from tests.brokers import MosquittoBroker
from tests.brokers import broker_fixture as broker_fixture  # noqa: F401  (the ``broker`` fixture)
from tests.bundlesim import NOW, BundleSim
from tests.device_agent.test_reporter import (  # noqa: F401  (``cleanup`` fixture)
    TELEMETRY,
    cleanup,
    server_collector,
    transport_for,
)

MiB = 1024 * 1024


def test_broker_down_during_50k_predictions_buffer_bounded_and_drops_reported(
    broker: MosquittoBroker,
    sim: BundleSim,
    tmp_path: Path,
    cleanup: list,  # noqa: F811
) -> None:
    collector = server_collector(broker, cleanup, [TELEMETRY])
    broker.stop()

    unpack_bundle(sim.publish(version=3), tmp_path / "slot-a", sim.trust("release"), now=NOW)
    cfg = AgentConfig.from_dict(
        {
            "device": {"id": "dev-a", "state_dir": str(tmp_path)},
            "telemetry": {
                "window_seconds": 0.1,
                "sample_rate": 1.0,
                "max_db_bytes": MiB,
                "flush_interval_seconds": 0.02,
            },
        }
    )
    db = tmp_path / "telemetry.db"
    store = TelemetryStore(db, max_bytes=MiB)
    cleanup.append(store.close)
    agent = Agent(cfg, store, model=load_model(tmp_path / "slot-a", "a"))
    transport = transport_for(broker, cleanup)
    reporter = Reporter(store, transport, "dev-a", batch_size=200, inflight=20).start()
    cleanup.append(reporter.stop)

    rng = np.random.default_rng(0)
    largest = 0
    for _ in range(50):  # 50 x 1,000 predictions, spread over several windows
        x = rng.normal(size=(1000, 4)).astype(np.float32)
        for i in range(1000):
            agent.predict(x[i : i + 1])
        time.sleep(0.05)
        largest = max(
            largest, sum(os.path.getsize(p) for p in (db, Path(f"{db}-wal")) if p.exists())
        )
    agent.close()  # closes the last window
    assert largest <= MiB, f"the buffer grew to {largest} bytes; its bound is {MiB}"
    assert reporter.counters.published == 0
    dropped = store.stats()["dropped"]["samples"]
    assert dropped > 0, "the test must overflow the buffer to show the drop counts"
    buffered = {r.seq for r in store.pending(limit=1_000_000)}

    broker.start()
    reporter.notify()
    assert collector.wait_for_seqs(buffered, 60)
    records = [
        r for m in collector.snapshot() if "/telemetry/" in m.topic for r in m.json()["records"]
    ]
    summaries = [r["body"] for r in records if r["kind"] == "summary"]
    assert sum(s["count"] for s in summaries) == 50_000, "every prediction is in a summary"
    reported = sum((s.get("dropped") or {}).get("samples", 0) for s in summaries)
    # drops counted after the last summary was written wait for the next window's summary
    assert reported > 0
    assert reported + store.take_dropped()["samples"] == dropped
