"""Engine and ingestion together: devices publish over a real Mosquitto, the worker
stores it in SQLite, the aggregator feeds the scheduler, the scheduler decides."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import Engine

from device_agent.protocol import LATENCY_BUCKETS_MS, telemetry_topic
from fleet_server.db.session import make_engine
from fleet_server.db.telemetry import create_telemetry_tables
from fleet_server.ingest import IngestConfig, IngestWorker
from fleet_server.rollouts import (
    Action,
    CohortMetrics,
    GateKind,
    GateSpec,
    RolloutSpec,
    RolloutState,
    Stage,
    Status,
    assignment,
)
from fleet_server.rollouts.figures import telemetry_figures
from fleet_server.rollouts.leader import SoleLeader
from fleet_server.rollouts.scheduler import RolloutScheduler
from tests.brokers import MosquittoBroker
from tests.fleet_server.rollouts.test_engine import NEW, OLD, RB
from tests.fleet_server.rollouts.test_scheduler import MemoryRepo

GROUP = [f"cam-{i:02d}" for i in range(12)]


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    with MosquittoBroker(tmp_path / "broker") as b:
        yield b


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    eng = make_engine(f"sqlite:///{tmp_path / 'server.db'}")
    create_telemetry_tables(eng)
    yield eng
    eng.dispose()


def window(version: int, count: int, errors: int, latency_bucket: int) -> dict[str, Any]:
    hist = [0] * (len(LATENCY_BUCKETS_MS) + 1)
    hist[latency_bucket] = count - errors
    return {
        "window_start": 0.0,
        "window_end": 60.0,
        "name": "m",
        "version": version,
        "slot": "a",
        "rollout_id": None,
        "count": count,
        "errors": errors,
        "latency_ms": {"p95": LATENCY_BUCKETS_MS[latency_bucket]},
        "latency_hist": hist,
        "drift": None,
        "shadow": None,
        "dropped": {},
    }


class Fleet:
    """The group's devices: each reports one window for the model its assignment gives it."""

    def __init__(self, broker: MosquittoBroker) -> None:
        self.c = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id="fleet-sim", protocol=mqtt.MQTTv5
        )
        self.c.connect(broker.host, broker.port)
        self.c.loop_start()
        self.seq = dict.fromkeys(GROUP, 0)

    def report(
        self, spec: RolloutSpec, state: RolloutState, canary_errors: float, canary_bucket: int
    ) -> int:
        sent = 0
        for d in GROUP:
            desired = assignment(spec, state, d).desired
            assert desired is not None
            new = desired == NEW
            self.seq[d] += 1
            body = window(
                desired.version,
                200,
                int(200 * canary_errors) if new else 0,
                canary_bucket if new else 8,
            )
            raw = json.dumps(
                {
                    "device_id": d,
                    "records": [
                        {"seq": self.seq[d], "kind": "summary", "ts": time.time(), "body": body}
                    ],
                }
            )
            self.c.publish(telemetry_topic(d, "summary"), raw, qos=1).wait_for_publish(10)
            sent += 1
        return sent

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def spec() -> RolloutSpec:
    return RolloutSpec(
        "r-tele",
        NEW,
        OLD,
        {"site": "a"},
        stages=(Stage(40, min_devices=2, soak_seconds=0), Stage(100, 2, 0)),
        gates=(
            GateSpec(GateKind.ERROR_RATE, 0.02, min_samples=400),
            GateSpec(GateKind.LATENCY_P95_RATIO, 1.5, min_samples=400),
        ),
    )


def drive(
    broker: MosquittoBroker,
    engine: Engine,
    canary_errors: float,
    canary_bucket: int,
    rounds: int = 4,
) -> tuple[MemoryRepo, list[Action]]:
    def metrics(s: RolloutSpec, st: RolloutState) -> CohortMetrics:
        return telemetry_figures(engine, s, st.stage_started_at or 0.0, set(GROUP))

    repo = MemoryRepo(metrics)
    repo.add(spec())
    sched = RolloutScheduler(repo, SoleLeader())
    fleet = Fleet(broker)
    actions: list[Action] = []
    with IngestWorker(
        IngestConfig(host=broker.host, port=broker.port, client_id="ingest-t"), engine
    ) as worker:
        for _ in range(rounds):
            actions += [d.action for d in sched.tick() if d.action is not Action.HOLD]
            st = repo.state("r-tele")
            if st.terminal:
                break
            expected = worker.stats.records + fleet.report(spec(), st, canary_errors, canary_bucket)
            deadline = time.monotonic() + 15
            while worker.stats.stored < expected and time.monotonic() < deadline:
                time.sleep(0.02)
            assert worker.stats.stored == expected
    fleet.close()
    return repo, actions


def test_healthy_canary_telemetry_advances_the_rollout_to_success(
    broker: MosquittoBroker, engine: Engine
) -> None:
    repo, actions = drive(broker, engine, canary_errors=0.0, canary_bucket=8)
    assert actions == [Action.ADVANCE, Action.ADVANCE, Action.COMPLETE]
    assert repo.state("r-tele").status is Status.SUCCEEDED


def test_erroring_canary_telemetry_rolls_the_rollout_back(
    broker: MosquittoBroker, engine: Engine
) -> None:
    repo, actions = drive(broker, engine, canary_errors=0.15, canary_bucket=8)
    assert actions == [Action.ADVANCE, Action.ROLLBACK]
    st = repo.state("r-tele")
    assert st.status is Status.ROLLED_BACK and st.rollback_bundle == RB
    gate = next(g for g in repo.audit[-1].to_json()["gates"] if g["name"] == "error_rate")
    assert gate["verdict"] == "breach" and gate["canary_value"] >= 0.14


def test_slow_canary_telemetry_rolls_the_rollout_back(
    broker: MosquittoBroker, engine: Engine
) -> None:
    repo, actions = drive(broker, engine, canary_errors=0.0, canary_bucket=11)  # 20-50 ms
    assert actions == [Action.ADVANCE, Action.ROLLBACK]
    assert "latency_p95_ratio" in repo.audit[-1].reason
