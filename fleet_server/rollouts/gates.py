"""Health gates: compare the canary cohort (candidate) with the control cohort (previous).

Pure functions of aggregated figures. Every gate returns a :class:`GateResult`
with the numbers behind its verdict, for the audit log.

Verdicts: ``pass``, ``breach``, ``wait`` (not enough samples yet: a gate never
passes or fails on fewer than ``min_samples`` observations in each cohort it
compares) and ``skip`` (the gate cannot apply, e.g. a control-relative gate in a
rollout that has no control cohort at all).

Statistics, per kind:

* **install_failure_rate** (canary only; control devices install nothing): breach
  iff the lower bound of the Wilson score interval of the canary's failure rate
  exceeds ``threshold`` at the gate's one-sided ``confidence``. One failed install
  of one already breaches a 5 % threshold (lower bound 0.21 at 95 %).
* **error_rate**: breach iff the lower bound of the Newcombe hybrid score interval
  (built from two Wilson intervals; well-behaved at rates of 0) for
  ``p_canary - p_control`` exceeds ``threshold``, i.e. the canary is worse than
  the control by more than the allowed margin with the given confidence. Without
  any control cohort it is the one-sample Wilson test of the canary's rate.
* **latency_p95_ratio**: both cohorts' latency histograms (buckets of
  :data:`device_agent.protocol.LATENCY_BUCKETS_MS`) are merged over all windows;
  p95 is interpolated linearly inside its bucket (the open last bucket counts as
  its lower edge); breach iff ``p95_canary / p95_control > threshold``, each p95
  raised to the gate's ``floor_ms`` first (sub-millisecond noise cannot breach). Bucket
  resolution (1-2-5 steps) bounds the precision, so thresholds below ~1.2 are
  not meaningful.
* **drift_psi**: ``against="reference"``: the canary's PSI against the bundle's
  reference profile as the devices computed it per window (max over features),
  averaged over windows weighted by their inference counts; ``against="control"``:
  the max over features of the PSI between the canary's and the control's merged
  binned input counts. Breach iff above ``threshold``.
* **prediction_shift**: PSI (or Jensen-Shannon divergence, base 2) between the
  merged prediction distributions of canary and control; a different number of
  classes is padded with empty bins, so it shows up as a shift.
* **shadow_agreement** (canary only): the share of compared inputs on which the new
  model and the old one predicted the same; breach iff the upper bound of its Wilson
  interval is below ``threshold`` (clearly worse than allowed). In a shadow rollout
  the old model serves and the candidate runs as a shadow; in a staged canary the
  candidate serves and the model it replaced keeps running on a sample of inputs.
  This is what catches a model whose classes are permuted: its prediction
  distribution on balanced inputs is unchanged, its agreement is near zero.
* **accuracy**: on predictions whose true class an app posted later (labels),
  breach iff the lower bound of the Newcombe interval of
  ``accuracy_control - accuracy_canary`` exceeds ``threshold`` (the canary is
  worse by more than the allowed drop, with the given confidence). ``min_samples``
  counts labels, in each cohort.

PSI uses proportions floored at 1e-4 so empty bins do not make it infinite.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from statistics import NormalDist
from typing import Any

from device_agent.payloads import is_channel_feature
from device_agent.protocol import LATENCY_BUCKETS_MS
from device_agent.telemetry.stats import psi as stats_psi
from fleet_server.rollouts.spec import GateKind, GateSpec

PSI_FLOOR = 1e-4


class Verdict(str, Enum):
    PASS = "pass"
    BREACH = "breach"
    WAIT = "wait"
    SKIP = "skip"


# -- statistics ----------------------------------------------------------------


def z_for(confidence: float) -> float:
    """The one-sided standard normal quantile for ``confidence``."""
    return NormalDist().inv_cdf(confidence)


def wilson(x: int, n: int, z: float) -> tuple[float, float]:
    """Wilson score interval of a proportion ``x / n``; (0, 1) when ``n == 0``."""
    if n <= 0:
        return 0.0, 1.0
    p = x / n
    z2 = z * z
    denom = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def newcombe_diff(x1: int, n1: int, x2: int, n2: int, z: float) -> tuple[float, float]:
    """Newcombe's hybrid score interval for ``x1/n1 - x2/n2`` (method 10, 1998)."""
    p1, p2 = x1 / n1, x2 / n2
    l1, u1 = wilson(x1, n1, z)
    l2, u2 = wilson(x2, n2, z)
    d = p1 - p2
    return (
        d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2),
        d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2),
    )


