"""The accuracy gate (canary vs control on labelled predictions) and the agreement gate
of staged canaries (the canary vs the model it replaced), in the pure engine."""

from __future__ import annotations

from dataclasses import replace

import pytest

from fleet_server.cli.rollout_view import render_status
from fleet_server.rollouts import (
    Action,
    CohortMetrics,
    CohortStats,
    GateKind,
    GateSpec,
    RolloutSpec,
    RolloutState,
    Stage,
    Strategy,
    Verdict,
    decide,
    start,
)
from fleet_server.rollouts.gates import evaluate_gate
from fleet_server.rollouts.spec import default_gates, default_shadow_gates
from tests.fleet_server.rollouts.test_engine import NEW, OLD, T0
from tests.fleet_server.rollouts.test_gates import cohort

ACCURACY = GateSpec(GateKind.ACCURACY, 0.02, min_samples=200)


def labelled(labels: int, correct: int, seed: int = 0) -> CohortStats:
    return replace(cohort(seed=seed), labels=labels, labels_correct=correct)


@pytest.mark.parametrize(
    "canary,control,verdict",
    [
        ((900, 1000), (910, 1000), Verdict.PASS),  # one point worse: within the 2-point drop
        ((600, 1000), (900, 1000), Verdict.BREACH),  # 30 points worse
        ((180, 200), (190, 200), Verdict.PASS),  # 5 points worse but 200 labels: not sure
        ((1800, 2000), (1900, 2000), Verdict.BREACH),  # the same 5 points, ten times the labels
        ((950, 1000), (900, 1000), Verdict.PASS),  # better
        ((90, 100), (900, 1000), Verdict.WAIT),  # too few canary labels
        ((900, 1000), (90, 100), Verdict.WAIT),  # too few control labels
    ],
)
def test_accuracy_gate_breaches_only_on_a_confident_drop(
    canary: tuple[int, int], control: tuple[int, int], verdict: Verdict
) -> None:
    # (correct, labels) per cohort
    m = CohortMetrics(
        labelled(canary[1], canary[0], seed=1), labelled(control[1], control[0], seed=2)
    )
    r = evaluate_gate(ACCURACY, m, live_control=True)
    assert r.verdict is verdict, r.detail
    if verdict is not Verdict.WAIT:
        assert r.canary_value == pytest.approx(canary[0] / canary[1])
        assert r.control_value == pytest.approx(control[0] / control[1])
        assert r.canary_samples == canary[1] and r.control_samples == control[1]
        assert "Newcombe" in r.detail


def test_accuracy_gate_at_100_percent_compares_with_the_baseline() -> None:
    m = CohortMetrics(labelled(1000, 600), CohortStats())
    r = evaluate_gate(ACCURACY, m, live_control=False, baseline=labelled(1000, 900))
    assert r.verdict is Verdict.BREACH and r.control_source == "baseline"
    r = evaluate_gate(ACCURACY, m, live_control=False)
    assert r.verdict is Verdict.SKIP


def test_cohort_labels_survive_the_json_round_trip() -> None:
    c = labelled(321, 300)
    assert CohortStats.from_json(c.to_json()) == c and c.accuracy == pytest.approx(300 / 321)


def spec(gates: tuple[GateSpec, ...], previous: bool = True) -> RolloutSpec:
    return RolloutSpec(
        "r-agree",
        NEW,
        OLD if previous else None,
        {"site": "a"},
        stages=(Stage(50, 1, 0), Stage(100, 1, 0)),
        gates=gates,
    )


def test_a_worse_model_on_labelled_samples_is_rolled_back_by_the_accuracy_gate() -> None:
    s = spec((GateSpec(GateKind.ERROR_RATE, 0.01, min_samples=500), ACCURACY))
    m = CohortMetrics(labelled(400, 200, seed=1), labelled(400, 360, seed=2))
    d = decide(s, start(s, RolloutState(), T0, "op"), m, T0 + 10)
    assert d.action is Action.ROLLBACK
    assert d.reason.startswith("gate breached: accuracy (accuracy on labelled predictions")


AGREE = GateSpec(GateKind.SHADOW_AGREEMENT, 0.7, min_samples=200)


