"""The pure decision function and state transitions, tested exhaustively."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleet_server.rollouts import (
    TRANSITIONS,
    Action,
    BundleRef,
    CohortMetrics,
    CohortStats,
    FailurePolicy,
    GateKind,
    GateSpec,
    InvalidSpecError,
    InvalidStateError,
    InvalidTransitionError,
    RolloutSpec,
    RolloutState,
    Stage,
    Status,
    Strategy,
    Verdict,
    abort,
    apply_decision,
    assigned_bundle,
    decide,
    pause,
    promote,
    resume,
    rollback,
    start,
)
from fleet_server.rollouts.spec import SHADOW_GATE_KINDS, default_shadow_gates
from tests.fleet_server.rollouts.test_gates import cohort

OLD = BundleRef("b-old", "m", 3)
NEW = BundleRef("b-new", "m", 4)
RB = BundleRef("b-rb", "m", 5)
T0 = 1_800_000_000.0

# -- strategies ---------------------------------------------------------------------

stage_st = st.builds(
    Stage,
    percent=st.floats(0.5, 100),
    min_devices=st.integers(0, 20),
    soak_seconds=st.floats(0, 3600),
)
gate_st = st.builds(
    GateSpec,
    kind=st.sampled_from(list(GateKind)),
    threshold=st.floats(0, 2),
    min_samples=st.integers(1, 3000),
    against=st.sampled_from(["reference", "control"]),
    metric=st.sampled_from(["psi", "js"]),
)


@st.composite
def specs(draw: st.DrawFn) -> RolloutSpec:
    strategy = draw(st.sampled_from(list(Strategy)))
    if strategy is Strategy.ALL_AT_ONCE:
        stages = [Stage(100, draw(st.integers(0, 20)), draw(st.floats(0, 3600)))]
    else:
        stages = sorted(draw(st.lists(stage_st, min_size=1, max_size=5)), key=lambda s: s.percent)
    gates = draw(st.lists(gate_st, max_size=6))
    if strategy is Strategy.SHADOW:
        gates = [g for g in gates if g.kind in SHADOW_GATE_KINDS]
    gates = [
        GateSpec(
            g.kind, g.threshold, g.min_samples, against=g.against, metric=g.metric, name=f"g{i}"
        )
        for i, g in enumerate(gates)
    ]
    return RolloutSpec(
        "r-prop",
        NEW,
        draw(st.sampled_from([OLD, None])),
        {"site": "a"},
        strategy=strategy,
        stages=tuple(stages),
        gates=tuple(gates),
        failure_policy=draw(st.sampled_from(list(FailurePolicy))),
    )


count = st.integers(0, 5000)


@st.composite
def cohort_stats(draw: st.DrawFn) -> CohortStats:
    n = draw(count)
    installs = draw(st.integers(0, 30))
    return CohortStats(
        devices=draw(st.integers(0, 30)),
        installs=installs,
        install_failures=draw(st.integers(0, installs)),
        inferences=n,
        errors=draw(st.integers(0, n)),
        latency_hist=tuple(draw(st.lists(st.integers(0, 400), min_size=19, max_size=19))),
        drift_psi=draw(st.one_of(st.none(), st.floats(0, 3))),
        drift_samples=draw(count),
        feature_counts={"f0": tuple(draw(st.lists(st.integers(0, 500), min_size=4, max_size=4)))},
        prediction_counts=tuple(draw(st.lists(st.integers(0, 800), min_size=3, max_size=3))),
    )


metrics_st = st.builds(CohortMetrics, cohort_stats(), cohort_stats())


@st.composite
def running_cases(draw: st.DrawFn) -> tuple[RolloutSpec, RolloutState, CohortMetrics, float]:
    spec = draw(specs())
    stage = draw(st.integers(0, spec.last_stage))
    state = RolloutState(Status.RUNNING, stage, T0)
    baseline = draw(st.one_of(st.none(), cohort_stats()))
    if baseline is not None:
        state = state.evolve(baseline=baseline.to_json())
    return spec, state, draw(metrics_st), T0 + draw(st.floats(0, 7200))


# -- properties of decide() -----------------------------------------------------------


@settings(max_examples=400, deadline=None)
@given(running_cases())
def test_never_advances_or_completes_when_a_gate_breaches(case) -> None:  # type: ignore[no-untyped-def]
    spec, state, metrics, now = case
    d = decide(spec, state, metrics, now)
    if any(g.verdict is Verdict.BREACH for g in d.gates):
        assert d.action not in (Action.ADVANCE, Action.COMPLETE)
        want = Action.ROLLBACK if spec.failure_policy is FailurePolicy.ROLLBACK else Action.PAUSE
        assert d.action is want


@settings(max_examples=400, deadline=None)
@given(running_cases())
def test_advances_only_after_soak_with_min_devices_and_all_gates_decided(case) -> None:  # type: ignore[no-untyped-def]
    spec, state, metrics, now = case
    d = decide(spec, state, metrics, now)
    if d.action in (Action.ADVANCE, Action.COMPLETE):
        st_ = spec.stages[state.stage]
        assert now - T0 >= st_.soak_seconds
        assert metrics.canary.devices >= st_.min_devices
        assert all(g.verdict in (Verdict.PASS, Verdict.SKIP) for g in d.gates)
        assert (d.action is Action.COMPLETE) == (state.stage == spec.last_stage)


@settings(max_examples=400, deadline=None)
@given(running_cases())
def test_never_decides_a_gate_on_insufficient_samples(case) -> None:  # type: ignore[no-untyped-def]
    spec, state, metrics, now = case
    d = decide(spec, state, metrics, now)
    for g in d.gates:
        if g.verdict in (Verdict.PASS, Verdict.BREACH):
            assert g.canary_samples >= g.min_samples
            if g.control_source != "none":
                assert g.control_samples >= g.min_samples


@settings(max_examples=300, deadline=None)
@given(running_cases())
def test_every_decision_carries_the_numbers(case) -> None:  # type: ignore[no-untyped-def]
    spec, state, metrics, now = case
    d = decide(spec, state, metrics, now)
    j = json.loads(json.dumps(d.to_json(), allow_nan=False))
    assert [g["name"] for g in j["gates"]] == [g.name for g in spec.gates]
    for g in j["gates"]:
        assert {
            "canary_value",
            "control_value",
            "threshold",
            "canary_samples",
            "control_samples",
            "min_samples",
            "verdict",
        } <= set(g)
    assert j["soak_elapsed"] == pytest.approx(now - T0)
    assert j["soak_required"] == spec.stages[state.stage].soak_seconds
    assert j["canary_devices"] == metrics.canary.devices
    assert j["metrics"]["canary"]["inferences"] == metrics.canary.inferences
    assert j["reason"]


@settings(deadline=None)
@given(
    specs(),
    metrics_st,
    st.sampled_from([Status.PAUSED, Status.SUCCEEDED, Status.ROLLED_BACK, Status.ABORTED]),
)
def test_only_running_rollouts_move(
    spec: RolloutSpec, metrics: CohortMetrics, status: Status
) -> None:
    state = RolloutState(status, 0, T0)
    d = decide(spec, state, metrics, T0 + 10_000)
    assert d.action is Action.HOLD
    assert apply_decision(spec, state, d) == state


@settings(deadline=None)
@given(specs(), metrics_st)
def test_pending_rollout_starts_at_stage_zero(spec: RolloutSpec, metrics: CohortMetrics) -> None:
    d = decide(spec, RolloutState(), metrics, T0)
    assert (d.action, d.to_stage) == (Action.ADVANCE, 0)
    new = apply_decision(spec, RolloutState(), d)
    assert (new.status, new.stage, new.stage_started_at) == (Status.RUNNING, 0, T0)


# -- scenarios -------------------------------------------------------------------------

SCENARIO_GATES = (
    GateSpec(GateKind.INSTALL_FAILURE_RATE, 0.05, min_samples=1),
    GateSpec(GateKind.ERROR_RATE, 0.01, min_samples=500),
    GateSpec(GateKind.LATENCY_P95_RATIO, 1.5, min_samples=500),
    GateSpec(GateKind.DRIFT_PSI, 0.25, min_samples=500),
    GateSpec(GateKind.PREDICTION_SHIFT, 0.1, min_samples=500),
)


def scenario_spec(policy: FailurePolicy = FailurePolicy.ROLLBACK) -> RolloutSpec:
    return RolloutSpec(
        "r-scn",
        NEW,
        OLD,
        {"site": "a"},
        stages=(Stage(5, 1, 600), Stage(25, 2, 600), Stage(100, 3, 600)),
        gates=SCENARIO_GATES,
        failure_policy=policy,
    )


def run(
    spec: RolloutSpec, canary_kw: dict[str, float], steps: int = 12
) -> tuple[RolloutState, list[tuple[int, Action, str]]]:
    """Drive the engine every 10 minutes with the given canary behaviour."""
    state, now, log = RolloutState(), T0, []
    for i in range(steps):
        m = CohortMetrics(
            cohort(seed=2 * i, **canary_kw),  # type: ignore[arg-type]
            cohort(seed=2 * i + 1),
        )
        d = decide(spec, state, m, now)
        log.append((state.stage, d.action, d.reason))
        state = apply_decision(spec, state, d, rollback_bundle=RB)
        if state.terminal:
            break
        now += 601
    return state, log


def test_healthy_canary_advances_stage_by_stage_to_100_percent() -> None:
    state, log = run(scenario_spec(), {})
    assert state.status is Status.SUCCEEDED
    assert [a for _, a, _ in log] == [Action.ADVANCE] * 3 + [Action.COMPLETE]
    assert [h.stage for h in state.history] == [0, 1, 2, 2]
    assert assigned_bundle(scenario_spec(), state, "any-device") == NEW.bundle_id


@pytest.mark.parametrize(
    ("behaviour", "gate"),
    [
        ({"error_rate": 0.08}, "error_rate"),
        ({"drift_psi": 0.7}, "drift_psi"),
        ({"latency_ms": 15.0}, "latency_p95_ratio"),
        ({"shift": 0.6}, "prediction_shift"),
    ],
)
def test_bad_canary_is_rolled_back_by_the_named_gate(
    behaviour: dict[str, float], gate: str
) -> None:
    state, log = run(scenario_spec(), behaviour)
    assert state.status is Status.ROLLED_BACK
    _, action, reason = log[-1]
    assert action is Action.ROLLBACK and gate in reason
    assert state.rollback_bundle == RB
    assert assigned_bundle(scenario_spec(), state, "any-device") == RB.bundle_id


def test_pause_policy_pauses_instead_of_rolling_back() -> None:
    spec = scenario_spec(FailurePolicy.PAUSE)
    state = start(spec, RolloutState(), T0, "op")
    m = CohortMetrics(cohort(error_rate=0.08, seed=1), cohort(seed=2))
    d = decide(spec, state, m, T0 + 5)
    assert d.action is Action.PAUSE
    assert apply_decision(spec, state, d).status is Status.PAUSED


def test_breach_acts_during_soak() -> None:
    spec = scenario_spec()
    state = start(spec, RolloutState(), T0, "op")
    d = decide(spec, state, CohortMetrics(cohort(error_rate=0.08), cohort(seed=2)), T0 + 1)
    assert d.action is Action.ROLLBACK


def test_holds_until_soak_time_has_passed() -> None:
    spec = scenario_spec()
    state = start(spec, RolloutState(), T0, "op")
    m = CohortMetrics(cohort(seed=1), cohort(seed=2))
    assert decide(spec, state, m, T0 + 599).action is Action.HOLD
    assert "soaking" in decide(spec, state, m, T0 + 599).reason
    assert decide(spec, state, m, T0 + 600).action is Action.ADVANCE


def test_holds_until_min_devices_report() -> None:
    spec = scenario_spec()
    state = start(spec, RolloutState(), T0, "op").evolve(stage=1)
    few = CohortMetrics(cohort(devices=1, seed=1), cohort(seed=2))
    d = decide(spec, state, few, T0 + 700)
    assert d.action is Action.HOLD and "1 of 2" in d.reason


def test_holds_while_gates_wait_for_samples() -> None:
    spec = scenario_spec()
    state = start(spec, RolloutState(), T0, "op")
    thin = CohortMetrics(cohort(n=100, seed=1), cohort(seed=2))
    d = decide(spec, state, thin, T0 + 700)
    assert d.action is Action.HOLD and "waiting for samples" in d.reason


def test_last_stage_compares_with_baseline_control_recorded_on_advance() -> None:
    spec = scenario_spec()
    state, _ = run(spec, {}, steps=3)  # advanced into the 100 % stage
    assert state.stage == 2 and state.baseline is not None
    slow = CohortMetrics(cohort(latency_ms=15.0, seed=9), CohortStats())
    d = decide(spec, state, slow, state.stage_started_at + 601)  # type: ignore[operator]
    lat = next(g for g in d.gates if g.name == "latency_p95_ratio")
    assert lat.control_source == "baseline" and d.action is Action.ROLLBACK


def test_stale_decision_is_refused() -> None:
    spec = scenario_spec()
    state = start(spec, RolloutState(), T0, "op")
    d = decide(spec, state, CohortMetrics(cohort(seed=1), cohort(seed=2)), T0 + 700)
    moved = apply_decision(spec, state, d)
    with pytest.raises(InvalidTransitionError, match="decide again"):
        apply_decision(spec, moved, d)


# -- operator actions --------------------------------------------------------------------

ACTIONS = {
    "start": lambda sp, s: start(sp, s, T0, "op"),
    "pause": lambda sp, s: pause(sp, s, T0, "op"),
    "resume": lambda sp, s: resume(sp, s, T0, "op"),
    "promote": lambda sp, s: promote(sp, s, T0, "op"),
    "abort": lambda sp, s: abort(sp, s, T0, "op"),
    "rollback": lambda sp, s: rollback(sp, s, T0, "op", RB),
}


def _allowed(status: Status, action: str) -> bool:
    if action == "promote":
        return (status, "promote") in TRANSITIONS or (status, "promote_last") in TRANSITIONS
    return (status, action) in TRANSITIONS


@pytest.mark.parametrize("status", list(Status))
@pytest.mark.parametrize("action", list(ACTIONS))
def test_operator_action_valid_and_invalid_transitions(status: Status, action: str) -> None:
    spec = scenario_spec()
    state = RolloutState(
        status,
        -1 if status is Status.PENDING else 0,
        None if status is Status.PENDING else T0 - 100,
    )
    if _allowed(status, action):
        new = ACTIONS[action](spec, state)
        assert new.history[-1].actor == "op"
        assert new.history[-1].from_status is status
        assert new.history[-1].to_status is new.status
    else:
        with pytest.raises(InvalidTransitionError, match=f"cannot {action}"):
            ACTIONS[action](spec, state)


def test_resume_restarts_soak() -> None:
    spec = scenario_spec()
    s = pause(spec, start(spec, RolloutState(), T0, "op"), T0 + 10, "op")
    r = resume(spec, s, T0 + 5000, "op")
    assert r.status is Status.RUNNING and r.stage_started_at == T0 + 5000


def test_promote_moves_one_stage_and_finishes_at_last() -> None:
    spec = scenario_spec()
    s = start(spec, RolloutState(), T0, "op")
    s = promote(spec, s, T0 + 1, "op")
    assert (s.status, s.stage) == (Status.RUNNING, 1)
    s = promote(spec, s, T0 + 2, "op", to_end=True)
    assert s.status is Status.SUCCEEDED


def test_rollback_without_republished_bundle_is_refused() -> None:
    spec = scenario_spec()
    s = start(spec, RolloutState(), T0, "op")
    with pytest.raises(InvalidTransitionError, match="re-publish"):
        rollback(spec, s, T0, "op", None)


def test_rollback_to_lower_version_is_refused() -> None:
    spec = scenario_spec()
    s = start(spec, RolloutState(), T0, "op")
    with pytest.raises(InvalidTransitionError, match="downgrade"):
        rollback(spec, s, T0, "op", BundleRef("b-x", "m", 4))


def test_rollback_version_is_above_candidate_and_previous() -> None:
    assert scenario_spec().rollback_version() == 5


# -- spec and state JSON -----------------------------------------------------------------


@settings(deadline=None)
@given(specs())
def test_spec_json_round_trip(spec: RolloutSpec) -> None:
    assert RolloutSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec


@settings(deadline=None)
@given(running_cases())
def test_state_json_round_trip(case) -> None:  # type: ignore[no-untyped-def]
    spec, state, _, _ = case
    state = pause(spec, state, T0 + 1, "op", "why")
    assert RolloutState.from_json(json.loads(json.dumps(state.to_json()))) == state


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"stages": [{"percent": 50}, {"percent": 10}]}, "non-decreasing"),
        ({"stages": [{"percent": 0}]}, r"\(0, 100\]"),
        ({"stages": []}, "at least one stage"),
        ({"gates": [{"kind": "vibes", "threshold": 1}]}, "gate kind"),
        ({"gates": [{"kind": "error_rate", "threshold": -1}]}, "threshold"),
        ({"gates": [{"kind": "error_rate", "threshold": 0.1, "min_samples": 0}]}, "min_samples"),
        ({"strategy": "yolo"}, "strategy"),
        ({"strategy": "all_at_once", "stages": [{"percent": 50}]}, "all_at_once"),
        ({"previous": {"bundle_id": "b-o", "name": "other", "version": 1}}, "model"),
        (
            {"strategy": "shadow", "gates": [{"kind": "latency_p95_ratio", "threshold": 2}]},
            "shadow",
        ),
    ],
)
def test_invalid_spec_is_refused_with_a_clear_error(change: dict[str, object], match: str) -> None:
    obj = scenario_spec().to_json()
    obj.update(change)
    with pytest.raises(InvalidSpecError, match=match):
        RolloutSpec.from_json(obj)


def test_shadow_rollout_defaults_to_the_gates_shadow_telemetry_can_feed() -> None:
    spec = RolloutSpec("r-sh", NEW, OLD, {}, strategy=Strategy.SHADOW)
    assert spec.gates == default_shadow_gates()
    assert {g.kind for g in spec.gates} == SHADOW_GATE_KINDS


def test_state_with_bad_status_is_refused() -> None:
    with pytest.raises(InvalidStateError):
        RolloutState.from_json({"status": "exploded"})


def test_state_not_fitting_spec_is_refused() -> None:
    with pytest.raises(InvalidStateError, match="stage 7"):
        decide(
            scenario_spec(),
            RolloutState(Status.RUNNING, 7, T0),
            CohortMetrics(CohortStats(), CohortStats()),
            T0,
        )
