"""What a rollout is (:class:`RolloutSpec`) and where it stands (:class:`RolloutState`).

Both are frozen dataclasses with a JSON round-trip (``to_json`` / ``from_json``)
so the server stores them as JSON columns. Parsing validates everything and
raises :class:`InvalidSpecError` / :class:`InvalidStateError` with a message
that says what to fix.

Invariants a valid spec holds:

* stage percents are in (0, 100] and non-decreasing, so cohorts are monotonic
  (a device in stage k is in every later stage, see :mod:`.cohort`);
* ``all_at_once`` has exactly one stage at 100 %;
* gate kinds are known, thresholds finite and non-negative, ``min_samples`` >= 1;
* the previous bundle, if any, has the same model name as the candidate.

Times are UNIX seconds (float) throughout the engine.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

from fleet_server.rollouts.errors import InvalidSpecError, InvalidStateError


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _num(x: Any, what: str) -> float:
    if not _finite(x):
        raise InvalidSpecError(f"{what} must be a finite number, not {x!r}")
    return float(x)


def _bound(x: Any) -> float:
    b = _num(x, "cohort bound")
    if not 0.0 <= b <= 1.0:
        raise InvalidSpecError(f"cohort bound {b!r} must be in [0, 1]")
    return b


def _obj(x: Any, what: str, err: type[Exception]) -> Mapping[str, Any]:
    if not isinstance(x, Mapping):
        raise err(f"{what} must be a JSON object, not {type(x).__name__}")
    return x


def _list(x: Any, what: str) -> Sequence[Any]:
    if not isinstance(x, list):
        raise InvalidSpecError(f"{what} must be a list")
    return x


class Strategy(str, Enum):
    """How the candidate reaches the group."""

    STAGED_CANARY = "staged_canary"
    ALL_AT_ONCE = "all_at_once"
    #: members run the candidate beside the active model and serve nothing from it
    SHADOW = "shadow"


class FailurePolicy(str, Enum):
    """What the engine does when a gate breaches."""

    PAUSE = "pause"
    ROLLBACK = "rollback"


class Status(str, Enum):
    PENDING = "pending"
    RUNNING = "running"
    PAUSED = "paused"
    SUCCEEDED = "succeeded"
    ROLLED_BACK = "rolled_back"
    ABORTED = "aborted"


TERMINAL = frozenset({Status.SUCCEEDED, Status.ROLLED_BACK, Status.ABORTED})


class GateKind(str, Enum):
    """The health gates; see :mod:`.gates` for how each one decides."""

    INSTALL_FAILURE_RATE = "install_failure_rate"
    ERROR_RATE = "error_rate"
    LATENCY_P95_RATIO = "latency_p95_ratio"
    DRIFT_PSI = "drift_psi"
    PREDICTION_SHIFT = "prediction_shift"
    SHADOW_AGREEMENT = "shadow_agreement"
    ACCURACY = "accuracy"


@dataclass(frozen=True)
class BundleRef:
    """A bundle as the engine needs to know it."""

    bundle_id: str
    name: str
    version: int

    def __post_init__(self) -> None:
        if not self.bundle_id or not self.name:
            raise InvalidSpecError("a bundle reference needs a bundle_id and a name")
        if isinstance(self.version, bool) or not isinstance(self.version, int) or self.version < 0:
            raise InvalidSpecError(
                f"bundle {self.bundle_id}: version must be a non-negative integer"
            )

    def to_json(self) -> dict[str, Any]:
        return {"bundle_id": self.bundle_id, "name": self.name, "version": self.version}

    @classmethod
    def from_json(cls, obj: Any) -> BundleRef:
        obj = _obj(obj, "bundle reference", InvalidSpecError)
        try:
            return cls(str(obj["bundle_id"]), str(obj["name"]), obj["version"])
        except KeyError as e:
            raise InvalidSpecError(f"bundle reference lacks {e.args[0]!r}") from e


@dataclass(frozen=True)
class Stage:
    """One canary stage: the share of the group that runs the candidate."""

    percent: float
    min_devices: int = 1
    soak_seconds: float = 600.0

    def __post_init__(self) -> None:
        if not _finite(self.percent) or not 0 < self.percent <= 100:
            raise InvalidSpecError(f"stage percent {self.percent!r} must be in (0, 100]")
        if (
            isinstance(self.min_devices, bool)
            or not isinstance(self.min_devices, int)
            or self.min_devices < 0
        ):
            raise InvalidSpecError(f"stage min_devices {self.min_devices!r} must be an int >= 0")
        if not _finite(self.soak_seconds) or self.soak_seconds < 0:
            raise InvalidSpecError(f"stage soak_seconds {self.soak_seconds!r} must be >= 0")

    def to_json(self) -> dict[str, Any]:
        return {
            "percent": self.percent,
            "min_devices": self.min_devices,
            "soak_seconds": self.soak_seconds,
        }

    @classmethod
    def from_json(cls, obj: Any) -> Stage:
        obj = _obj(obj, "stage", InvalidSpecError)
        if "percent" not in obj:
            raise InvalidSpecError("each stage needs a 'percent'")
        return cls(
            _num(obj["percent"], "stage percent"),
            obj.get("min_devices", 1),
            _num(obj.get("soak_seconds", 600.0), "stage soak_seconds"),
        )


@dataclass(frozen=True)
class GateSpec:
    """One health gate.

    ``threshold`` means, per kind:

    * ``install_failure_rate``: highest acceptable install failure rate of the canary;
    * ``error_rate``: highest acceptable *increase* of the canary's inference error
      rate over the control's (absolute, e.g. 0.01 = one percentage point);
    * ``latency_p95_ratio``: highest acceptable canary p95 / control p95;
    * ``drift_psi``: highest acceptable PSI (``against="reference"``: the canary's
      own drift against the bundle's reference profile, as reported by devices;
      ``against="control"``: max feature PSI between canary and control inputs);
    * ``prediction_shift``: highest acceptable divergence between canary and control
      prediction distributions (``metric`` ``"psi"`` or ``"js"``, Jensen-Shannon in bits);
    * ``shadow_agreement``: lowest acceptable share of inputs on which the new model and
      the old one agree (a shadow rollout: the shadow candidate vs the active model; a
      staged canary: the canary vs the model it replaced, kept running on the device);
    * ``accuracy``: highest acceptable *drop* of the canary's accuracy on labelled
      predictions below the control's (absolute, e.g. 0.02 = two percentage points).

    ``min_samples`` is the number of observations (installs, inferences,
    predictions, comparisons or labels) each compared cohort needs before the gate
    may decide.
    ``confidence`` is the one-sided confidence of the rate tests.
    ``floor_ms`` (``latency_p95_ratio`` only): a p95 below it counts as ``floor_ms``, so
    differences of sub-millisecond timings (scheduler noise on a shared CPU, a cold
    cache) cannot breach the ratio; 0: no floor.
    """

    kind: GateKind
    threshold: float
    min_samples: int = 100
    confidence: float = 0.95
    against: str = "reference"
    metric: str = "psi"
    name: str = ""
    floor_ms: float = 0.0

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "kind", GateKind(self.kind))
        except ValueError as e:
            raise InvalidSpecError(
                f"gate kind {self.kind!r} is not one of {[k.value for k in GateKind]}"
            ) from e
        if not self.name:
            object.__setattr__(self, "name", self.kind.value)
        if not _finite(self.threshold) or self.threshold < 0:
            raise InvalidSpecError(f"gate {self.name}: threshold must be a finite number >= 0")
        if (
            isinstance(self.min_samples, bool)
            or not isinstance(self.min_samples, int)
            or self.min_samples < 1
        ):
            raise InvalidSpecError(f"gate {self.name}: min_samples must be an integer >= 1")
        if not _finite(self.confidence) or not 0.5 <= self.confidence < 1:
            raise InvalidSpecError(f"gate {self.name}: confidence must be in [0.5, 1)")
        if self.against not in ("reference", "control"):
            raise InvalidSpecError(f"gate {self.name}: against must be 'reference' or 'control'")
        if self.metric not in ("psi", "js"):
            raise InvalidSpecError(f"gate {self.name}: metric must be 'psi' or 'js'")
        if not _finite(self.floor_ms) or self.floor_ms < 0:
            raise InvalidSpecError(f"gate {self.name}: floor_ms must be a finite number >= 0")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": self.kind.value,
            "name": self.name,
            "threshold": self.threshold,
            "min_samples": self.min_samples,
            "confidence": self.confidence,
            "against": self.against,
            "metric": self.metric,
        }
        if self.floor_ms:  # absent when unset: specs stored before it read the same
            out["floor_ms"] = self.floor_ms
        return out

    @classmethod
    def from_json(cls, obj: Any) -> GateSpec:
        obj = _obj(obj, "gate", InvalidSpecError)
        if "kind" not in obj or "threshold" not in obj:
            raise InvalidSpecError("each gate needs a 'kind' and a 'threshold'")
        return cls(
            kind=obj["kind"],
            threshold=_num(obj["threshold"], "gate threshold"),
            min_samples=obj.get("min_samples", 100),
            confidence=_num(obj.get("confidence", 0.95), "gate confidence"),
            against=str(obj.get("against", "reference")),
            metric=str(obj.get("metric", "psi")),
            name=str(obj.get("name", "")),
            floor_ms=_num(obj.get("floor_ms", 0.0), "gate floor_ms"),
        )


def default_gates() -> tuple[GateSpec, ...]:
    """A sensible gate set: every kind, moderate thresholds."""
    return (
        GateSpec(GateKind.INSTALL_FAILURE_RATE, 0.05, min_samples=1),
        GateSpec(GateKind.ERROR_RATE, 0.01, min_samples=500),
        GateSpec(GateKind.LATENCY_P95_RATIO, 1.5, min_samples=500),
        GateSpec(GateKind.DRIFT_PSI, 0.25, min_samples=500),
        GateSpec(GateKind.PREDICTION_SHIFT, 0.25, min_samples=500),
        # the canary against the model it replaces (run beside it on the canary devices):
        # retrained versions agree on most inputs; a label mix-up on almost none
        GateSpec(GateKind.SHADOW_AGREEMENT, 0.7, min_samples=200),
    )


#: what shadow telemetry carries (count, errors and agreement of the shadow model)
SHADOW_GATE_KINDS = frozenset(
    {GateKind.INSTALL_FAILURE_RATE, GateKind.ERROR_RATE, GateKind.SHADOW_AGREEMENT}
)


def default_shadow_gates() -> tuple[GateSpec, ...]:
    """The gates a shadow rollout can evaluate."""
    return (
        *(
            g
            for g in default_gates()
            if g.kind in SHADOW_GATE_KINDS and g.kind is not GateKind.SHADOW_AGREEMENT
        ),
        GateSpec(GateKind.SHADOW_AGREEMENT, 0.9, min_samples=500),
    )


@dataclass(frozen=True)
class RolloutSpec:
    """A rollout: candidate bundle x target group x stages x gates x failure policy."""

    rollout_id: str
    bundle: BundleRef
    previous: BundleRef | None
    selector: Mapping[str, str]
    strategy: Strategy = Strategy.STAGED_CANARY
    stages: tuple[Stage, ...] = (Stage(1), Stage(10), Stage(50), Stage(100))
    gates: tuple[GateSpec, ...] = field(default_factory=default_gates)
    failure_policy: FailurePolicy = FailurePolicy.ROLLBACK

    def __post_init__(self) -> None:
        if not self.rollout_id:
            raise InvalidSpecError("a rollout needs a rollout_id")
        try:
            object.__setattr__(self, "strategy", Strategy(self.strategy))
            object.__setattr__(self, "failure_policy", FailurePolicy(self.failure_policy))
        except ValueError as e:
            raise InvalidSpecError(
                f"{e}; strategy is one of {[s.value for s in Strategy]}, failure policy one "
                f"of {[p.value for p in FailurePolicy]}"
            ) from e
        object.__setattr__(self, "stages", tuple(self.stages))
        object.__setattr__(self, "gates", tuple(self.gates))
        object.__setattr__(self, "selector", dict(self.selector))
        if not self.stages:
            raise InvalidSpecError("a rollout needs at least one stage")
        pcts = [s.percent for s in self.stages]
        if any(b < a for a, b in zip(pcts, pcts[1:], strict=False)):
            raise InvalidSpecError(
                f"stage percents {pcts} must be non-decreasing so cohorts stay monotonic"
            )
        if self.strategy is Strategy.ALL_AT_ONCE and pcts != [100]:
            raise InvalidSpecError("all_at_once takes exactly one stage at 100 percent")
        if self.strategy is Strategy.SHADOW:
            if self.gates == default_gates():
                object.__setattr__(self, "gates", default_shadow_gates())
            bad = [g.name for g in self.gates if g.kind not in SHADOW_GATE_KINDS]
            if bad:
                raise InvalidSpecError(
                    f"gates {bad} cannot judge a shadow rollout: devices report only the "
                    "shadow model's inference count and errors; use "
                    f"{sorted(k.value for k in SHADOW_GATE_KINDS)}"
                )
        names = [g.name for g in self.gates]
        if len(set(names)) != len(names):
            raise InvalidSpecError(f"gate names {names} must be unique; name repeated kinds")
        if self.previous is not None and self.previous.name != self.bundle.name:
            raise InvalidSpecError(
                f"previous bundle is model {self.previous.name!r} but the candidate is "
                f"{self.bundle.name!r}; a rollout replaces one model with a version of itself"
            )
        if self.previous is not None and self.previous.bundle_id == self.bundle.bundle_id:
            raise InvalidSpecError("the candidate bundle is already the previous bundle")

    @property
    def last_stage(self) -> int:
        return len(self.stages) - 1

    def rollback_version(self) -> int:
        """The version a re-published previous model must carry (see :mod:`.republish`)."""
        prev = self.previous.version if self.previous else 0
        return max(prev, self.bundle.version) + 1

    def to_json(self) -> dict[str, Any]:
        return {
            "rollout_id": self.rollout_id,
            "bundle": self.bundle.to_json(),
            "previous": self.previous.to_json() if self.previous else None,
            "selector": dict(self.selector),
            "strategy": self.strategy.value,
            "stages": [s.to_json() for s in self.stages],
            "gates": [g.to_json() for g in self.gates],
            "failure_policy": self.failure_policy.value,
        }

    @classmethod
    def from_json(cls, obj: Any) -> RolloutSpec:
        obj = _obj(obj, "rollout spec", InvalidSpecError)
        for key in ("rollout_id", "bundle"):
            if key not in obj:
                raise InvalidSpecError(f"rollout spec lacks {key!r}")
        selector = obj.get("selector") or {}
        if not isinstance(selector, Mapping):
            raise InvalidSpecError("selector must be an object of label: value")
        kwargs: dict[str, Any] = {}
        if "stages" in obj:
            kwargs["stages"] = tuple(Stage.from_json(s) for s in _list(obj["stages"], "stages"))
        if "gates" in obj:
            kwargs["gates"] = tuple(GateSpec.from_json(g) for g in _list(obj["gates"], "gates"))
        return cls(
            rollout_id=str(obj["rollout_id"]),
            bundle=BundleRef.from_json(obj["bundle"]),
            previous=BundleRef.from_json(obj["previous"]) if obj.get("previous") else None,
            selector={str(k): str(v) for k, v in selector.items()},
            strategy=obj.get("strategy", Strategy.STAGED_CANARY.value),
            failure_policy=obj.get("failure_policy", FailurePolicy.ROLLBACK.value),
            **kwargs,
        )


@dataclass(frozen=True)
class HistoryEntry:
    """One transition of a rollout, for the state's own history (the audit log has more)."""

    ts: float
    action: str
    actor: str
    from_status: Status
    to_status: Status
    stage: int
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "ts": self.ts,
            "action": self.action,
            "actor": self.actor,
            "from_status": self.from_status.value,
            "to_status": self.to_status.value,
            "stage": self.stage,
            "reason": self.reason,
        }

    @classmethod
    def from_json(cls, obj: Any) -> HistoryEntry:
        obj = _obj(obj, "history entry", InvalidStateError)
        try:
            return cls(
                float(obj["ts"]),
                str(obj["action"]),
                str(obj["actor"]),
                Status(obj["from_status"]),
                Status(obj["to_status"]),
                int(obj["stage"]),
                str(obj.get("reason", "")),
            )
        except (KeyError, ValueError, TypeError) as e:
            raise InvalidStateError(f"bad rollout history entry {obj!r}: {e}") from e


