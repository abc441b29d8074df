"""Cohort figures for the rollout engine: what the gates are fed.

:func:`cohort_metrics` splits a rollout's target group into the canary cohort
(devices the engine assigned the candidate) and the control cohort (the rest),
takes the telemetry figures from :func:`telemetry_figures`, and counts installs per
*device* from both channels a device may use: ``install`` events over MQTT and install
reports over HTTP. A device reporting the same install on both channels counts once; it
counts as failed if any of its reports for the candidate says failed, rolled back or
refused.

:func:`telemetry_figures` reads stored telemetry:

* canary: summaries of the candidate (``name``, ``version`` of ``spec.bundle``);
  for a shadow rollout, the shadow section of the summaries that ran it; agreement
  of a staged canary from the ``previous`` section (the model the candidate replaced,
  run beside it on a sample of inputs); labelled predictions and how many were right;
* control: summaries of the previous bundle (``spec.previous``);
* installs: ``install`` events for the candidate's name and version;
* window: records *received* since ``since`` (normally the current stage's start,
  so each stage is judged on its own evidence; server clock, immune to device skew);
* optionally only devices in ``devices`` (the rollout's target group), so the same
  model running in another group does not count.

Histograms and counts are merged by adding bins; the drift figure against the
bundle's reference is computed from the cohort's pooled binned counts.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Sequence
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import Connection, Engine, select
from sqlalchemy.orm import Session

from fleet_server.db.models import Bundle, Device, DeviceModel, DeviceReport, Group, Rollout
from fleet_server.db.telemetry import (
    FAILED_INSTALL_OUTCOMES,
    TelemetryEvent,
    TelemetryHourly,
    TelemetrySummary,
    hourly_shadow_rows,
    hourly_summary_rows,
    summary_split,
)
from fleet_server.registry.groups import matches
from fleet_server.registry.profiles import reference_proportions
from fleet_server.rollouts.cohort import assignment
from fleet_server.rollouts.gates import CohortMetrics, CohortStats, psi
from fleet_server.rollouts.spec import BundleRef, RolloutSpec, RolloutState, Strategy


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
        self.labels = self.labels_correct = 0
        self.labelled_by_class: list[int] = []
        self.correct_by_class: list[int] = []

    def add_label_summary(self, summary: Any) -> None:
        """Per-class label counts of one window (protocol ``LabelSummary``)."""
        if isinstance(summary, str):
            summary = json.loads(summary)
        if not isinstance(summary, dict):
            return
        labelled, correct = summary.get("labelled"), summary.get("correct_by_class")
        if isinstance(labelled, list) and isinstance(correct, list):
            self.labelled_by_class = _add(self.labelled_by_class, labelled)
            self.correct_by_class = _add(self.correct_by_class, correct)

    def add_agreement(self, runs: int | None, agreement: float | None) -> None:
        if runs and agreement is not None:
            self.shadow_runs += runs
            self.shadow_agreements += round(float(agreement) * runs)

    def add_summary(
        self,
        device: str,
        count: int,
        errors: int,
        hist: Any,
        psi: Any,
        features: Any,
        preds: Any,
        labels: int | None = None,
        correct: int | None = None,
    ) -> None:
        self.devices.add(device)
        self.labels += labels or 0
        self.labels_correct += correct or 0
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
            labels=self.labels,
            labels_correct=self.labels_correct,
            labelled_by_class=tuple(self.labelled_by_class),
            correct_by_class=tuple(self.correct_by_class),
        )


def _model_rows(conn: Connection, ref: BundleRef, since: float) -> Iterable[Any]:
    """Summaries of ``ref`` received since ``since``: hours whose raw rows retention
    removed come from the hourly roll-ups (the same sums)."""
    s = TelemetrySummary
    rolled, raw_since = summary_split(conn, since)
    if rolled is not None and raw_since is not None:
        yield from hourly_summary_rows(conn, rolled, raw_since, ref.name, ref.version)
        since = raw_since
    yield from conn.execute(
        select(
            s.device_id,
            s.count,
            s.errors,
            s.latency_hist,
            s.drift_psi_max,
            s.feature_counts,
            s.prediction_counts,
            s.labels_count,
            s.labels_correct,
            s.previous_count,
            s.previous_agreement,
            s.labels,
        ).where(s.name == ref.name, s.version == ref.version, s.received_at >= since)
    )


def telemetry_figures(
    bind: Engine | Connection,
    spec: RolloutSpec,
    since: float,
    devices: Collection[str] | None = None,
) -> CohortMetrics:
    """The canary and control figures of ``spec`` from telemetry received since ``since``
    (by model version; ``devices`` restricts them to the rollout's group)."""
    if isinstance(bind, Engine):
        with bind.connect() as conn:
            return telemetry_figures(conn, spec, since, devices)
    conn = bind
    keep = (lambda d: True) if devices is None else (lambda d: d in devices)  # noqa: E731
    canary, control = _Acc(), _Acc()
    s = TelemetrySummary
    if spec.strategy is Strategy.SHADOW:
        rolled, raw_since = summary_split(conn, since)
        old = (
            hourly_shadow_rows(conn, rolled, raw_since, spec.bundle.name, spec.bundle.version)
            if rolled is not None and raw_since is not None
            else []
        )
        for dev, n, err, agreement in [
            *old,
            *conn.execute(
                select(s.device_id, s.shadow_count, s.shadow_errors, s.shadow_agreement).where(
                    s.shadow_name == spec.bundle.name,
                    s.shadow_version == spec.bundle.version,
                    s.received_at >= (raw_since if raw_since is not None else since),
                )
            ),
        ]:
            if keep(dev):
                canary.add_summary(dev, n or 0, err or 0, None, None, None, None)
                canary.add_agreement(n, agreement)
    else:
        for row in _model_rows(conn, spec.bundle, since):
            if keep(row[0]):
                canary.add_summary(*row[:9])
                canary.add_agreement(row[9], row[10])
                canary.add_label_summary(row[11])
    if spec.previous is not None:
        for row in _model_rows(conn, spec.previous, since):
            if keep(row[0]):
                control.add_summary(*row[:9])
                control.add_label_summary(row[11])
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


def cohorts(
    session: Session, spec: RolloutSpec, state: RolloutState
) -> tuple[list[str], list[str]]:
    """(canary device ids, control device ids) of the rollout's group, now."""
    row = session.get(Rollout, spec.rollout_id)
    group = session.get(Group, row.group_id) if row is not None else None
    selector = group.selector if group is not None else spec.selector
    device_class = group.device_class if group is not None else None
    canary: list[str] = []
    control: list[str] = []
    # three columns, not Device objects: the scheduler asks this every few seconds for
    # every active rollout, and building ten thousand ORM rows cost seconds each time
    rows = session.execute(
        select(Device.id, Device.labels, Device.device_class).where(Device.revoked_at.is_(None))
    )
    for device_id, labels, klass in rows:
        if not matches(selector or {}, device_class, labels or {}, klass):
            continue
        (canary if assignment(spec, state, device_id).canary else control).append(device_id)
    return canary, control


def install_outcomes(
    session: Session, device_ids: list[str], name: str, version: int, since: float
) -> dict[str, set[str]]:
    """device id -> install outcomes reported for (name, version) since ``since``."""
    out: dict[str, set[str]] = {}
    if not device_ids:
        return out
    keep = set(device_ids)
    since_dt = datetime.fromtimestamp(since, timezone.utc)
    http = select(DeviceReport.device_id, DeviceReport.outcome).where(
        DeviceReport.type == "install",
        DeviceReport.name == name,
        DeviceReport.version == version,
        DeviceReport.received_at >= since_dt,
    )
    e = TelemetryEvent
    mqtt = select(e.device_id, e.outcome).where(
        e.type == "install",
        e.name == name,
        e.version == version,
        e.received_at >= since,
    )
    for stmt in (http, mqtt):
        for device_id, outcome in session.execute(stmt):
            if device_id in keep and outcome:
                out.setdefault(device_id, set()).add(outcome)
    return out


def cohort_metrics(
    session: Session, spec: RolloutSpec, state: RolloutState, now: float
) -> CohortMetrics:
    """Canary (candidate) and control (previous) figures since the current stage started."""
    since = state.stage_started_at if state.stage_started_at is not None else now
    canary, control = cohorts(session, spec, state)
    tele = telemetry_figures(session.connection(), spec, since, set(canary) | set(control))
    # telemetry is split by model version; keep each cohort's devices only
    installs = install_outcomes(session, canary, spec.bundle.name, spec.bundle.version, since)
    failed = sum(1 for o in installs.values() if o & set(FAILED_INSTALL_OUTCOMES))
    counted = sum(1 for o in installs.values() if o & {"installed", *FAILED_INSTALL_OUTCOMES})
    predicting = _predicting_devices(session, spec, since)
    silent = sorted(d for d in canary if d not in predicting)
    running = _running_candidate(session, spec, canary)
    canary_stats = replace(
        tele.canary,
        installs=counted,
        install_failures=failed,
        devices=max(tele.canary.devices, len(installs)),
        members=len(canary),
        silent_count=len(silent),
        silent=tuple(silent[:20]),
        running=running,
    )
    # drift against the reference: pool the cohort's binned counts over every window
    # and device, then compare with the bundle's reference proportions; a mean of
    # per-window PSIs would be biased upwards by small windows
    reference = reference_proportions(session.get(Bundle, spec.bundle.bundle_id))
    common = [f for f in reference if f in canary_stats.feature_counts]
    if common:
        pooled = max(psi(canary_stats.feature_counts[f], reference[f]) for f in common)
        canary_stats = replace(
            canary_stats, drift_psi=pooled, drift_samples=canary_stats.feature_samples
        )
    return CohortMetrics(canary=canary_stats, control=replace(tele.control, members=len(control)))


def _running_candidate(session: Session, spec: RolloutSpec, canary: list[str]) -> int:
    """Canary devices whose last install report says they run the candidate (installed
    in this stage or an earlier one)."""
    if not canary:
        return 0
    m = DeviceModel
    stmt = select(m.device_id).where(
        m.device_id.in_(canary),
        m.name == spec.bundle.name,
        m.version == spec.bundle.version,
    )
    return len(set(session.scalars(stmt)))


def _predicting_devices(session: Session, spec: RolloutSpec, since: float) -> set[str]:
    """Devices that sent at least one prediction of the candidate since ``since`` (for a
    shadow rollout: one shadow run)."""
    s = TelemetrySummary
    if spec.strategy is Strategy.SHADOW:
        cond = [
            s.shadow_name == spec.bundle.name,
            s.shadow_version == spec.bundle.version,
            s.shadow_count > 0,
        ]
    else:
        cond = [s.name == spec.bundle.name, s.version == spec.bundle.version, s.count > 0]
    stmt = select(s.device_id).where(*cond, s.received_at >= since).distinct()
    found = set(session.scalars(stmt))
    rolled, raw_since = summary_split(session.connection(), since)
    if rolled is not None and raw_since is not None:
        h = TelemetryHourly
        shadow = spec.strategy is Strategy.SHADOW
        hourly = select(h.device_id).where(
            (h.shadow_name if shadow else h.name) == spec.bundle.name,
            (h.shadow_version if shadow else h.version) == spec.bundle.version,
            (h.shadow_count if shadow else h.count) > 0,
            h.hour >= rolled,
            h.hour < raw_since,
        )
        found |= set(session.scalars(hourly.distinct()))
    return found
