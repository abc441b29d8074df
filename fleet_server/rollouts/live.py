"""The live picture of one rollout, for ``GET /rollouts/{id}/status`` and ``rollout status``.

A read model: it changes nothing. It puts together what an operator watching a rollout
needs on one screen: the stage (numbered from 1, the one numbering people see), the soak
progress, every gate's value against its threshold with sample counts (the engine's own
decision on the current figures), the group's devices by state, why devices refused or
failed the candidate (install reports over HTTP and install events over MQTT, counted by
error code), what holds the rollout and which operator actions apply now.
"""

from __future__ import annotations

import time
from collections import Counter
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from fleet_server.db.models import (
    Assignment,
    AuditEntry,
    Device,
    DeviceReport,
    Group,
    Rollout,
)
from fleet_server.db.telemetry import FAILED_INSTALL_OUTCOMES, TelemetryEvent
from fleet_server.registry.groups import group_members
from fleet_server.registry.running import running
from fleet_server.rollouts import RolloutError, decide
from fleet_server.rollouts.figures import cohort_metrics
from fleet_server.rollouts.numbering import people_stages as people_stages
from fleet_server.rollouts.spec import RolloutSpec, RolloutState, Status

#: operator actions per status, in the order the CLI lists them
ACTIONS: dict[str, tuple[str, ...]] = {
    "pending": ("start", "abort"),
    "running": ("pause", "promote", "abort", "rollback"),
    "paused": ("resume", "promote", "abort", "rollback"),
    "succeeded": ("rollback",),
    "aborted": ("rollback",),
    "rolled_back": (),
}

#: device states, in display order
DEVICE_STATES = (
    "on candidate",
    "shadowing candidate",
    "on previous",
    "on rollback bundle",
    "updating",
    "refused or failed",
    "not reported",
    "other",
)


def stage_number(state: RolloutState) -> int:
    """The stage people see: 1 for the first stage, 0 while pending."""
    return state.stage + 1


def live_status(
    session: Session, row: Rollout, spec: RolloutSpec, state: RolloutState
) -> dict[str, Any]:
    """Everything ``rollout status`` shows, as JSON-ready data."""
    now = time.time()
    status = state.status.value
    stages = len(spec.stages)
    out: dict[str, Any] = {
        "rollout_id": row.id,
        "status": status,
        "stage_number": stage_number(state),
        "stages_total": stages,
        "stages": [
            {
                "number": i + 1,
                "percent": s.percent,
                "min_devices": s.min_devices,
                "soak_seconds": s.soak_seconds,
            }
            for i, s in enumerate(spec.stages)
        ],
        "candidate": spec.bundle.to_json(),
        "previous": spec.previous.to_json() if spec.previous else None,
        "rollback_bundle": state.rollback_bundle.to_json() if state.rollback_bundle else None,
        "stage_started_at": state.stage_started_at,
        "now": now,
        "evaluation": None,
        "actions": list(ACTIONS.get(status, ())),
    }
    if status in ("running", "paused"):
        try:
            d = decide(spec, state, cohort_metrics(session, spec, state, now), now)
            out["evaluation"] = d.to_json()
            out["evaluation"]["to_stage_number"] = None if d.to_stage is None else d.to_stage + 1
        except RolloutError as e:
            out["evaluation"] = {"action": "hold", "reason": f"cannot evaluate: {e}", "gates": []}
    if status not in ("pending",) and not (out["evaluation"] or {}).get("gates"):
        out["last_decision"] = _last_decision(session, row.id)
    group = session.get(Group, row.group_id)
    members = group_members(session, group) if group is not None else []
    out["group"] = {"id": row.group_id, "name": group.name if group else None}
    out["devices"] = _devices(session, members, spec, state)
    out["refusals"] = _refusals(session, spec, state, [d.id for d in members])
    pauses = [h for h in state.history if Status(h.to_status) is Status.PAUSED]
    if status == "paused" and pauses:
        out["paused_by"] = f"{pauses[-1].actor}: {pauses[-1].reason}".rstrip(": ")
    out["holding"] = _holding(out)
    return out


def _last_decision(session: Session, rollout_id: str) -> dict[str, Any] | None:
    """The engine's last decision with gate figures (what paused or rolled it back)."""
    rows = session.scalars(
        select(AuditEntry)
        .where(AuditEntry.target_id == rollout_id, AuditEntry.action.like("rollout.%"))
        .order_by(AuditEntry.id.desc())
        .limit(50)
    )
    for e in rows:
        details = e.details or {}
        if details.get("gates"):
            return {
                "at": e.ts.timestamp(),
                "action": details.get("action", e.action.removeprefix("rollout.")),
                "reason": details.get("reason", ""),
                "stage_number": int(details.get("stage", -1)) + 1,
                "gates": details["gates"],
                "metrics": details.get("metrics"),
            }
    return None