@dataclass(frozen=True)
class RolloutState:
    """Where a rollout stands. Change it only through :mod:`.engine`'s transitions.

    ``stage`` is -1 while pending. ``baseline`` is the control cohort's figures
    recorded when the rollout last advanced, used by control-relative gates once
    the control cohort is gone (a 100 % stage). ``rollback_bundle`` is the
    re-published previous model once the rollout was rolled back. ``bounds`` is the
    bucket bound of each stage's cohort reached so far, fixed when the stage began
    (see :mod:`.cohort`); a stage not in it draws by its percent.
    """

    status: Status = Status.PENDING
    stage: int = -1
    stage_started_at: float | None = None
    history: tuple[HistoryEntry, ...] = ()
    baseline: Mapping[str, Any] | None = None
    rollback_bundle: BundleRef | None = None
    bounds: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "status", Status(self.status))
        object.__setattr__(self, "history", tuple(self.history))
        object.__setattr__(self, "bounds", tuple(self.bounds))

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    def evolve(self, **changes: Any) -> RolloutState:
        return replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status.value,
            "stage": self.stage,
            "stage_started_at": self.stage_started_at,
            "history": [h.to_json() for h in self.history],
            "baseline": dict(self.baseline) if self.baseline is not None else None,
            "rollback_bundle": self.rollback_bundle.to_json() if self.rollback_bundle else None,
            "bounds": list(self.bounds),
        }

    @classmethod
    def from_json(cls, obj: Any) -> RolloutState:
        obj = _obj(obj, "rollout state", InvalidStateError)
        try:
            rb = obj.get("rollback_bundle")
            started = obj.get("stage_started_at")
            return cls(
                status=Status(obj.get("status", "pending")),
                stage=int(obj.get("stage", -1)),
                stage_started_at=None if started is None else float(started),
                history=tuple(HistoryEntry.from_json(h) for h in obj.get("history", [])),
                baseline=obj.get("baseline"),
                rollback_bundle=BundleRef.from_json(rb) if rb else None,
                bounds=tuple(_bound(b) for b in obj.get("bounds") or ()),
            )
        except (ValueError, TypeError, InvalidSpecError) as e:
            raise InvalidStateError(f"stored rollout state is not valid: {e}") from e

    def check_fits(self, spec: RolloutSpec) -> None:
        """Raise :class:`InvalidStateError` if the state does not belong to ``spec``."""
        if not -1 <= self.stage <= spec.last_stage:
            raise InvalidStateError(
                f"rollout {spec.rollout_id}: stage {self.stage} outside 0..{spec.last_stage}"
            )
        if self.status is Status.PENDING and self.stage != -1:
            raise InvalidStateError(f"rollout {spec.rollout_id}: pending but at a stage")
        if self.status in (Status.RUNNING, Status.PAUSED) and (
            self.stage < 0 or self.stage_started_at is None
        ):
            raise InvalidStateError(
                f"rollout {spec.rollout_id}: {self.status.value} without a stage start"
            )
