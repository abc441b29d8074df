"""The scheduler loop: one leader decides, states are saved optimistically, decisions audited."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fleet_server.rollouts import (
    Action,
    BundleRef,
    CohortMetrics,
    Decision,
    RolloutSpec,
    RolloutState,
    Stage,
    Status,
    changed_devices,
    pause,
)
from fleet_server.rollouts.cohort import stage_members
from fleet_server.rollouts.leader import FileLeaderLock, SoleLeader
from fleet_server.rollouts.scheduler import RolloutScheduler
from tests.fleet_server.rollouts.test_engine import NEW, OLD, RB, SCENARIO_GATES, T0
from tests.fleet_server.rollouts.test_gates import cohort

DEVICES = [f"dev-{i:03d}" for i in range(200)]


@dataclass
class MemoryRepo:
    """An in-memory implementation of the RolloutRepository protocol."""

    metrics: Callable[[RolloutSpec, RolloutState], CohortMetrics]
    rollouts: dict[str, tuple[RolloutSpec, RolloutState]] = field(default_factory=dict)
    audit: list[Decision] = field(default_factory=list)
    notified: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    fail_for: set[str] = field(default_factory=set)

    def add(self, spec: RolloutSpec) -> None:
        self.rollouts[spec.rollout_id] = (spec, RolloutState())

    def active_rollouts(self) -> Sequence[tuple[RolloutSpec, RolloutState]]:
        with self.lock:
            return [
                (s, st)
                for s, st in self.rollouts.values()
                if st.status in (Status.PENDING, Status.RUNNING)
            ]

    def cohort_metrics(self, spec: RolloutSpec, state: RolloutState, now: float) -> CohortMetrics:
        if spec.rollout_id in self.fail_for:
            raise RuntimeError("telemetry database unavailable")
        return self.metrics(spec, state)

    def prepare_rollback_bundle(self, spec: RolloutSpec) -> BundleRef | None:
        return RB

    def save_state(self, spec: RolloutSpec, expected: RolloutState, new: RolloutState) -> bool:
        with self.lock:
            if self.rollouts[spec.rollout_id][1] != expected:
                return False
            self.rollouts[spec.rollout_id] = (spec, new)
            return True

    def append_audit(self, decision: Decision) -> None:
        with self.lock:
            self.audit.append(decision)

    def notify_changed(self, spec: RolloutSpec, before: RolloutState, after: RolloutState) -> int:
        changed = changed_devices(spec, before, after, DEVICES)
        self.notified.extend(changed)
        return len(changed)

    def state(self, rollout_id: str) -> RolloutState:
        return self.rollouts[rollout_id][1]


def spec(rollout_id: str = "r-s") -> RolloutSpec:
    return RolloutSpec(
        rollout_id,
        NEW,
        OLD,
        {"site": "a"},
        stages=(Stage(10, 1, 60), Stage(50, 1, 60), Stage(100, 1, 60)),
        gates=SCENARIO_GATES,
    )


def healthy(_spec: RolloutSpec, _state: RolloutState) -> CohortMetrics:
    return CohortMetrics(cohort(seed=1), cohort(seed=2))


def erroring(_spec: RolloutSpec, _state: RolloutState) -> CohortMetrics:
    return CohortMetrics(cohort(error_rate=0.1, seed=1), cohort(seed=2))


class Clock:
    def __init__(self) -> None:
        self.t = T0

    def __call__(self) -> float:
        return self.t


def test_healthy_rollout_is_driven_to_success_and_every_step_audited() -> None:
    repo, clock = MemoryRepo(healthy), Clock()
    repo.add(spec())
    sched = RolloutScheduler(repo, SoleLeader(), clock=clock)
    for _ in range(10):
        sched.tick()
        clock.t += 61
    assert repo.state("r-s").status is Status.SUCCEEDED
    actions = [d.action for d in repo.audit]
    assert actions == [Action.ADVANCE] * 3 + [Action.COMPLETE]
    assert all(d.to_json()["gates"] for d in repo.audit[1:])
    # every device was told exactly once: when its assignment changed to the candidate
    assert sorted(repo.notified) == DEVICES


def test_erroring_rollout_is_rolled_back_and_devices_notified() -> None:
    repo, clock = MemoryRepo(erroring), Clock()
    repo.add(spec())
    sched = RolloutScheduler(repo, SoleLeader(), clock=clock)
    sched.tick()  # start
    sched.tick()  # breach
    st = repo.state("r-s")
    assert st.status is Status.ROLLED_BACK and st.rollback_bundle == RB
    last = repo.audit[-1].to_json()
    assert last["action"] == "rollback"
    err = next(g for g in last["gates"] if g["name"] == "error_rate")
    assert err["verdict"] == "breach" and err["canary_value"] > err["control_value"]
    # stage-0 members were told on start; then everyone moves to the rollback bundle
    canaries = stage_members(spec(), 0, DEVICES)
    assert canaries and sorted(repo.notified) == sorted(DEVICES + canaries)


def test_holds_are_audited_once_per_reason() -> None:
    repo, clock = MemoryRepo(healthy), Clock()
    repo.add(spec())
    sched = RolloutScheduler(repo, SoleLeader(), clock=clock)
    for _ in range(5):
        sched.tick()
        clock.t += 1  # still soaking
    holds = [d for d in repo.audit if d.action is Action.HOLD]
    assert len(holds) == 1 and holds[0].reason.startswith("soaking")


def test_decision_is_dropped_when_operator_changed_the_rollout_meanwhile() -> None:
    repo, clock = MemoryRepo(healthy), Clock()
    repo.add(spec())
    sched = RolloutScheduler(repo, SoleLeader(), clock=clock)
    sched.tick()
    clock.t += 61

    def operator_pauses_first(s: RolloutSpec, st: RolloutState) -> CohortMetrics:
        repo.rollouts[s.rollout_id] = (s, pause(s, st, clock.t, "alice"))
        return healthy(s, st)

    repo.metrics = operator_pauses_first
    assert sched.tick() == []
    assert repo.state("r-s").status is Status.PAUSED
    assert [d.action for d in repo.audit] == [Action.ADVANCE]  # only the start


def test_one_failing_rollout_does_not_stop_the_others() -> None:
    repo, clock = MemoryRepo(healthy), Clock()
    repo.add(spec("r-bad"))
    repo.add(spec("r-good"))
    repo.fail_for.add("r-bad")
    RolloutScheduler(repo, SoleLeader(), clock=clock).tick()
    assert repo.state("r-good").status is Status.RUNNING
    assert repo.state("r-bad").status is Status.PENDING


def test_only_the_leader_decides_and_the_other_takes_over(tmp_path: Path) -> None:
    repo, clock = MemoryRepo(healthy), Clock()
    repo.add(spec())
    lock_path = tmp_path / "server.db.leader.lock"
    a = RolloutScheduler(repo, FileLeaderLock(lock_path), clock=clock)
    b = RolloutScheduler(repo, FileLeaderLock(lock_path), clock=clock)
    assert len(a.tick()) == 1 and b.tick() == []
    assert a.rounds == 1 and b.rounds == 0
    a.stop()  # gives up leadership
    clock.t += 61
    assert [d.action for d in b.tick()] == [Action.ADVANCE]
    assert b.rounds == 1
    b.stop()


def test_background_thread_runs_rounds_until_stopped() -> None:
    repo = MemoryRepo(healthy)
    repo.add(spec())
    sched = RolloutScheduler(repo, SoleLeader(), interval=0.01)
    sched.start()
    deadline = time.monotonic() + 10
    while repo.state("r-s").status is Status.PENDING and time.monotonic() < deadline:
        time.sleep(0.01)
    sched.stop()
    assert repo.state("r-s").status is Status.RUNNING and not sched.leading


class NoKeyRepo(MemoryRepo):
    """A server without its signing key: the previous model cannot be re-published."""

    def prepare_rollback_bundle(self, spec: RolloutSpec) -> BundleRef | None:
        raise RuntimeError("rolling back needs the server signing key")


def test_breach_without_a_way_to_roll_back_pauses_and_says_why() -> None:
    repo, clock = NoKeyRepo(erroring), Clock()
    repo.add(spec())
    sched = RolloutScheduler(repo, SoleLeader(), clock=clock)
    sched.tick()  # start
    sched.tick()  # breach, but no rollback bundle can be made
    st = repo.state("r-s")
    assert st.status is Status.PAUSED
    last = repo.audit[-1].to_json()
    assert last["action"] == "pause"
    assert "error_rate" in last["reason"] and "signing key" in last["reason"]
