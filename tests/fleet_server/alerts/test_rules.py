"""The rule state machine as tables: figures in, statuses and transitions out."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from fleet_server.alerts.rules import (
    Figure,
    Kind,
    Rule,
    RuleError,
    RuleState,
    Status,
    Transition,
    default_clear,
    step,
)

DRIFT = Rule(
    id="ar-1",
    name="drift",
    kind=Kind.drift,
    group="gateways",
    model="m",
    threshold=0.2,
    clear_threshold=0.1,
    window_seconds=600,
    min_samples=100,
)


def run(rule: Rule, values: Sequence[float | None], samples: int = 1000) -> list[tuple[str, str]]:
    """(status, transition or '') after each round, one round per 30 s."""
    state = RuleState()
    out = []
    for i, v in enumerate(values):
        state, t = step(rule, state, Figure(v, samples), now=1000.0 + 30 * i)
        out.append((state.status.value, t.value if t else ""))
    return out


def test_fires_once_and_stays_quiet_while_above_the_clear_threshold() -> None:
    assert run(DRIFT, [0.05, 0.3, 0.5, 0.15, 0.19, 0.3, 0.09, 0.15, 0.25]) == [
        ("ok", ""),
        ("firing", "firing"),
        ("firing", ""),  # still above: no repeat
        ("firing", ""),  # below the threshold but above the clear threshold: no flap
        ("firing", ""),
        ("firing", ""),
        ("ok", "resolved"),  # past the clear threshold
        ("ok", ""),  # between the two: stays resolved
        ("firing", "firing"),
    ]


def test_a_figure_wavering_around_the_threshold_fires_once() -> None:
    values = [0.21, 0.19] * 10
    transitions = [t for _, t in run(DRIFT, values) if t]
    assert transitions == ["firing"]


def test_no_data_changes_nothing() -> None:
    assert run(DRIFT, [0.3, None, None, 0.05]) == [
        ("firing", "firing"),
        ("firing", ""),
        ("firing", ""),
        ("ok", "resolved"),
    ]


def test_too_few_samples_is_no_data() -> None:
    state, t = step(DRIFT, RuleState(), Figure(0.9, samples=99), now=0)
    assert t is None and state.status is Status.ok and state.value is None
    assert state.no_data and "fewer than 100" in state.no_data


def test_for_seconds_needs_the_breach_to_last() -> None:
    rule = Rule(**{**DRIFT.__dict__, "for_seconds": 60})
    assert run(rule, [0.3, 0.3, 0.05, 0.3, 0.3, 0.3]) == [
        ("pending", ""),
        ("pending", ""),
        ("ok", ""),  # the breach ended before 60 s: nothing was sent
        ("pending", ""),
        ("pending", ""),
        ("firing", "firing"),  # 60 s after the breach began
    ]


def test_accuracy_fires_below_and_clears_above() -> None:
    rule = Rule(
        id="ar-2",
        name="acc",
        kind=Kind.accuracy,
        group="g",
        model="m",
        threshold=0.9,
        clear_threshold=default_clear(Kind.accuracy, 0.9),
        window_seconds=600,
    )
    assert rule.clear_threshold == pytest.approx(0.92)
    assert [t for _, t in run(rule, [0.95, 0.85, 0.91, 0.93])] == ["", "firing", "", "resolved"]


def test_group_kinds_fire_on_counts() -> None:
    rule = Rule(
        id="ar-3",
        name="silent",
        kind=Kind.silent,
        group="g",
        model=None,
        threshold=0,
        clear_threshold=0,
        window_seconds=300,
    )
    assert [t for _, t in run(rule, [0, 2, 1, 0])] == ["", "firing", "", "resolved"]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model": None}, "watches one model"),
        ({"clear_threshold": 0.3}, "must not be higher"),
        ({"window_seconds": 0}, "longer than 0"),
    ],
)
def test_rules_that_cannot_be_judged_are_refused(changes: dict[str, object], message: str) -> None:
    with pytest.raises(RuleError, match=message):
        Rule(**{**DRIFT.__dict__, **changes})


def test_transitions_are_named_as_the_webhook_says() -> None:
    assert Transition.fired.value == "firing" and Transition.resolved.value == "resolved"