def hist_quantile(
    hist: Sequence[int], q: float, edges: Sequence[float] = LATENCY_BUCKETS_MS
) -> float | None:
    """Quantile ``q`` of a bucketed histogram (``len(edges) + 1`` counts); None if empty."""
    total = sum(hist)
    if total <= 0:
        return None
    rank = q * total
    cum = 0.0
    for i, c in enumerate(hist):
        if c <= 0:
            continue
        if cum + c >= rank:
            lo = 0.0 if i == 0 else float(edges[i - 1])
            if i >= len(edges):
                return lo
            hi = float(edges[i])
            return lo + (hi - lo) * max(0.0, rank - cum) / c
        cum += c
    return float(edges[-1])


def _pad(a: Sequence[float], b: Sequence[float]) -> tuple[list[float], list[float]]:
    n = max(len(a), len(b))
    return list(a) + [0.0] * (n - len(a)), list(b) + [0.0] * (n - len(b))


def psi(actual: Sequence[float], expected: Sequence[float]) -> float:
    """Population stability index between two binned count (or proportion) vectors:
    :func:`device_agent.telemetry.stats.psi` (the one definition), 0 when a side is empty."""
    value = stats_psi(actual, expected, PSI_FLOOR)
    return 0.0 if value is None else value


def js_divergence(p: Sequence[float], q: Sequence[float]) -> float:
    """Jensen-Shannon divergence in bits (0 = same, 1 = disjoint)."""
    a, b = _pad(p, q)
    sa, sb = float(sum(a)), float(sum(b))
    if sa <= 0 or sb <= 0:
        return 0.0
    pa, pb = [x / sa for x in a], [x / sb for x in b]
    m = [(x + y) / 2 for x, y in zip(pa, pb, strict=False)]

    def kl(u: list[float]) -> float:
        return sum(x * math.log2(x / y) for x, y in zip(u, m, strict=False) if x > 0)

    return float((kl(pa) + kl(pb)) / 2)


# -- cohort figures ------------------------------------------------------------


