"""Cohort figures for the rollout engine.

:func:`cohort_metrics` splits a rollout's target group into the canary cohort
(devices the engine assigned the candidate) and the control cohort (the rest),
takes the telemetry figures from :func:`fleet_server.ingest.aggregate.cohort_metrics`
(window summaries received since the current stage started, restricted to the
group), and counts installs per *device* from both channels a device may use:
``install`` events over MQTT and install reports over HTTP. A device reporting
the same install on both channels counts once; it counts as failed if any of its
reports for the candidate says failed, rolled back or refused.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timezone

from sqlalchemy import select
from sqlalchemy.orm import Session

from .db.models import Bundle, Device, DeviceReport, Group, Rollout
from .db.telemetry import FAILED_INSTALL_OUTCOMES, TelemetryEvent
from .groups import matches
from .ingest.aggregate import cohort_metrics as telemetry_metrics
from .profiles import reference_proportions
from .rollouts import CohortMetrics, RolloutSpec, RolloutState, assignment
from .rollouts.gates import psi


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
    tele = telemetry_metrics(session.connection(), spec, since, set(canary) | set(control))
    # telemetry is split by model version; keep each cohort's devices only
    installs = install_outcomes(session, canary, spec.bundle.name, spec.bundle.version, since)
    failed = sum(1 for o in installs.values() if o & set(FAILED_INSTALL_OUTCOMES))
    counted = sum(1 for o in installs.values() if o & {"installed", *FAILED_INSTALL_OUTCOMES})
    canary_stats = replace(
        tele.canary,
        installs=counted,
        install_failures=failed,
        devices=max(tele.canary.devices, len(installs)),
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
    return CohortMetrics(canary=canary_stats, control=tele.control)
