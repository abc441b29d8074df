"""Telemetry queries for operators: per rollout, stage, version and group.

Pure summaries over the stored window summaries, sampled inference logs and
install reports: install outcomes, error rate, latency percentiles (from the
merged latency histograms), drift (inference-weighted mean of the windows'
``psi_max``) and the prediction distribution.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from fleet_server.db.models import DeviceReport
from fleet_server.db.telemetry import (
    TelemetryEvent,
    TelemetrySample,
    TelemetrySummary,
    hourly_summary_rows,
    summary_split,
)
from fleet_server.rollouts.gates import hist_quantile


@dataclass(frozen=True)
class Window:
    """What to aggregate: a model version, a time window (received), a device set."""

    name: str | None = None
    version: int | None = None
    since: float | None = None
    until: float | None = None
    devices: Collection[str] | None = None
    rollout_id: str | None = None


def _add(acc: list[int], counts: Any) -> list[int]:
    if not isinstance(counts, list):
        return acc
    if len(counts) > len(acc):
        acc = acc + [0] * (len(counts) - len(acc))
    for i, c in enumerate(counts):
        if isinstance(c, (int, float)):
            acc[i] += int(c)
    return acc


def _filter(stmt: Any, table: Any, w: Window) -> Any:
    if w.name is not None:
        stmt = stmt.where(table.name == w.name)
    if w.version is not None:
        stmt = stmt.where(table.version == w.version)
    if w.since is not None:
        stmt = stmt.where(table.received_at >= w.since)
    if w.until is not None:
        stmt = stmt.where(table.received_at < w.until)
    if w.rollout_id is not None and hasattr(table, "rollout_id"):
        stmt = stmt.where(table.rollout_id == w.rollout_id)
    return stmt


def summarize(session: Session, w: Window) -> dict[str, Any]:
    """Inference, error, latency, drift and prediction figures for ``w``."""
    s = TelemetrySummary
    # hours whose raw summaries retention removed are read from the hourly roll-ups
    rolled, raw_since = summary_split(session.connection(), w.since)
    old: list[tuple[Any, ...]] = []
    if rolled is not None and raw_since is not None:
        hi = raw_since if w.until is None else min(raw_since, w.until)
        rows = hourly_summary_rows(
            session.connection(), rolled, hi, w.name, w.version, w.rollout_id
        )
        old = [(r[0], r[1], r[2], r[3], r[4], r[6]) for r in rows]
        w = replace(w, since=raw_since)
    stmt = _filter(
        select(
            s.device_id, s.count, s.errors, s.latency_hist, s.drift_psi_max, s.prediction_counts
        ),
        s,
        w,
    )
    devices: set[str] = set()
    count = errors = 0
    hist: list[int] = []
    preds: list[int] = []
    psi_w = 0.0
    psi_n = 0
    for dev, n, err, lh, psi, pc in [*old, *session.execute(stmt)]:
        if w.devices is not None and dev not in w.devices:
            continue
        devices.add(dev)
        count += n or 0
        errors += err or 0
        hist = _add(hist, lh)
        preds = _add(preds, pc)
        if psi is not None and n:
            psi_w += float(psi) * n
            psi_n += n
    return {
        "devices": len(devices),
        "inferences": count,
        "errors": errors,
        "error_rate": errors / count if count else None,
        "latency_ms": {f"p{int(q * 100)}": hist_quantile(hist, q) for q in (0.5, 0.95, 0.99)},
        "latency_hist": hist,
        "drift_psi": psi_w / psi_n if psi_n else None,
        "prediction_counts": preds,
    }


def install_outcomes(session: Session, w: Window) -> dict[str, Any]:
    """Install outcomes per device (HTTP reports and MQTT events merged)."""
    e = TelemetryEvent
    per_device: dict[str, set[str]] = {}
    for dev, outcome in session.execute(
        _filter(select(e.device_id, e.outcome).where(e.type == "install"), e, w)
    ):
        per_device.setdefault(dev, set()).add(outcome or "unknown")
    r = DeviceReport
    stmt = select(r.device_id, r.outcome).where(r.type == "install")
    if w.name is not None:
        stmt = stmt.where(r.name == w.name)
    if w.version is not None:
        stmt = stmt.where(r.version == w.version)
    if w.since is not None:
        stmt = stmt.where(r.received_at >= datetime.fromtimestamp(w.since, timezone.utc))
    if w.until is not None:
        stmt = stmt.where(r.received_at < datetime.fromtimestamp(w.until, timezone.utc))
    if w.rollout_id is not None:
        stmt = stmt.where(r.rollout_id == w.rollout_id)
    for dev, outcome in session.execute(stmt):
        per_device.setdefault(dev, set()).add(outcome or "unknown")
    counts: dict[str, int] = {}
    reporting = 0
    for dev, outcomes in per_device.items():
        if w.devices is not None and dev not in w.devices:
            continue
        reporting += 1
        for o in outcomes:
            counts[o] = counts.get(o, 0) + 1
    return {"devices": reporting, "outcomes": counts}


def samples(session: Session, w: Window, limit: int, offset: int) -> list[dict[str, Any]]:
    """Sampled inference logs (already masked on the device), newest first."""
    t = TelemetrySample
    stmt = _filter(select(t), t, w).order_by(t.received_at.desc(), t.device_id, t.seq)
    out = []
    for row in session.scalars(stmt):
        if w.devices is not None and row.device_id not in w.devices:
            continue
        if offset:
            offset -= 1
            continue
        out.append(
            {
                "device_id": row.device_id,
                "seq": row.seq,
                "ts": row.ts,
                "received_at": row.received_at,
                "name": row.name,
                "version": row.version,
                "predicted": row.predicted,
                "body": row.body,
            }
        )
        if len(out) >= limit:
            break
    return out