@dataclass(frozen=True)
class CohortStats:
    """Telemetry of one cohort, aggregated over the evaluation window."""

    devices: int = 0
    installs: int = 0
    install_failures: int = 0
    inferences: int = 0
    errors: int = 0
    latency_hist: tuple[int, ...] = ()
    drift_psi: float | None = None
    drift_samples: int = 0
    feature_counts: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    prediction_counts: tuple[int, ...] = ()
    #: shadow runs whose output agreed with the active model's, out of shadow_runs
    shadow_agreements: int = 0
    shadow_runs: int = 0
    #: devices in the cohort now, reporting or not (None: not counted)
    members: int | None = None
    #: members that sent no predictions since the stage started, and up to 20 of their ids
    silent_count: int = 0
    silent: tuple[str, ...] = ()
    #: labelled predictions (an app posted the true class) and how many were right
    labels: int = 0
    labels_correct: int = 0
    #: members that run the candidate now, whenever they installed it (None: not counted)
    running: int | None = None
    #: per true class: labelled predictions, and how many of them were right
    labelled_by_class: tuple[int, ...] = ()
    correct_by_class: tuple[int, ...] = ()

    @property
    def accuracy(self) -> float | None:
        return self.labels_correct / self.labels if self.labels else None

    @property
    def latency_samples(self) -> int:
        return sum(self.latency_hist)

    @property
    def prediction_samples(self) -> int:
        return sum(self.prediction_counts)

    @property
    def feature_samples(self) -> int:
        """Inputs behind the binned counts: the smallest feature total, where an image
        channel's total (pixel values, many per input) counts as at most the inferences."""
        cap = self.inferences or None
        return min(
            (
                min(sum(c), cap) if cap and is_channel_feature(f) else sum(c)
                for f, c in self.feature_counts.items()
            ),
            default=0,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "devices": self.devices,
            "installs": self.installs,
            "install_failures": self.install_failures,
            "inferences": self.inferences,
            "errors": self.errors,
            "latency_hist": list(self.latency_hist),
            "drift_psi": self.drift_psi,
            "drift_samples": self.drift_samples,
            "feature_counts": {k: list(v) for k, v in self.feature_counts.items()},
            "prediction_counts": list(self.prediction_counts),
            "shadow_agreements": self.shadow_agreements,
            "shadow_runs": self.shadow_runs,
            "members": self.members,
            "silent_count": self.silent_count,
            "silent": list(self.silent),
            "labels": self.labels,
            "labels_correct": self.labels_correct,
            "running": self.running,
            "labelled_by_class": list(self.labelled_by_class),
            "correct_by_class": list(self.correct_by_class),
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> CohortStats:
        dp = obj.get("drift_psi")
        return cls(
            devices=int(obj.get("devices", 0)),
            installs=int(obj.get("installs", 0)),
            install_failures=int(obj.get("install_failures", 0)),
            inferences=int(obj.get("inferences", 0)),
            errors=int(obj.get("errors", 0)),
            latency_hist=tuple(int(c) for c in obj.get("latency_hist", ())),
            drift_psi=None if dp is None else float(dp),
            drift_samples=int(obj.get("drift_samples", 0)),
            feature_counts={
                str(k): tuple(int(c) for c in v)
                for k, v in (obj.get("feature_counts") or {}).items()
            },
            prediction_counts=tuple(int(c) for c in obj.get("prediction_counts", ())),
            shadow_agreements=int(obj.get("shadow_agreements", 0)),
            shadow_runs=int(obj.get("shadow_runs", 0)),
            members=None if obj.get("members") is None else int(obj["members"]),
            silent_count=int(obj.get("silent_count", 0)),
            silent=tuple(str(d) for d in obj.get("silent", ())),
            labels=int(obj.get("labels", 0)),
            labels_correct=int(obj.get("labels_correct", 0)),
            running=None if obj.get("running") is None else int(obj["running"]),
            labelled_by_class=tuple(int(c) for c in obj.get("labelled_by_class", ())),
            correct_by_class=tuple(int(c) for c in obj.get("correct_by_class", ())),
        )


@dataclass(frozen=True)
class CohortMetrics:
    """The canary cohort (candidate) and the control cohort (previous) side by side."""

    canary: CohortStats
    control: CohortStats

    def to_json(self) -> dict[str, Any]:
        return {"canary": self.canary.to_json(), "control": self.control.to_json()}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> CohortMetrics:
        return cls(
            CohortStats.from_json(obj.get("canary", {})),
            CohortStats.from_json(obj.get("control", {})),
        )


# -- gate evaluation -----------------------------------------------------------


@dataclass(frozen=True)
class GateResult:
    """A gate's verdict and every number that drove it."""

    name: str
    kind: str
    verdict: Verdict
    canary_value: float | None
    control_value: float | None
    threshold: float
    canary_samples: int
    control_samples: int
    min_samples: int
    control_source: str
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "verdict": self.verdict.value,
            "canary_value": _clean(self.canary_value),
            "control_value": _clean(self.control_value),
            "threshold": self.threshold,
            "canary_samples": self.canary_samples,
            "control_samples": self.control_samples,
            "min_samples": self.min_samples,
            "control_source": self.control_source,
            "detail": self.detail,
        }


def _clean(x: float | None) -> float | None:
    if x is None or not math.isfinite(x):
        return None
    return round(x, 6)


def _samples(gate: GateSpec, s: CohortStats) -> int:
    k = gate.kind
    if k is GateKind.INSTALL_FAILURE_RATE:
        return s.installs
    if k is GateKind.ERROR_RATE:
        return s.inferences
    if k is GateKind.LATENCY_P95_RATIO:
        return s.latency_samples
    if k is GateKind.DRIFT_PSI:
        return s.drift_samples if gate.against == "reference" else s.feature_samples
    if k is GateKind.SHADOW_AGREEMENT:
        return s.shadow_runs
    if k is GateKind.ACCURACY:
        return s.labels
    return s.prediction_samples


