"""Cohort figures for the rollout engine, aggregated from stored reports and telemetry.

:func:`cohort_metrics` splits a rollout's target group into the canary cohort
(devices the engine assigned the candidate) and the control cohort (the rest,
on the previous bundle), then sums, per cohort, since the current stage started:

* install outcomes from device reports (HTTP ``/device/v1/reports`` and the
  ``events`` telemetry kind),
* inference counts, errors, latency histograms, drift and prediction counts from
  the window summaries devices publish (when the telemetry tables exist).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from .db.models import Device, DeviceReport, Group, Rollout
from .groups import matches
from .rollouts import CohortMetrics, CohortStats, RolloutSpec, RolloutState, assignment

FAILED_OUTCOMES = ("failed", "rolled_back", "refused")


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
    for d in session.scalars(select(Device).where(Device.revoked_at.is_(None))):
        if not matches(selector or {}, device_class, d.labels or {}, d.device_class):
            continue
        (canary if assignment(spec, state, d.id).canary else control).append(d.id)
    return canary, control


def _installs(
    session: Session, device_ids: list[str], name: str, version: int | None, since: datetime
) -> tuple[int, int, set[str]]:
    if not device_ids or version is None:
        return 0, 0, set()
    rows = session.execute(
        select(DeviceReport.device_id, DeviceReport.outcome).where(
            DeviceReport.type == "install", DeviceReport.name == name,
            DeviceReport.version == version, DeviceReport.received_at >= since,
            DeviceReport.device_id.in_(device_ids),
        )
    ).all()
    ok = sum(1 for _, o in rows if o == "installed")
    failed = sum(1 for _, o in rows if o in FAILED_OUTCOMES)
    return ok + failed, failed, {d for d, _ in rows}


def _summaries(
    session: Session, device_ids: list[str], name: str, version: int | None, since: float
) -> dict[str, Any]:
    """Sum window summaries (if the telemetry tables exist) for one cohort and version."""
    try:
        from .telemetry_query import summary_totals
    except ImportError:
        return {}
    if not device_ids or version is None:
        return {}
    return summary_totals(session, device_ids, name, version, since)


def _stats(
    session: Session, device_ids: list[str], name: str, version: int | None,
    since_dt: datetime, since: float,
) -> CohortStats:
    installs, failures, reporting = _installs(session, device_ids, name, version, since_dt)
    tele = _summaries(session, device_ids, name, version, since)
    reporting |= set(tele.get("devices", ()))
    return CohortStats(
        devices=len(reporting),
        installs=installs,
        install_failures=failures,
        inferences=int(tele.get("count", 0)),
        errors=int(tele.get("errors", 0)),
        latency_hist=tuple(tele.get("latency_hist", ())),
        drift_psi=tele.get("drift_psi"),
        drift_samples=int(tele.get("drift_samples", 0)),
        feature_counts=tele.get("feature_counts", {}),
        prediction_counts=tuple(tele.get("prediction_counts", ())),
    )


def cohort_metrics(
    session: Session, spec: RolloutSpec, state: RolloutState, now: float
) -> CohortMetrics:
    """Canary (candidate) and control (previous) figures since the current stage started."""
    since = state.stage_started_at if state.stage_started_at is not None else now
    since_dt = datetime.fromtimestamp(since, timezone.utc)
    canary, control = cohorts(session, spec, state)
    prev = spec.previous
    return CohortMetrics(
        canary=_stats(session, canary, spec.bundle.name, spec.bundle.version, since_dt, since),
        control=_stats(session, control, prev.name if prev else spec.bundle.name,
                       prev.version if prev else None, since_dt, since),
    )


