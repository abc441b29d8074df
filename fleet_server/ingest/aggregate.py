"""Aggregate stored telemetry into the engine's :class:`CohortMetrics`.

* canary: summaries of the candidate (``name``, ``version`` of ``spec.bundle``);
  for a shadow rollout, the shadow section of the summaries that ran it;
* control: summaries of the previous bundle (``spec.previous``);
* installs: ``install`` events for the candidate's name and version;
* window: records *received* since ``since`` (normally the current stage's start,
  so each stage is judged on its own evidence; server clock, immune to device skew);
* optionally only devices in ``devices`` (the rollout's target group), so the same
  model running in another group does not count.

Histograms and counts are merged by adding bins; the drift figure is the
inference-weighted mean of the windows' ``psi_max``.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from typing import Any

from sqlalchemy import Connection, Engine, select

from ..db.telemetry import FAILED_INSTALL_OUTCOMES, TelemetryEvent, TelemetrySummary
from ..rollouts.gates import CohortMetrics, CohortStats
from ..rollouts.spec import BundleRef, RolloutSpec, RolloutState, Strategy


def _add(acc: list[int], counts: Sequence[int]) -> list[int]:
    if len(counts) > len(acc):
        acc = acc + [0] * (len(counts) - len(acc))
    for i, c in enumerate(counts):
        acc[i] += int(c)
    return acc


class _Acc:
    def __init__(self) -> None:
        self.devices: set[str] = set()
        self.inferences = self.errors = 0
        self.hist: list[int] = []
        self.psi_weighted = 0.0
        self.psi_n = 0
        self.features: dict[str, list[int]] = {}
        self.preds: list[int] = []
        self.installs = self.install_failures = 0
        self.shadow_runs = self.shadow_agreements = 0

    def add_summary(
        self, device: str, count: int, errors: int, hist: Any, psi: Any, features: Any, preds: Any
    ) -> None:
        self.devices.add(device)
        self.inferences += count or 0
        self.errors += errors or 0
        if hist:
            self.hist = _add(self.hist, hist)
        if psi is not None and count:
            self.psi_weighted += float(psi) * count
            self.psi_n += count
        if features:
            for name, counts in features.items():
                cur = self.features.get(name)
                if cur is None:
                    self.features[name] = list(counts)
                elif len(cur) == len(counts):
                    self.features[name] = _add(cur, counts)
        if preds:
            self.preds = _add(self.preds, preds)

    def stats(self) -> CohortStats:
        return CohortStats(
            devices=len(self.devices),
            installs=self.installs,
            install_failures=self.install_failures,
            inferences=self.inferences,
            errors=self.errors,
            latency_hist=tuple(self.hist),
            drift_psi=self.psi_weighted / self.psi_n if self.psi_n else None,
            drift_samples=self.psi_n,
            feature_counts={k: tuple(v) for k, v in self.features.items()},
            prediction_counts=tuple(self.preds),
            shadow_agreements=self.shadow_agreements,
            shadow_runs=self.shadow_runs,
        )


def _model_rows(conn: Connection, ref: BundleRef, since: float) -> Iterable[Any]:
    s = TelemetrySummary
    return conn.execute(
        select(
            s.device_id,
            s.count,
            s.errors,
            s.latency_hist,
            s.drift_psi_max,
            s.feature_counts,
            s.prediction_counts,
        ).where(s.name == ref.name, s.version == ref.version, s.received_at >= since)
    )


def cohort_metrics(
    bind: Engine | Connection,
    spec: RolloutSpec,
    since: float,
    devices: Collection[str] | None = None,
) -> CohortMetrics:
    """The canary and control figures of ``spec`` from telemetry received since ``since``."""
    if isinstance(bind, Engine):
        with bind.connect() as conn:
            return cohort_metrics(conn, spec, since, devices)
    conn = bind
    keep = (lambda d: True) if devices is None else (lambda d: d in devices)  # noqa: E731
    canary, control = _Acc(), _Acc()
    s = TelemetrySummary
    if spec.strategy is Strategy.SHADOW:
        for dev, n, err, agreement in conn.execute(
            select(s.device_id, s.shadow_count, s.shadow_errors, s.shadow_agreement).where(
                s.shadow_name == spec.bundle.name,
                s.shadow_version == spec.bundle.version,
                s.received_at >= since,
            )
        ):
            if keep(dev):
                canary.add_summary(dev, n or 0, err or 0, None, None, None, None)
                if n and agreement is not None:
                    canary.shadow_runs += n
                    canary.shadow_agreements += round(float(agreement) * n)
    else:
        for row in _model_rows(conn, spec.bundle, since):
            if keep(row[0]):
                canary.add_summary(*row)
    if spec.previous is not None:
        for row in _model_rows(conn, spec.previous, since):
            if keep(row[0]):
                control.add_summary(*row)
    e = TelemetryEvent
    for dev, outcome in conn.execute(
        select(e.device_id, e.outcome).where(
            e.type == "install",
            e.name == spec.bundle.name,
            e.version == spec.bundle.version,
            e.received_at >= since,
        )
    ):
        if keep(dev):
            canary.installs += 1
            canary.install_failures += outcome in FAILED_INSTALL_OUTCOMES
    return CohortMetrics(canary.stats(), control.stats())


def stage_metrics(
    bind: Engine | Connection,
    spec: RolloutSpec,
    state: RolloutState,
    devices: Collection[str] | None = None,
) -> CohortMetrics:
    """:func:`cohort_metrics` over the rollout's current stage."""
    return cohort_metrics(bind, spec, state.stage_started_at or 0.0, devices)