def needs_control(gate: GateSpec) -> bool:
    """Whether the gate compares with a control cohort at all."""
    if gate.kind in (GateKind.INSTALL_FAILURE_RATE, GateKind.SHADOW_AGREEMENT):
        return False
    return not (gate.kind is GateKind.DRIFT_PSI and gate.against == "reference")


def evaluate_gate(
    gate: GateSpec,
    metrics: CohortMetrics,
    *,
    live_control: bool,
    baseline: CohortStats | None = None,
) -> GateResult:
    """Evaluate one gate.

    ``live_control`` says whether a control cohort exists at this stage (the
    group has devices on the previous bundle). Without one, control-relative
    gates compare with ``baseline`` (the control figures recorded when the
    rollout last advanced) if it holds enough samples, and otherwise are skipped
    (error rate: tested against the threshold on its own).
    """
    if gate.kind is GateKind.DRIFT_PSI and gate.against == "reference":
        return evaluate_reference_drift(gate, metrics.canary)
    canary = metrics.canary
    n_can = _samples(gate, canary)
    control: CohortStats | None = None
    source = "none"
    if needs_control(gate):
        if live_control:
            control, source = metrics.control, "control"
        elif baseline is not None and _samples(gate, baseline) >= gate.min_samples:
            control, source = baseline, "baseline"
    n_ctl = _samples(gate, control) if control is not None else 0

    def result(verdict: Verdict, cv: float | None, kv: float | None, detail: str) -> GateResult:
        return GateResult(
            gate.name,
            gate.kind.value,
            verdict,
            cv,
            kv,
            gate.threshold,
            n_can,
            n_ctl,
            gate.min_samples,
            source,
            detail,
        )

    if n_can < gate.min_samples or (control is not None and n_ctl < gate.min_samples):
        return result(
            Verdict.WAIT,
            None,
            None,
            f"insufficient samples: canary {n_can}, control {n_ctl}, need {gate.min_samples} each",
        )
    z = z_for(gate.confidence)
    kind = gate.kind

    if kind is GateKind.INSTALL_FAILURE_RATE or (kind is GateKind.ERROR_RATE and control is None):
        x = canary.install_failures if kind is GateKind.INSTALL_FAILURE_RATE else canary.errors
        lo, hi = wilson(x, n_can, z)
        verdict = Verdict.BREACH if lo > gate.threshold else Verdict.PASS
        return result(
            verdict,
            x / n_can,
            None,
            f"Wilson {gate.confidence:.0%} interval of canary rate "
            f"[{lo:.4f}, {hi:.4f}]; breach iff lower bound > {gate.threshold}",
        )

    if kind is GateKind.SHADOW_AGREEMENT:
        x = canary.shadow_agreements
        lo, hi = wilson(x, n_can, z)
        verdict = Verdict.BREACH if hi < gate.threshold else Verdict.PASS
        return result(
            verdict,
            x / n_can,
            None,
            f"shadow agreed with the active model on {x} of {n_can} inputs; Wilson "
            f"{gate.confidence:.0%} interval [{lo:.4f}, {hi:.4f}]; breach iff upper "
            f"bound < {gate.threshold}",
        )

    if control is None:
        return result(Verdict.SKIP, None, None, "no control cohort and no baseline to compare")

    if kind is GateKind.ACCURACY:
        lo, hi = newcombe_diff(control.labels_correct, n_ctl, canary.labels_correct, n_can, z)
        verdict = Verdict.BREACH if lo > gate.threshold else Verdict.PASS
        return result(
            verdict,
            canary.labels_correct / n_can,
            control.labels_correct / n_ctl,
            f"accuracy on labelled predictions: canary {canary.labels_correct}/{n_can}, "
            f"control {control.labels_correct}/{n_ctl}; Newcombe {gate.confidence:.0%} "
            f"interval of the drop (control - canary) [{lo:.4f}, {hi:.4f}]; breach iff "
            f"lower bound > {gate.threshold}",
        )

    if kind is GateKind.ERROR_RATE:
        lo, hi = newcombe_diff(canary.errors, n_can, control.errors, n_ctl, z)
        verdict = Verdict.BREACH if lo > gate.threshold else Verdict.PASS
        return result(
            verdict,
            canary.errors / n_can,
            control.errors / n_ctl,
            f"Newcombe {gate.confidence:.0%} interval of rate difference "
            f"[{lo:.4f}, {hi:.4f}]; breach iff lower bound > {gate.threshold}",
        )

    if kind is GateKind.LATENCY_P95_RATIO:
        pc = hist_quantile(canary.latency_hist, 0.95) or 0.0
        pk = hist_quantile(control.latency_hist, 0.95) or 0.0
        floor = gate.floor_ms
        ratio = max(pc, floor) / max(pk, floor, 1e-6)
        verdict = Verdict.BREACH if ratio > gate.threshold else Verdict.PASS
        floored = f" (each at least the floor {floor:g} ms)" if floor else ""
        return result(
            verdict,
            pc,
            pk,
            f"p95 canary {pc:.3f} ms / control {pk:.3f} ms{floored} = {ratio:.3f}; "
            f"breach iff > {gate.threshold}",
        )

    if kind is GateKind.DRIFT_PSI:
        common = sorted(set(canary.feature_counts) & set(control.feature_counts))
        if not common:
            return result(Verdict.SKIP, None, None, "cohorts share no binned input feature")
        per = {f: psi(canary.feature_counts[f], control.feature_counts[f]) for f in common}
        worst = max(per, key=lambda f: per[f])
        verdict = Verdict.BREACH if per[worst] > gate.threshold else Verdict.PASS
        return result(
            verdict,
            per[worst],
            0.0,
            f"max feature PSI canary vs control {per[worst]:.4f} ({worst}); "
            f"breach iff > {gate.threshold}",
        )

    # prediction shift
    value = (
        psi(canary.prediction_counts, control.prediction_counts)
        if gate.metric == "psi"
        else js_divergence(canary.prediction_counts, control.prediction_counts)
    )
    verdict = Verdict.BREACH if value > gate.threshold else Verdict.PASS
    return result(
        verdict,
        value,
        0.0,
        f"{gate.metric.upper()} of prediction distributions canary vs control "
        f"{value:.4f}; breach iff > {gate.threshold}",
    )