def test_a_canary_that_disagrees_with_the_model_it_replaced_is_rolled_back() -> None:
    s = spec((AGREE,))
    permuted = replace(cohort(seed=1), shadow_runs=300, shadow_agreements=4)
    d = decide(s, start(s, RolloutState(), T0, "op"), CohortMetrics(permuted, cohort()), T0 + 1)
    assert d.action is Action.ROLLBACK and "shadow_agreement" in d.reason
    retrained = replace(cohort(seed=1), shadow_runs=300, shadow_agreements=280)
    d = decide(s, start(s, RolloutState(), T0, "op"), CohortMetrics(retrained, cohort()), T0 + 1)
    assert d.action is Action.ADVANCE


def test_agreement_is_skipped_when_the_candidate_replaces_nothing() -> None:
    s = spec((AGREE,), previous=False)
    d = decide(s, start(s, RolloutState(), T0, "op"), CohortMetrics(cohort(), cohort()), T0 + 1)
    assert d.gates[0].verdict is Verdict.SKIP and "no previous model" in d.gates[0].detail
    assert d.action is Action.ADVANCE


def test_default_gates_judge_every_staged_canary_by_agreement_too() -> None:
    kinds = [g.kind for g in default_gates()]
    assert GateKind.SHADOW_AGREEMENT in kinds
    assert GateKind.ACCURACY not in kinds  # needs apps that post labels: opt in
    shadow = default_shadow_gates()
    assert [g.kind for g in shadow].count(GateKind.SHADOW_AGREEMENT) == 1
    assert RolloutSpec("r-s", NEW, OLD, {}, strategy=Strategy.SHADOW).gates == shadow


def test_rollout_status_shows_the_accuracy_gate_with_both_cohorts() -> None:
    gate = {
        "name": "accuracy",
        "kind": "accuracy",
        "verdict": "breach",
        "canary_value": 0.5,
        "control_value": 0.9,
        "threshold": 0.02,
        "canary_samples": 400,
        "control_samples": 400,
        "min_samples": 200,
        "control_source": "control",
        "detail": "",
    }
    data = {
        "rollout_id": "r-1",
        "status": "rolled_back",
        "stage_number": 1,
        "stages_total": 2,
        "stages": [],
        "devices": {"total": 4, "by_state": {}, "by_version": {}},
        "last_decision": {
            "action": "rollback",
            "at": T0,
            "stage_number": 1,
            "gates": [gate],
            "metrics": CohortMetrics(
                replace(
                    labelled(400, 200), labelled_by_class=(300, 100), correct_by_class=(190, 10)
                ),
                replace(
                    labelled(400, 360), labelled_by_class=(300, 100), correct_by_class=(280, 80)
                ),
            ).to_json(),
        },
        "holding": "rolled back",
    }
    text = "\n".join(render_status(data))
    assert "accuracy  BREACH 0.5 drop at most 0.02  (400 of 200 labels, control 0.9 (400))" in text
    assert (
        "  labels     canary 50.0% right of 400 (by class 63% 10%); "
        "control 90.0% right of 400 (by class 93% 80%)"
    ) in text.splitlines()


def test_gates_that_get_no_figures_while_canaries_predict_say_what_they_wait_for() -> None:
    s = spec((AGREE, ACCURACY))
    running = start(s, RolloutState(), T0, "op")
    predicting = cohort(n=5000, seed=1)  # no comparisons, no labels
    d = decide(s, running, CohortMetrics(predicting, labelled(5000, 4900)), T0 + 1)
    assert d.action is Action.HOLD
    assert "shadow_agreement has no comparison from the 5000 canary predictions" in d.reason
    assert "compare_previous_rate = 0" in d.reason
    assert "accuracy has no label among the 5000 canary predictions" in d.reason
    assert "/v2/models/m/labels" in d.reason
    few = replace(predicting, shadow_runs=50, shadow_agreements=49, labels=20, labels_correct=19)
    d = decide(s, running, CohortMetrics(few, labelled(5000, 4900)), T0 + 1)
    assert d.reason == "waiting for samples: shadow_agreement, accuracy"  # figures arrive
