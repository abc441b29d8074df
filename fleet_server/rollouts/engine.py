"""The rollout decision function and the state transitions, all pure.

``decide(spec, state, metrics, now)`` looks at one rollout and returns a
:class:`Decision`; ``apply_decision`` turns it into the next state. Operator
actions (start, pause, resume, promote, abort, rollback) are pure transitions
too. Nothing here does I/O; :mod:`.scheduler` is the loop around it.

Invariants ``decide`` keeps (tested exhaustively in tests/test_rollout_engine.py):

* a breaching gate (with its minimum samples met) pauses or rolls back, per the
  spec's failure policy, at any time, also during soak;
* it never advances or completes while a gate breaches or waits for samples,
  before the stage's soak time has passed, or with fewer canary devices
  reporting than the stage's ``min_devices``;
* every decision carries every gate's figures, the soak and device counts and
  the cohort metrics, so the audit log shows the numbers that drove it;
* only a running (or pending: start) rollout moves; the others hold.

The whole status graph is the table :data:`TRANSITIONS`:
``(status, action) -> status``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from fleet_server.rollouts.errors import InvalidTransitionError
from fleet_server.rollouts.gates import (
    CohortMetrics,
    CohortStats,
    GateResult,
    Verdict,
    evaluate_gates,
    skipped,
)
from fleet_server.rollouts.spec import (
    BundleRef,
    FailurePolicy,
    GateKind,
    HistoryEntry,
    RolloutSpec,
    RolloutState,
    Status,
    Strategy,
)

P, R, PA, S, RB, A = (
    Status.PENDING,
    Status.RUNNING,
    Status.PAUSED,
    Status.SUCCEEDED,
    Status.ROLLED_BACK,
    Status.ABORTED,
)

#: every allowed transition: (status, action) -> new status
TRANSITIONS: dict[tuple[Status, str], Status] = {
    (P, "start"): R,
    (R, "advance"): R,
    (R, "complete"): S,
    (R, "pause"): PA,
    (PA, "resume"): R,
    (R, "promote"): R,
    (PA, "promote"): R,
    (R, "promote_last"): S,
    (PA, "promote_last"): S,
    (P, "abort"): A,
    (R, "abort"): A,
    (PA, "abort"): A,
    (R, "rollback"): RB,
    (PA, "rollback"): RB,
    (S, "rollback"): RB,
    (A, "rollback"): RB,
}

ENGINE_ACTOR = "engine"


class Action(str, Enum):
    ADVANCE = "advance"
    HOLD = "hold"
    PAUSE = "pause"
    ROLLBACK = "rollback"
    COMPLETE = "complete"


@dataclass(frozen=True)
class Decision:
    """What the engine decided for one rollout and every number behind it."""

    rollout_id: str
    action: Action
    reason: str
    at: float
    status: Status
    stage: int
    to_stage: int | None
    gates: tuple[GateResult, ...]
    soak_elapsed: float | None
    soak_required: float | None
    canary_devices: int
    min_devices: int | None
    metrics: CohortMetrics
    live_control: bool

    @property
    def changes_state(self) -> bool:
        return self.action is not Action.HOLD

    def to_json(self) -> dict[str, Any]:
        return {
            "rollout_id": self.rollout_id,
            "action": self.action.value,
            "reason": self.reason,
            "at": self.at,
            "status": self.status.value,
            "stage": self.stage,
            "to_stage": self.to_stage,
            "gates": [g.to_json() for g in self.gates],
            "soak_elapsed": self.soak_elapsed,
            "soak_required": self.soak_required,
            "canary_devices": self.canary_devices,
            "min_devices": self.min_devices,
            "live_control": self.live_control,
            "metrics": self.metrics.to_json(),
        }


def has_live_control(spec: RolloutSpec, stage: int) -> bool:
    """Whether stage ``stage`` leaves devices on the previous bundle to compare with."""
    if spec.previous is None or spec.strategy is Strategy.ALL_AT_ONCE:
        return False
    if spec.strategy is Strategy.SHADOW:
        return True  # shadow members keep serving the previous model
    return stage >= 0 and spec.stages[stage].percent < 100


def decide(spec: RolloutSpec, state: RolloutState, metrics: CohortMetrics, now: float) -> Decision:
    """Decide what to do with one rollout now. Pure; see the module invariants."""
    state.check_fits(spec)
    stage = state.stage
    live = has_live_control(spec, stage)

    def mk(
        action: Action,
        reason: str,
        to_stage: int | None = None,
        gates: tuple[GateResult, ...] = (),
        soak: float | None = None,
        need: float | None = None,
        min_dev: int | None = None,
    ) -> Decision:
        return Decision(
            spec.rollout_id,
            action,
            reason,
            now,
            state.status,
            stage,
            to_stage,
            gates,
            soak,
            need,
            metrics.canary.devices,
            min_dev,
            metrics,
            live,
        )

    if state.status is Status.PENDING:
        return mk(Action.ADVANCE, "start: entering stage 0", to_stage=0)
    if state.status is not Status.RUNNING:
        return mk(Action.HOLD, f"rollout is {state.status.value}; the engine does not move it")

    st = spec.stages[stage]
    baseline = CohortStats.from_json(state.baseline) if state.baseline else None
    results = tuple(
        skipped(g, "no previous model: the candidate replaces nothing to agree with")
        if g.kind is GateKind.SHADOW_AGREEMENT
        and spec.previous is None
        and spec.strategy is not Strategy.SHADOW
        else r
        for g, r in zip(
            spec.gates,
            evaluate_gates(spec.gates, metrics, live_control=live, baseline=baseline),
            strict=True,
        )
    )
    assert state.stage_started_at is not None  # check_fits
    elapsed = max(0.0, now - state.stage_started_at)

    def gated(action: Action, reason: str, to_stage: int | None = None) -> Decision:
        return mk(action, reason, to_stage, results, elapsed, st.soak_seconds, st.min_devices)

    breached = [r for r in results if r.verdict is Verdict.BREACH]
    if breached:
        names = ", ".join(f"{r.name} ({r.detail})" for r in breached)
        policy_action = (
            Action.ROLLBACK if spec.failure_policy is FailurePolicy.ROLLBACK else Action.PAUSE
        )
        return gated(policy_action, f"gate breached: {names}")
    empty = _empty_cohort(spec, stage, metrics)
    if empty:
        return gated(Action.HOLD, empty)
    if elapsed < st.soak_seconds:
        return gated(Action.HOLD, f"soaking: {elapsed:.0f} of {st.soak_seconds:.0f} s")
    waiting = [r.name for r in results if r.verdict is Verdict.WAIT]
    if waiting or metrics.canary.devices < st.min_devices:
        silent = _no_traffic(spec, stage, metrics, elapsed)
        if silent:
            also = f" (gates waiting: {', '.join(waiting)})" if waiting else ""
            return gated(Action.HOLD, f"{silent}{also}")
    small = _small_cohort(spec, stage, metrics)
    if small:
        return gated(Action.HOLD, small)
    if metrics.canary.devices < st.min_devices:
        return gated(
            Action.HOLD,
            f"waiting for devices: {metrics.canary.devices} of "
            f"{st.min_devices} canary devices reporting",
        )
    if waiting:
        quiet = metrics.canary.silent
        also = (
            f"; no predictions yet from {_names(quiet, metrics.canary.silent_count)}"
            if quiet
            else ""
        )
        return gated(
            Action.HOLD,
            f"waiting for samples: {', '.join(waiting)}{also}{_no_figures(spec, results, metrics)}",
        )
    if stage >= spec.last_stage:
        return gated(Action.COMPLETE, "all gates passed at the last stage")
    return gated(Action.ADVANCE, f"all gates passed; stage {stage} -> {stage + 1}", stage + 1)


def _no_figures(spec: RolloutSpec, results: tuple[GateResult, ...], metrics: CohortMetrics) -> str:
    """What a gate that gets no figures at all, while the canaries predict, waits for."""
    canary, out = metrics.canary, []
    for r in results:
        if r.verdict is not Verdict.WAIT or canary.inferences < r.min_samples:
            continue
        if (
            r.kind == GateKind.SHADOW_AGREEMENT.value
            and spec.strategy is not Strategy.SHADOW
            and not canary.shadow_runs
        ):
            out.append(
                f"{r.name} has no comparison from the {canary.inferences} canary predictions: "
                "the canaries do not run the model they replaced (telemetry."
                "compare_previous_rate = 0, a candidate whose inputs or outputs differ from "
                "the replaced model's, or agents older than this server); enable it or "
                "drop the gate"
            )
        elif r.kind == GateKind.ACCURACY.value and not canary.labels:
            out.append(
                f"{r.name} has no label among the {canary.inferences} canary predictions: "
                "apps post true classes with POST /v2/models/"
                f"{spec.bundle.name}/labels (or ServingClient.label, Agent.label); have "
                "them do so, or drop the gate"
            )
    return "".join(f"; {x}" for x in out)


def _names(ids: tuple[str, ...], total: int) -> str:
    more = total - len(ids)
    return ", ".join(ids) + (f" and {more} more" if more > 0 else "")


def _empty_cohort(spec: RolloutSpec, stage: int, metrics: CohortMetrics) -> str | None:
    """Why a stage whose cohort holds no device can never pass, and what to do."""
    canary, control = metrics.canary, metrics.control
    if canary.members is None or canary.members > 0:
        return None
    group = canary.members + (control.members or 0)
    percent = spec.stages[stage].percent
    return (
        f"empty cohort: stage {stage} takes {percent:g}% of the group's {group} devices and "
        "that selects none of them, so no canary can report; raise the stage's percent "
        "(or add devices to the group), or promote or abort the rollout by hand"
    )


def _small_cohort(spec: RolloutSpec, stage: int, metrics: CohortMetrics) -> str | None:
    """Why a stage whose cohort holds fewer devices than it needs can never advance."""
    canary, control = metrics.canary, metrics.control
    st = spec.stages[stage]
    if canary.members is None or not 0 < canary.members < st.min_devices:
        return None
    group = canary.members + (control.members or 0)
    return (
        f"cohort too small: stage {stage} takes {st.percent:g}% of the group's {group} "
        f"devices, which selects {canary.members}, but the stage needs {st.min_devices} "
        "canary devices reporting to advance; lower the stage's min_devices or add devices "
        "to the group, or promote or abort the rollout by hand"
    )


def _no_traffic(
    spec: RolloutSpec, stage: int, metrics: CohortMetrics, elapsed: float
) -> str | None:
    """Why a stage whose canaries all sit idle waits forever, and what to do."""
    canary = metrics.canary
    if not canary.members or canary.silent_count < canary.members or canary.inferences:
        return None
    # members that installed in an earlier stage report no install in this one
    installed = max(canary.installs, canary.running or 0)
    if spec.strategy is not Strategy.SHADOW and installed < canary.members:
        return None  # not every canary has installed yet: that is what it waits for
    return (
        f"no traffic: none of the {canary.members} canary devices "
        f"({_names(canary.silent, canary.silent_count)}) sent a prediction in the "
        f"{elapsed:.0f} s since stage {stage} started; the candidate is installed but no "
        "application calls it. Have the device's apps call the agent (the local endpoint "
        f"POST /v2/models/{spec.bundle.name}/infer on <state_dir>/serving.sock, "
        "device_agent.serving.client.ServingClient, or Agent.predict() in-process), or "
        "promote or abort the rollout by hand"
    )


# -- transitions -------------------------------------------------------------------


def _transition(
    spec: RolloutSpec,
    state: RolloutState,
    action: str,
    now: float,
    actor: str,
    reason: str,
    **changes: Any,
) -> RolloutState:
    new_status = TRANSITIONS.get((state.status, action))
    if new_status is None:
        allowed = sorted(a for (s, a) in TRANSITIONS if s is state.status)
        raise InvalidTransitionError(
            f"rollout {spec.rollout_id} is {state.status.value}; cannot {action} it"
            + (f" (allowed: {', '.join(allowed)})" if allowed else " (it has ended)")
        )
    stage = changes.get("stage", state.stage)
    entry = HistoryEntry(now, action, actor, state.status, new_status, stage, reason)
    return state.evolve(status=new_status, history=(*state.history, entry), **changes)


def apply_decision(
    spec: RolloutSpec,
    state: RolloutState,
    decision: Decision,
    *,
    rollback_bundle: BundleRef | None = None,
) -> RolloutState:
    """The state after ``decision`` (made by :func:`decide` on this very state).

    A rollback needs ``rollback_bundle``, the previous model re-published under a
    higher version (:mod:`.republish`), unless the rollout has no previous bundle.
    """
    if (
        decision.rollout_id != spec.rollout_id
        or decision.stage != state.stage
        or decision.status is not state.status
    ):
        raise InvalidTransitionError(
            f"decision for {decision.rollout_id} at {decision.status.value}/stage "
            f"{decision.stage} does not match the rollout's current state; decide again"
        )
    now, why = decision.at, decision.reason
    act = decision.action
    if act is Action.HOLD:
        return state
    if act is Action.ADVANCE and state.status is Status.PENDING:
        return start(spec, state, now, ENGINE_ACTOR)
    if act is Action.ADVANCE:
        baseline = state.baseline
        if decision.live_control:
            baseline = decision.metrics.control.to_json()
        return _transition(
            spec,
            state,
            "advance",
            now,
            ENGINE_ACTOR,
            why,
            stage=state.stage + 1,
            stage_started_at=now,
            baseline=baseline,
        )
    if act is Action.COMPLETE:
        return _transition(spec, state, "complete", now, ENGINE_ACTOR, why)
    if act is Action.PAUSE:
        return _transition(spec, state, "pause", now, ENGINE_ACTOR, why)
    return rollback(spec, state, now, ENGINE_ACTOR, rollback_bundle, why)


def start(spec: RolloutSpec, state: RolloutState, now: float, actor: str) -> RolloutState:
    """pending -> running at stage 0."""
    return _transition(spec, state, "start", now, actor, "start", stage=0, stage_started_at=now)


def pause(
    spec: RolloutSpec, state: RolloutState, now: float, actor: str, reason: str = ""
) -> RolloutState:
    """running -> paused; the cohorts stay as they are."""
    return _transition(spec, state, "pause", now, actor, reason)


def resume(
    spec: RolloutSpec, state: RolloutState, now: float, actor: str, reason: str = ""
) -> RolloutState:
    """paused -> running; the current stage's soak time starts again."""
    return _transition(spec, state, "resume", now, actor, reason, stage_started_at=now)