def _devices(
    session: Session, members: list[Device], spec: RolloutSpec, state: RolloutState
) -> dict[str, Any]:
    ids = [d.id for d in members]
    cand = spec.bundle
    # this rollout's model only: on a device running several models, the others have
    # their own assignments and rollouts
    assigned = (
        {
            a.device_id: a
            for a in session.scalars(
                select(Assignment).where(
                    Assignment.device_id.in_(ids), Assignment.model == cand.name
                )
            )
        }
        if ids
        else {}
    )
    models = running(session, cand.name, ids)
    failed = _failed_devices(session, spec, state, ids)
    prev = spec.previous
    rb = state.rollback_bundle
    by_state: Counter[str] = Counter()
    by_version: Counter[str] = Counter()
    for d in members:
        m = models.get(d.id)
        runs = (cand.name, m.version) if m is not None else (None, None)
        by_version[f"{cand.name} v{m.version}" if m is not None else "none"] += 1
        a = assigned.get(d.id)
        if runs == (cand.name, cand.version):
            key = "on candidate"
        elif rb is not None and runs == (rb.name, rb.version):
            key = "on rollback bundle"
        elif d.id in failed:
            key = "refused or failed"
        elif a is not None and a.shadow_bundle_id == cand.bundle_id:
            key = "shadowing candidate"
        elif (
            a is not None
            and a.desired_bundle_id
            and a.desired_bundle_id != (m.bundle_id if m is not None else None)
        ):
            key = "updating"
        elif prev is not None and runs == (prev.name, prev.version):
            key = "on previous"
        elif m is None:
            key = "not reported"
        else:
            key = "other"
        by_state[key] += 1
    return {
        "total": len(members),
        "by_state": {k: by_state[k] for k in DEVICE_STATES if by_state[k]},
        "by_version": dict(sorted(by_version.items())),
    }


def _since(state: RolloutState) -> float:
    starts = [h.ts for h in state.history if h.action == "start"]
    return min(starts) if starts else 0.0


def _failed_devices(
    session: Session, spec: RolloutSpec, state: RolloutState, ids: list[str]
) -> set[str]:
    return {r["device"] for r in _failure_rows(session, spec, state, ids)}


def _failure_rows(
    session: Session, spec: RolloutSpec, state: RolloutState, ids: list[str]
) -> list[dict[str, Any]]:
    """Install failures of the candidate by the group's devices since the rollout started."""
    if not ids:
        return []
    keep = set(ids)
    since = _since(state)
    rows: list[dict[str, Any]] = []
    r = DeviceReport
    http = select(r.device_id, r.outcome, r.error_code, r.body, r.received_at).where(
        r.type == "install",
        r.name == spec.bundle.name,
        r.version == spec.bundle.version,
        r.outcome.in_(FAILED_INSTALL_OUTCOMES),
        r.received_at >= datetime.fromtimestamp(since, timezone.utc),
    )
    for device_id, outcome, code, body, at in session.execute(http):
        if device_id in keep:
            message = (body or {}).get("message") if isinstance(body, dict) else None
            rows.append(
                {
                    "device": device_id,
                    "outcome": outcome,
                    "code": code or outcome or "unknown",
                    "message": message or "",
                    "at": at.timestamp() if at else None,
                }
            )
    e = TelemetryEvent
    mqtt = select(e.device_id, e.outcome, e.error_code, e.message, e.received_at).where(
        e.type == "install",
        e.name == spec.bundle.name,
        e.version == spec.bundle.version,
        e.outcome.in_(FAILED_INSTALL_OUTCOMES),
        e.received_at >= since,
    )
    for device_id, outcome, code, message, at in session.execute(mqtt):
        if device_id in keep:
            rows.append(
                {
                    "device": device_id,
                    "outcome": outcome,
                    "code": code or outcome or "unknown",
                    "message": message or "",
                    "at": at,
                }
            )
    return rows


def _refusals(
    session: Session, spec: RolloutSpec, state: RolloutState, ids: list[str]
) -> list[dict[str, Any]]:
    """Refusal and failure reasons with the number of devices each, most frequent first."""
    by_code: dict[str, dict[str, Any]] = {}
    for row in _failure_rows(session, spec, state, ids):
        entry = by_code.setdefault(
            row["code"],
            {"code": row["code"], "outcome": row["outcome"], "devices": set(), "message": ""},
        )
        entry["devices"].add(row["device"])
        if row["message"] and not entry["message"]:
            entry["message"] = row["message"]
    out = []
    for entry in sorted(by_code.values(), key=lambda x: (-len(x["devices"]), x["code"])):
        devices = sorted(entry["devices"])
        out.append(
            {
                "code": entry["code"],
                "outcome": entry["outcome"],
                "count": len(devices),
                "devices": devices[:10],
                "message": entry["message"][:300],
            }
        )
    return out


def _holding(status: dict[str, Any]) -> str:
    """One sentence: what holds the rollout (or where it ended)."""
    s = status["status"]
    if s == "pending":
        return "not started: run `edgefleet rollout start`"
    if s == "succeeded":
        return "finished: every stage passed"
    if s == "aborted":
        return "aborted: devices keep what they run; roll back to return them to the previous model"
    if s == "rolled_back":
        rb = status.get("rollback_bundle")
        target = f" ({rb['name']} v{rb['version']})" if rb else ""
        return f"rolled back: the group returns to the previous model{target}"
    ev = status.get("evaluation") or {}
    if s == "paused":
        why = status.get("paused_by") or "a gate breached or an operator paused it"
        return f"paused: {why}; resume, promote, abort or roll back"
    action = ev.get("action")
    if action == "hold":
        return f"waiting: {ev.get('reason', '')}"
    if action in ("advance", "complete"):
        return f"about to {action} at the next scheduler round ({ev.get('reason', '')})"
    if action in ("rollback", "pause"):
        return f"about to {action}: {ev.get('reason', '')}"
    return str(ev.get("reason", ""))
