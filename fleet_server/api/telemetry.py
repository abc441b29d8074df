"""Telemetry queries (per rollout, stage, version, group) and the audit log."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel
from sqlalchemy import select

from fleet_server.api.deps import SessionDep, ViewerDep
from fleet_server.api.devices import get_group_or_404
from fleet_server.api.pagination import Page, PageDep, paginate
from fleet_server.db.models import AuditEntry, Rollout
from fleet_server.errors import BadRequestError, NotFoundError
from fleet_server.registry.groups import group_members
from fleet_server.report.queries import Window, install_outcomes, samples, summarize

router = APIRouter()

Num = Annotated[float | None, Query(ge=0, le=1e11, description="UNIX seconds (server clock)")]


class TelemetryReport(BaseModel):
    window: dict[str, Any]
    installs: dict[str, Any]
    summary: dict[str, Any]


class SamplePage(BaseModel):
    window: dict[str, Any]
    items: list[dict[str, Any]]
    limit: int
    offset: int


def stage_window(state: dict[str, Any], stage: int) -> tuple[float | None, float | None]:
    """When ``stage`` ran, from the rollout state's history: (start, end or None)."""
    start = end = None
    for h in state.get("history", []):
        s, ts = h.get("stage"), h.get("ts")
        if not isinstance(ts, (int, float)):
            continue
        if s == stage and start is None:
            start = float(ts)
        elif (
            start is not None
            and end is None
            and (s != stage or h.get("to_status") in ("succeeded", "rolled_back", "aborted"))
        ):
            end = float(ts)
    return start, end


def _window(
    session: Any,
    *,
    rollout_id: str | None,
    stage: int | None,
    cohort: str,
    name: str | None,
    version: int | None,
    group: str | None,
    since: float | None,
    until: float | None,
) -> Window:
    devices = None
    rid = None
    if group:
        devices = {d.id for d in group_members(session, get_group_or_404(session, group))}
    if rollout_id:
        r = session.get(Rollout, rollout_id)
        if r is None:
            raise NotFoundError(f"rollout {rollout_id} does not exist")
        ref = r.spec.get("bundle") if cohort == "canary" else r.spec.get("previous")
        if ref is None:
            raise BadRequestError(f"rollout {rollout_id} has no {cohort} bundle")
        name = name or ref["name"]
        version = version if version is not None else int(ref["version"])
        if devices is None:
            from fleet_server.db.models import Group

            g = session.get(Group, r.group_id)
            devices = {d.id for d in group_members(session, g)} if g is not None else None
        if stage is not None:
            start, end = stage_window(r.state, stage)
            if start is None:
                raise NotFoundError(f"rollout {rollout_id} has not reached stage {stage}")
            since = max(since or start, start)
            until = min(until, end) if (until is not None and end is not None) else (until or end)
    elif stage is not None:
        raise BadRequestError("stage needs rollout_id")
    return Window(
        name=name, version=version, since=since, until=until, devices=devices, rollout_id=rid
    )


def _window_json(w: Window) -> dict[str, Any]:
    return {
        "name": w.name,
        "version": w.version,
        "since": w.since,
        "until": w.until,
        "devices": None if w.devices is None else len(w.devices),
    }


@router.get("/telemetry", response_model=TelemetryReport, tags=["telemetry"])
def telemetry(
    session: SessionDep,
    who: ViewerDep,
    rollout_id: Annotated[str | None, Query(max_length=40)] = None,
    stage: Annotated[int | None, Query(ge=0, le=100)] = None,
    cohort: Literal["canary", "control"] = "canary",
    name: Annotated[str | None, Query(max_length=200)] = None,
    version: Annotated[int | None, Query(ge=0, le=2**31 - 1)] = None,
    group: Annotated[str | None, Query(max_length=200)] = None,
    since: Num = None,
    until: Num = None,
) -> TelemetryReport:
    """Install outcomes, error rate, latency percentiles, drift and predictions."""
    w = _window(
        session,
        rollout_id=rollout_id,
        stage=stage,
        cohort=cohort,
        name=name,
        version=version,
        group=group,
        since=since,
        until=until,
    )
    return TelemetryReport(
        window=_window_json(w), installs=install_outcomes(session, w), summary=summarize(session, w)
    )


@router.get("/telemetry/samples", response_model=SamplePage, tags=["telemetry"])
def telemetry_samples(
    session: SessionDep,
    who: ViewerDep,
    rollout_id: Annotated[str | None, Query(max_length=40)] = None,
    stage: Annotated[int | None, Query(ge=0, le=100)] = None,
    cohort: Literal["canary", "control"] = "canary",
    name: Annotated[str | None, Query(max_length=200)] = None,
    version: Annotated[int | None, Query(ge=0, le=2**31 - 1)] = None,
    group: Annotated[str | None, Query(max_length=200)] = None,
    since: Num = None,
    until: Num = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=10**6)] = 0,
) -> SamplePage:
    """Sampled inference logs, newest first (fields masked on the device)."""
    w = _window(
        session,
        rollout_id=rollout_id,
        stage=stage,
        cohort=cohort,
        name=name,
        version=version,
        group=group,
        since=since,
        until=until,
    )
    return SamplePage(
        window=_window_json(w), items=samples(session, w, limit, offset), limit=limit, offset=offset
    )


class AuditPublic(BaseModel):
    id: int
    ts: datetime
    actor: str
    action: str
    target_type: str
    target_id: str | None
    details: dict[str, Any]


@router.get("/audit", response_model=Page[AuditPublic], tags=["audit"])
def audit_log(
    session: SessionDep,
    who: ViewerDep,
    page: PageDep,
    target_id: Annotated[str | None, Query(max_length=100)] = None,
    action: Annotated[str | None, Query(max_length=100)] = None,
    actor: Annotated[str | None, Query(max_length=200)] = None,
) -> Page[AuditPublic]:
    """Every mutating admin action and automatic rollout decision, newest first."""
    stmt = select(AuditEntry).order_by(AuditEntry.id.desc())
    if target_id:
        stmt = stmt.where(AuditEntry.target_id == target_id)
    if action:
        stmt = stmt.where(AuditEntry.action == action)
    if actor:
        stmt = stmt.where(AuditEntry.actor == actor)
    rows, total, nxt = paginate(session, stmt, page)
    return Page(
        items=[
            AuditPublic(
                id=a.id,
                ts=a.ts,
                actor=a.actor,
                action=a.action,
                target_type=a.target_type,
                target_id=a.target_id,
                details=a.details or {},
            )
            for a in rows
        ],
        total=total,
        limit=page.limit,
        offset=page.offset,
        next_offset=nxt,
    )
