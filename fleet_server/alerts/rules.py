"""Alert rules and their state machine: a pure core, no I/O.

A rule watches one figure of one group (and, for model figures, one model) over a
sliding window. :func:`step` takes the rule, the state the last round left, the figure
of this round and the time, and returns the new state and the transition, if any.

Invariants:

* **Hysteresis.** A rule fires when its figure crosses ``threshold`` and resolves only
  when the figure comes back past ``clear_threshold`` (below it for "above" rules, above
  it for "below" rules), so a figure wavering around the threshold does not flap.
* **No repeat storm.** Each change of status yields at most one transition: a firing rule
  stays firing, silently, for as long as it is not cleared.
* **No data changes nothing.** A round without a figure (too few samples, no labels, no
  devices) keeps the status it found; a firing rule resolves only on evidence.
* ``for_seconds``: the breach must last that long (status ``pending`` meanwhile) before
  the rule fires; 0 fires on the first breaching round.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class Kind(str, Enum):
    """What a rule watches. ``model`` kinds need a model name; the others watch a group."""

    drift = "drift"
    error_rate = "error_rate"
    latency_p99 = "latency_p99"
    accuracy = "accuracy"
    silent = "silent"
    stale = "stale"
    records_lost = "records_lost"

    @property
    def needs_model(self) -> bool:
        return self in MODEL_KINDS

    @property
    def below(self) -> bool:
        """True if the rule fires when the figure drops *below* the threshold."""
        return self is Kind.accuracy

    @property
    def figure(self) -> str:
        """The figure's name (in webhook bodies and the ``figure`` label on /metrics)."""
        return FIGURES[self]


MODEL_KINDS = frozenset({Kind.drift, Kind.error_rate, Kind.latency_p99, Kind.accuracy})

FIGURES = {
    Kind.drift: "drift_psi",
    Kind.error_rate: "error_rate",
    Kind.latency_p99: "latency_p99_ms",
    Kind.accuracy: "accuracy",
    Kind.silent: "devices_silent",
    Kind.stale: "devices_stale",
    Kind.records_lost: "records_lost",
}

#: what each kind means, for help texts and the documentation
DESCRIPTIONS = {
    Kind.drift: "input drift: inference-weighted PSI of the windows (fires above)",
    Kind.error_rate: "errors / inferences (fires above)",
    Kind.latency_p99: "99th percentile latency in ms, from the merged histograms (fires above)",
    Kind.accuracy: "correct / labelled predictions, from labels apps posted (fires below)",
    Kind.silent: "devices of the group not seen for the whole window (fires above)",
    Kind.stale: "devices still not running their assigned bundle a window after the "
    "assignment changed (fires above)",
    Kind.records_lost: "telemetry records lost in the window (holes in sequence numbers; "
    "fires above)",
}


class RuleError(ValueError):
    """A rule that cannot be evaluated as given (the API answers 400 with the message)."""


def default_clear(kind: Kind, threshold: float) -> float:
    """The clear threshold when none is given: 80% of the threshold for "above" rules,
    a fifth of the way to 1 for accuracy."""
    if kind.below:
        return round(threshold + 0.2 * (1.0 - threshold), 12)
    return round(threshold * 0.8, 12)


@dataclass(frozen=True)
class Rule:
    """An alert rule as the evaluator sees it."""

    id: str
    name: str
    kind: Kind
    group: str
    model: str | None
    threshold: float
    clear_threshold: float
    window_seconds: float
    for_seconds: float = 0.0
    min_samples: int = 0
    webhooks: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind.needs_model and not self.model:
            raise RuleError(f"a {self.kind.value} rule watches one model: give its name")
        if self.window_seconds <= 0:
            raise RuleError("the window must be longer than 0 seconds")
        if self.for_seconds < 0 or self.min_samples < 0:
            raise RuleError("for_seconds and min_samples cannot be negative")
        if self.kind.below and self.clear_threshold < self.threshold:
            raise RuleError(
                f"{self.kind.value} fires below {self.threshold}: its clear threshold "
                f"({self.clear_threshold}) must not be lower"
            )
        if not self.kind.below and self.clear_threshold > self.threshold:
            raise RuleError(
                f"{self.kind.value} fires above {self.threshold}: its clear threshold "
                f"({self.clear_threshold}) must not be higher"
            )

    def breached(self, value: float) -> bool:
        return value < self.threshold if self.kind.below else value > self.threshold

    def cleared(self, value: float) -> bool:
        return value >= self.clear_threshold if self.kind.below else value <= self.clear_threshold


@dataclass(frozen=True)
class Figure:
    """One round's figure of a rule: ``value`` None when there was nothing to judge
    (``no_data`` says why); ``samples`` is what the value rests on; ``details`` holds
    the other numbers for the webhook body."""

    value: float | None
    samples: int = 0
    no_data: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


class Status(str, Enum):
    ok = "ok"
    pending = "pending"
    firing = "firing"


@dataclass(frozen=True)
class RuleState:
    status: Status = Status.ok
    #: when the current status began
    since: float | None = None
    value: float | None = None
    evaluated_at: float | None = None
    no_data: str | None = None


class Transition(str, Enum):
    fired = "firing"
    resolved = "resolved"


def judge(rule: Rule, figure: Figure) -> Figure:
    """``figure`` with its value withdrawn if it rests on fewer than ``min_samples``."""
    if figure.value is not None and figure.samples < rule.min_samples:
        return dataclasses.replace(
            figure,
            value=None,
            no_data=f"{figure.samples} samples in the window, fewer than {rule.min_samples}",
        )
    return figure


def step(
    rule: Rule, state: RuleState, figure: Figure, now: float
) -> tuple[RuleState, Transition | None]:
    """The state after this round and the transition it makes (see the module docstring)."""
    figure = judge(rule, figure)
    seen = dataclasses.replace(state, value=figure.value, evaluated_at=now, no_data=figure.no_data)
    v = figure.value
    if v is None:
        return seen, None
    if state.status is Status.firing:
        if rule.cleared(v):
            return dataclasses.replace(seen, status=Status.ok, since=now), Transition.resolved
        return seen, None
    if not rule.breached(v):
        if state.status is Status.pending:
            return dataclasses.replace(seen, status=Status.ok, since=now), None
        return seen, None
    started = state.since if state.status is Status.pending and state.since is not None else now
    if now - started >= rule.for_seconds:
        return dataclasses.replace(seen, status=Status.firing, since=now), Transition.fired
    return dataclasses.replace(seen, status=Status.pending, since=started), None


__all__ = [
    "DESCRIPTIONS",
    "FIGURES",
    "Figure",
    "Kind",
    "MODEL_KINDS",
    "Rule",
    "RuleError",
    "RuleState",
    "Status",
    "Transition",
    "default_clear",
    "judge",
    "step",
]