def evaluate_reference_drift(gate: GateSpec, canary: CohortStats) -> GateResult:
    """The ``drift_psi`` gate against the bundle's reference profile (canary only)."""
    n = canary.drift_samples
    value = canary.drift_psi
    if n < gate.min_samples or value is None:
        return GateResult(
            gate.name,
            gate.kind.value,
            Verdict.WAIT,
            None,
            None,
            gate.threshold,
            n,
            0,
            gate.min_samples,
            "none",
            f"insufficient samples: canary {n}, need {gate.min_samples}",
        )
    verdict = Verdict.BREACH if value > gate.threshold else Verdict.PASS
    return GateResult(
        gate.name,
        gate.kind.value,
        verdict,
        value,
        None,
        gate.threshold,
        n,
        0,
        gate.min_samples,
        "none",
        f"canary PSI vs reference profile {value:.4f} (max over features); "
        f"breach iff > {gate.threshold}",
    )


def skipped(gate: GateSpec, detail: str) -> GateResult:
    """A gate that cannot apply to this rollout, with why."""
    return GateResult(
        gate.name,
        gate.kind.value,
        Verdict.SKIP,
        None,
        None,
        gate.threshold,
        0,
        0,
        gate.min_samples,
        "none",
        detail,
    )


def evaluate_gates(
    gates: Sequence[GateSpec],
    metrics: CohortMetrics,
    *,
    live_control: bool,
    baseline: CohortStats | None = None,
) -> list[GateResult]:
    """Evaluate every gate (see :func:`evaluate_gate`)."""
    return [evaluate_gate(g, metrics, live_control=live_control, baseline=baseline) for g in gates]
