"""The loop around :func:`~.engine.decide`: every N seconds, in one replica at a time.

Each round, in the replica holding the leader lock (:mod:`.leader`):

1. load the rollouts that can still move (pending and running);
2. aggregate each one's cohort metrics from telemetry (since its stage started);
3. ``decide``; for a rollback, have the previous bundle re-published first;
4. save the new state *only if the stored state is still the one decided on*
   (an operator may have paused it meanwhile: then the decision is dropped);
5. append the decision with all its numbers to the audit log;
6. notify the devices whose assignment changed.

Holds are audited only when their reason changes (not every round). One
rollout failing (a database error, a bundle that cannot be re-published) is
logged and does not stop the others. All I/O goes through the
:class:`RolloutRepository` Protocol the server implements.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from fleet_server.rollouts.engine import Action, Decision, apply_decision, decide
from fleet_server.rollouts.gates import CohortMetrics
from fleet_server.rollouts.leader import LeaderLock
from fleet_server.rollouts.spec import BundleRef, RolloutSpec, RolloutState, Strategy

log = logging.getLogger(__name__)


class RolloutRepository(Protocol):
    """Everything the scheduler needs from storage, telemetry and the broker."""

    def active_rollouts(self) -> Sequence[tuple[RolloutSpec, RolloutState]]:
        """Rollouts that are pending or running."""

    def cohort_metrics(self, spec: RolloutSpec, state: RolloutState, now: float) -> CohortMetrics:
        """Canary and control figures of the rollout's current stage (since it started)."""

    def prepare_rollback_bundle(self, spec: RolloutSpec) -> BundleRef | None:
        """Re-publish the previous bundle under ``spec.rollback_version()`` (or reuse it)."""

    def save_state(self, spec: RolloutSpec, expected: RolloutState, new: RolloutState) -> bool:
        """Store ``new`` if the stored state still equals ``expected``; False otherwise."""

    def append_audit(self, decision: Decision) -> None:
        """Record an automatic decision (actor: the engine) with its numbers."""

    def notify_changed(self, spec: RolloutSpec, before: RolloutState, after: RolloutState) -> int:
        """Tell the devices whose assignment changed to pull now; returns how many."""


class RolloutScheduler:
    """Runs rounds of decisions while this process leads."""

    def __init__(
        self,
        repo: RolloutRepository,
        lock: LeaderLock,
        *,
        interval: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.repo = repo
        self.lock = lock
        self.interval = interval
        self.clock = clock
        self.rounds = 0
        self._last_hold: dict[str, str] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def leading(self) -> bool:
        return self.lock.still_leader()

    def tick(self) -> list[Decision]:
        """Take or confirm leadership, then run one round if leading."""
        try:
            leading = self.lock.try_acquire()
        except Exception:  # a database outage must not kill the loop
            log.exception("leader lock check failed; not leading this round")
            return []
        if not leading:
            self._last_hold.clear()
            return []
        return self.run_once()

    def run_once(self) -> list[Decision]:
        """One round over every active rollout (call only while leading)."""
        self.rounds += 1
        decisions = []
        for spec, state in self.repo.active_rollouts():
            if not self.lock.still_leader():
                log.warning("lost leadership during a round; stopping it")
                break
            try:
                d = self._one(spec, state)
            except Exception:
                log.exception("rollout %s: evaluation failed; retrying next round", spec.rollout_id)
                continue
            if d is not None:
                decisions.append(d)
        return decisions

    def _one(self, spec: RolloutSpec, state: RolloutState) -> Decision | None:
        now = self.clock()
        metrics = self.repo.cohort_metrics(spec, state, now)
        d = decide(spec, state, metrics, now)
        if d.action is Action.HOLD:
            key = d.reason.split(":")[0]
            if self._last_hold.get(spec.rollout_id) != key:
                self._last_hold[spec.rollout_id] = key
                self.repo.append_audit(d)
            return d
        self._last_hold.pop(spec.rollout_id, None)
        # a shadow candidate never served: rolling it back only withdraws it, and devices
        # keep the model they run, so nothing needs re-publishing
        rb = None
        if d.action is Action.ROLLBACK and spec.strategy is not Strategy.SHADOW:
            try:
                rb = self.repo.prepare_rollback_bundle(spec)
            except Exception as e:  # noqa: BLE001 - a breach must still stop the rollout
                # without a re-published previous model the devices cannot go back, but the
                # rollout must not spread further: pause it and say why
                log.exception("rollout %s: cannot prepare the rollback; pausing", spec.rollout_id)
                d = dataclasses.replace(
                    d,
                    action=Action.PAUSE,
                    reason=f"{d.reason}; rollback impossible ({e}); paused instead",
                )
        new = apply_decision(spec, state, d, rollback_bundle=rb)
        if not self.repo.save_state(spec, state, new):
            log.info(
                "rollout %s changed while deciding; dropping %s", spec.rollout_id, d.action.value
            )
            return None
        self.repo.append_audit(d)
        try:
            self.repo.notify_changed(spec, state, new)
        except Exception:  # devices also poll; a lost notification only delays them
            log.exception("rollout %s: notifying devices failed", spec.rollout_id)
        return d

    # -- background thread ----------------------------------------------------------

    def start(self) -> None:
        """Run :meth:`tick` every ``interval`` seconds in a daemon thread."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="rollout-scheduler", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.tick()
            self._stop.wait(self.interval)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread and give up leadership."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self.lock.release()
