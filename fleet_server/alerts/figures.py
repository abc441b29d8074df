"""Each rule's figure for one round, read from the database.

Model figures come from the window summaries of the rule's model *received* in the
window (server clock) from the group's current devices: drift is the inference-weighted
mean of the windows' ``psi_max`` (the figure the report shows), error rate is errors over
inferences, p99 latency comes from the merged latency histograms, accuracy from the label
summaries apps posted (correct over labelled; no figure while the stored summaries carry
no labels). Group figures: devices not seen during the whole window (``last_seen_at``),
devices that still do not run their assigned bundle a window after it was assigned, and
records lost (holes in the devices' sequence numbers, :mod:`fleet_server.ingest.gaps`)
that appeared during the window.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from fleet_server.alerts.rules import Figure, Kind, Rule
from fleet_server.db.models import Assignment, Device, DeviceModel
from fleet_server.db.telemetry import TelemetrySample, TelemetrySummary
from fleet_server.ingest.gaps import records_lost
from fleet_server.rollouts.gates import hist_quantile


def _add(acc: list[int], counts: Any) -> list[int]:
    if not isinstance(counts, list):
        return acc
    if len(counts) > len(acc):
        acc = acc + [0] * (len(counts) - len(acc))
    for i, c in enumerate(counts):
        if isinstance(c, (int, float)):
            acc[i] += int(c)
    return acc


def model_figures(
    session: Session, model: str, devices: Collection[str], since: float, until: float
) -> dict[str, Any]:
    """Inference, error, latency, drift and label figures of ``model`` on ``devices``."""
    s = TelemetrySummary
    labels_count = getattr(s, "labels_count", None)
    labels_correct = getattr(s, "labels_correct", None)
    cols: list[Any] = [s.device_id, s.count, s.errors, s.latency_hist, s.drift_psi_max]
    if labels_count is not None and labels_correct is not None:
        cols += [labels_count, labels_correct]
    stmt = select(*cols).where(s.name == model, s.received_at >= since, s.received_at < until)
    seen: set[str] = set()
    count = errors = labelled = correct = 0
    hist: list[int] = []
    psi_w = 0.0
    psi_n = 0
    for row in session.execute(stmt):
        if row[0] not in devices:
            continue
        seen.add(row[0])
        n = row[1] or 0
        count += n
        errors += row[2] or 0
        hist = _add(hist, row[3])
        if row[4] is not None and n:
            psi_w += float(row[4]) * n
            psi_n += n
        if len(row) > 5:
            labelled += row[5] or 0
            correct += row[6] or 0
    return {
        "devices_reporting": len(seen),
        "inferences": count,
        "errors": errors,
        "error_rate": errors / count if count else None,
        "latency_p50_ms": hist_quantile(hist, 0.5),
        "latency_p95_ms": hist_quantile(hist, 0.95),
        "latency_p99_ms": hist_quantile(hist, 0.99),
        "drift_psi": psi_w / psi_n if psi_n else None,
        "drift_inferences": psi_n,
        "labelled": labelled,
        "correct": correct,
        "accuracy": correct / labelled if labelled else None,
    }


def sample_count(
    session: Session, model: str | None, devices: Collection[str], since: float, until: float
) -> int:
    """Sampled inferences stored for ``model`` (any model if None) from ``devices``."""
    t = TelemetrySample
    stmt = select(t.device_id, func.count()).where(t.received_at >= since, t.received_at < until)
    if model is not None:
        stmt = stmt.where(t.name == model)
    stmt = stmt.group_by(t.device_id)
    return sum(int(n) for d, n in session.execute(stmt) if d in devices)


def _silent(devices: Sequence[Device], since: float) -> tuple[list[str], int]:
    cutoff = datetime.fromtimestamp(since, timezone.utc)
    silent = [
        d.id
        for d in devices
        if (d.last_seen_at or d.enrolled_at) < cutoff  # never seen: silent since enrollment
    ]
    return silent, len(devices)


def _stale(session: Session, devices: Sequence[Device], since: float) -> tuple[list[str], int]:
    by_id = {d.id: d for d in devices}
    cutoff = datetime.fromtimestamp(since, timezone.utc)
    stale = []
    assigned = 0
    runs = {
        (m.device_id, m.name): m.bundle_id
        for m in session.scalars(select(DeviceModel).where(DeviceModel.device_id.in_(by_id)))
    }
    seen: set[str] = set()
    for device_id, model, desired, updated in session.execute(
        select(
            Assignment.device_id,
            Assignment.model,
            Assignment.desired_bundle_id,
            Assignment.updated_at,
        ).where(Assignment.desired_bundle_id.is_not(None))
    ):
        if device_id not in by_id:
            continue
        if device_id not in seen:
            seen.add(device_id)
            assigned += 1
        # each model of the device against its own assignment
        if runs.get((device_id, model)) != desired and updated < cutoff:
            stale.append(device_id)
    return sorted(set(stale)), assigned


def lost_total(engine: Engine, devices: Collection[str]) -> int:
    """Records lost so far by ``devices`` (all time; the rule takes the window's increase)."""
    return sum(loss.records for loss in records_lost(engine, device_ids=sorted(devices)))


def figure_for(
    rule: Rule,
    session: Session,
    engine: Engine,
    devices: Sequence[Device],
    now: float,
    memo: dict[str, Any],
    shared: dict[Any, dict[str, Any]] | None = None,
) -> tuple[Figure, dict[str, Any]]:
    """This round's figure of ``rule`` and the memo to keep for the next round.

    ``shared``: a dict kept for one round, so rules on the same model, group and window
    (drift, errors, latency, accuracy) read the summaries once."""
    since = now - rule.window_seconds
    ids = {d.id for d in devices}
    if not devices:
        return Figure(None, no_data="the group has no devices"), memo
    if rule.kind.needs_model:
        assert rule.model is not None
        key = (rule.model, rule.group, since, now)
        if shared is not None and key in shared:
            f = dict(shared[key])
        else:
            f = model_figures(session, rule.model, ids, since, now)
            f["devices"] = len(devices)
            f["samples_stored"] = sample_count(session, rule.model, ids, since, now)
            if shared is not None:
                shared[key] = dict(f)
        if f["inferences"] == 0:
            return Figure(
                None, no_data=f"no summaries of {rule.model} in the window", details=f
            ), memo
        if rule.kind is Kind.drift:
            value, samples = f["drift_psi"], f["drift_inferences"]
            why = "the summaries carry no drift figures (no drift profile in the bundle?)"
        elif rule.kind is Kind.error_rate:
            value, samples, why = f["error_rate"], f["inferences"], ""
        elif rule.kind is Kind.latency_p99:
            value, samples = f["latency_p99_ms"], f["inferences"]
            why = "the summaries carry no latency histograms"
        else:
            value, samples = f["accuracy"], f["labelled"]
            why = "no labelled predictions in the window (apps post labels with Agent.label)"
        return Figure(value, samples, None if value is not None else why, f), memo
    if rule.kind is Kind.silent:
        silent, n = _silent(devices, since)
        details = {"devices": n, "silent": silent[:50], "devices_silent": len(silent)}
        return Figure(float(len(silent)), n, details=details), memo
    if rule.kind is Kind.stale:
        stale, assigned = _stale(session, devices, since)
        details = {
            "devices": len(devices),
            "assigned": assigned,
            "stale": stale[:50],
            "devices_stale": len(stale),
        }
        return Figure(float(len(stale)), assigned, details=details), memo
    # records lost: the increase of the all-time total over the window, from the totals
    # this rule saw in earlier rounds (the first round counts everything lost so far)
    total = lost_total(engine, ids)
    # before the first round nothing was counted: everything lost so far is new
    seen = sorted((float(t), int(v)) for t, v in memo.get("lost", [(since, 0)]))
    before = [h for h in seen if h[0] < since]
    history = before[-1:] + [h for h in seen if h[0] >= since]  # the baseline and the window
    base = history[0][1] if history else 0
    history.append((now, total))
    details = {"devices": len(devices), "records_lost_total": total}
    return Figure(float(max(total - base, 0)), len(devices), details=details), {"lost": history}


__all__ = ["figure_for", "lost_total", "model_figures", "sample_count"]