def promote(
    spec: RolloutSpec,
    state: RolloutState,
    now: float,
    actor: str,
    reason: str = "",
    *,
    to_end: bool = False,
) -> RolloutState:
    """Skip the gates: move to the next stage (running), or finish at the last stage."""
    if to_end or state.stage >= spec.last_stage:
        return _transition(spec, state, "promote_last", now, actor, reason)
    return _transition(
        spec, state, "promote", now, actor, reason, stage=state.stage + 1, stage_started_at=now
    )


def abort(
    spec: RolloutSpec, state: RolloutState, now: float, actor: str, reason: str = ""
) -> RolloutState:
    """Stop the rollout where it stands: members keep the candidate, the rest the previous."""
    return _transition(spec, state, "abort", now, actor, reason)


def rollback(
    spec: RolloutSpec,
    state: RolloutState,
    now: float,
    actor: str,
    rollback_bundle: BundleRef | None,
    reason: str = "",
) -> RolloutState:
    """Send every device of the group to the re-published previous model.

    A shadow rollout never served its candidate, so rolling it back only withdraws
    the shadow: devices keep (or return to) the previous bundle as it is.
    """
    if spec.previous is not None and spec.strategy is not Strategy.SHADOW:
        if rollback_bundle is None:
            raise InvalidTransitionError(
                f"rollout {spec.rollout_id}: re-publish the previous bundle under version "
                f">= {spec.rollback_version()} (fleet_server.rollouts.republish) and pass it "
                "as rollback_bundle"
            )
        if rollback_bundle.bundle_id != spec.previous.bundle_id and (
            rollback_bundle.name != spec.previous.name
            or rollback_bundle.version < spec.rollback_version()
        ):
            raise InvalidTransitionError(
                f"rollback bundle {rollback_bundle.name} v{rollback_bundle.version} must be "
                f"model {spec.previous.name} at version >= {spec.rollback_version()}, or "
                "devices that installed the candidate refuse it as a downgrade"
            )
    return _transition(spec, state, "rollback", now, actor, reason, rollback_bundle=rollback_bundle)


OPERATOR_ACTIONS = ("start", "pause", "resume", "promote", "abort", "rollback")
