"""Alert rules (per group and model), the alerts raised, and their Prometheus export.

Anyone with a token reads rules and alerts; changing rules needs ``alert.manage``
(operators and admins; a viewer's attempt is refused and audited). Every rule change is
written to the audit log, and so is every alert the server raises
(:mod:`fleet_server.alerts.service`).
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request, status
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, Field, field_validator
from sqlalchemy import select

from fleet_server import audit
from fleet_server.alerts.prometheus import prometheus_rules
from fleet_server.alerts.rules import DESCRIPTIONS, Kind, RuleError, default_clear
from fleet_server.alerts.service import load_rules, to_rule
from fleet_server.api.deps import CtxDep, Principal, RequirePermission, SessionDep, ViewerDep
from fleet_server.api.devices import get_group_or_404
from fleet_server.api.pagination import Page, PageDep, paginate
from fleet_server.db.alerts import AlertEvent, AlertRule, AlertState
from fleet_server.db.models import Group
from fleet_server.db.types import utcnow
from fleet_server.errors import BadRequestError, ConflictError, NotFoundError
from fleet_server.security import new_id

router = APIRouter(tags=["alerts"])

ManageDep = Annotated[Principal, Depends(RequirePermission("alert.manage"))]

KIND_PATTERN = "^(" + "|".join(k.value for k in Kind) + ")$"
#: window summaries must be able to arrive in a window; a week at most
MIN_WINDOW, MAX_WINDOW = 10.0, 7 * 86400.0
DEFAULT_WINDOW = 600.0
#: inferences (labelled predictions for accuracy) a model figure needs by default
DEFAULT_MODEL_MIN_SAMPLES = 100

Url = Annotated[str, Field(min_length=8, max_length=2000, pattern=r"^https?://\S+$")]


def _finite(v: float | None) -> float | None:
    if v is not None and not math.isfinite(v):
        raise ValueError("must be a finite number")
    return v


class AlertRuleCreate(BaseModel):
    name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.\-]+$")
    kind: str = Field(
        pattern=KIND_PATTERN,
        description="; ".join(f"{k.value}: {d}" for k, d in DESCRIPTIONS.items()),
    )
    group: str = Field(min_length=1, max_length=200, description="Group id or name")
    model: str | None = Field(default=None, min_length=1, max_length=200)
    threshold: float = Field(ge=-1e12, le=1e12)
    clear_threshold: float | None = Field(
        default=None, ge=-1e12, le=1e12, description="Hysteresis; default: 80% of threshold"
    )
    window_seconds: float = Field(default=DEFAULT_WINDOW, ge=MIN_WINDOW, le=MAX_WINDOW)
    for_seconds: float = Field(default=0.0, ge=0, le=MAX_WINDOW)
    min_samples: int | None = Field(default=None, ge=0, le=10**9)
    webhooks: list[Url] = Field(default_factory=list, max_length=10)
    enabled: bool = True

    _f = field_validator("threshold", "clear_threshold")(_finite)


class AlertRuleUpdate(BaseModel):
    threshold: float | None = Field(default=None, ge=-1e12, le=1e12)
    clear_threshold: float | None = Field(default=None, ge=-1e12, le=1e12)
    window_seconds: float | None = Field(default=None, ge=MIN_WINDOW, le=MAX_WINDOW)
    for_seconds: float | None = Field(default=None, ge=0, le=MAX_WINDOW)
    min_samples: int | None = Field(default=None, ge=0, le=10**9)
    webhooks: list[Url] | None = Field(default=None, max_length=10)
    enabled: bool | None = None

    _f = field_validator("threshold", "clear_threshold")(_finite)


class AlertRulePublic(BaseModel):
    id: str
    name: str
    kind: str
    group: str
    model: str | None
    threshold: float
    clear_threshold: float
    window_seconds: float
    for_seconds: float
    min_samples: int
    webhooks: list[str]
    enabled: bool
    created_by: str
    created_at: datetime
    updated_at: datetime
    #: ok | pending | firing, from the last evaluation (None before the first)
    status: str | None
    value: float | None
    evaluated_at: float | None
    no_data: str | None


class AlertPublic(BaseModel):
    id: int
    rule_id: str
    rule: str
    kind: str
    group: str
    model: str | None
    status: str
    ts: float
    value: float | None
    threshold: float
    window_start: float
    window_end: float
    delivery: str
    attempts: int
    delivered_at: float | None
    last_error: str | None
    payload: dict[str, Any]


def _public(session: Any, r: AlertRule, group: str | None = None) -> AlertRulePublic:
    st = session.get(AlertState, r.id)
    if group is None:
        group = session.scalar(select(Group.name).where(Group.id == r.group_id)) or r.group_id
    return AlertRulePublic(
        id=r.id,
        name=r.name,
        kind=r.kind,
        group=group,
        model=r.model,
        threshold=r.threshold,
        clear_threshold=r.clear_threshold,
        window_seconds=r.window_seconds,
        for_seconds=r.for_seconds,
        min_samples=r.min_samples,
        webhooks=list(r.webhooks or []),
        enabled=r.enabled,
        created_by=r.created_by,
        created_at=r.created_at,
        updated_at=r.updated_at,
        status=st.status if st is not None and st.evaluated_at is not None else None,
        value=st.value if st is not None else None,
        evaluated_at=st.evaluated_at if st is not None else None,
        no_data=st.no_data if st is not None else None,
    )


def _alert_public(e: AlertEvent) -> AlertPublic:
    return AlertPublic(
        id=e.id,
        rule_id=e.rule_id,
        rule=e.rule_name,
        kind=e.kind,
        group=e.group_name,
        model=e.model,
        status=e.status,
        ts=e.ts,
        value=e.value,
        threshold=e.threshold,
        window_start=e.window_start,
        window_end=e.window_end,
        delivery=e.delivery,
        attempts=e.attempts,
        delivered_at=e.delivered_at,
        last_error=e.last_error,
        payload={"id": e.id, **(e.payload or {})},
    )


def _rule_or_404(session: Any, ref: str) -> AlertRule:
    r = session.get(AlertRule, ref) or session.scalar(
        select(AlertRule).where(AlertRule.name == ref)
    )
    if r is None:
        raise NotFoundError(f"alert rule {ref} does not exist; see `edgefleet alerts rules list`")
    return r  # type: ignore[no-any-return]


def _check(row: AlertRule, group: str) -> None:
    """Refuse a rule the evaluator could not judge (400 with the reason)."""
    try:
        to_rule(row, group)
    except RuleError as e:
        raise BadRequestError(str(e)) from e


def _settings(r: AlertRule) -> dict[str, Any]:
    return {
        "name": r.name,
        "kind": r.kind,
        "group_id": r.group_id,
        "model": r.model,
        "threshold": r.threshold,
        "clear_threshold": r.clear_threshold,
        "window_seconds": r.window_seconds,
        "for_seconds": r.for_seconds,
        "min_samples": r.min_samples,
        "webhooks": list(r.webhooks or []),
        "enabled": r.enabled,
    }


@router.get("/alerts/rules", response_model=Page[AlertRulePublic])
def list_rules(session: SessionDep, who: ViewerDep, page: PageDep) -> Page[AlertRulePublic]:
    """Every alert rule with the state of its last evaluation."""
    rows, total, nxt = paginate(session, select(AlertRule).order_by(AlertRule.name), page)
    return Page(
        items=[_public(session, r) for r in rows],
        total=total,
        limit=page.limit,
        offset=page.offset,
        next_offset=nxt,
    )


@router.post("/alerts/rules", response_model=AlertRulePublic, status_code=status.HTTP_201_CREATED)
def create_rule(body: AlertRuleCreate, session: SessionDep, who: ManageDep) -> AlertRulePublic:
    """A rule on one figure of a group (and model): fires past ``threshold``, resolves
    past ``clear_threshold``; alerts go to ``webhooks``."""
    group = get_group_or_404(session, body.group)
    if session.scalar(select(AlertRule.id).where(AlertRule.name == body.name)):
        raise ConflictError(f"alert rule {body.name!r} exists")
    kind = Kind(body.kind)
    now = utcnow()
    row = AlertRule(
        id=new_id("ar"),
        name=body.name,
        kind=kind.value,
        group_id=group.id,
        model=body.model,
        threshold=body.threshold,
        clear_threshold=(
            body.clear_threshold
            if body.clear_threshold is not None
            else default_clear(kind, body.threshold)
        ),
        window_seconds=body.window_seconds,
        for_seconds=body.for_seconds,
        min_samples=(
            body.min_samples
            if body.min_samples is not None
            else (DEFAULT_MODEL_MIN_SAMPLES if kind.needs_model else 0)
        ),
        webhooks=list(body.webhooks),
        enabled=body.enabled,
        created_by=who.actor,
        created_at=now,
        updated_at=now,
    )
    _check(row, group.name)
    session.add(row)
    audit.record(
        session,
        actor=who.actor,
        action="alert_rule.create",
        target_type="alert_rule",
        target_id=row.id,
        details=_settings(row),
    )
    session.commit()
    return _public(session, row, group.name)


@router.get("/alerts/rules/{ref}", response_model=AlertRulePublic)
def get_rule(ref: str, session: SessionDep, who: ViewerDep) -> AlertRulePublic:
    """One rule (id or name) with the state of its last evaluation."""
    return _public(session, _rule_or_404(session, ref))


@router.patch("/alerts/rules/{ref}", response_model=AlertRulePublic)
def update_rule(
    ref: str, body: AlertRuleUpdate, session: SessionDep, who: ManageDep
) -> AlertRulePublic:
    """Change a rule's thresholds, window, webhooks or whether it is evaluated. A new
    threshold without a clear threshold moves the clear threshold to its default."""
    row = _rule_or_404(session, ref)
    before = _settings(row)
    changes = body.model_dump(exclude_none=True)
    if "threshold" in changes and "clear_threshold" not in changes:
        changes["clear_threshold"] = default_clear(Kind(row.kind), changes["threshold"])
    for k, v in changes.items():
        setattr(row, k, v)
    row.updated_at = utcnow()
    group = session.scalar(select(Group.name).where(Group.id == row.group_id)) or row.group_id
    _check(row, group)
    audit.record(
        session,
        actor=who.actor,
        action="alert_rule.update",
        target_type="alert_rule",
        target_id=row.id,
        details={"before": before, "after": _settings(row)},
    )
    session.commit()
    return _public(session, row, group)


@router.delete("/alerts/rules/{ref}", status_code=status.HTTP_204_NO_CONTENT)
def delete_rule(ref: str, session: SessionDep, who: ManageDep) -> None:
    """Delete a rule (the alerts it raised stay in the history and the audit log)."""
    row = _rule_or_404(session, ref)
    audit.record(
        session,
        actor=who.actor,
        action="alert_rule.delete",
        target_type="alert_rule",
        target_id=row.id,
        details=_settings(row),
    )
    session.delete(row)
    session.commit()


@router.get("/alerts", response_model=Page[AlertPublic])
def list_alerts(
    session: SessionDep,
    who: ViewerDep,
    page: PageDep,
    rule: Annotated[str | None, Query(max_length=200, description="Rule id or name")] = None,
    status_: Annotated[Literal["firing", "resolved"] | None, Query(alias="status")] = None,
    group: Annotated[str | None, Query(max_length=200)] = None,
) -> Page[AlertPublic]:
    """Alerts raised and resolved, newest first, with their webhook delivery state."""
    stmt = select(AlertEvent).order_by(AlertEvent.id.desc())
    if rule is not None:
        stmt = stmt.where((AlertEvent.rule_id == rule) | (AlertEvent.rule_name == rule))
    if status_ is not None:
        stmt = stmt.where(AlertEvent.status == status_)
    if group is not None:
        stmt = stmt.where(AlertEvent.group_name == group)
    rows, total, nxt = paginate(session, stmt, page)
    return Page(
        items=[_alert_public(e) for e in rows],
        total=total,
        limit=page.limit,
        offset=page.offset,
        next_offset=nxt,
    )


@router.post("/alerts/evaluate", response_model=list[dict[str, Any]])
def evaluate_now(request: Request, who: ManageDep) -> list[dict[str, Any]]:
    """Run one evaluation round now (the server also runs one every
    ``alert_interval_seconds``); the alerts it raised."""
    loops = getattr(request.app.state, "alerts", None)
    if loops is None:
        raise BadRequestError("this server does not evaluate alerts")
    return loops.evaluator.run_once()  # type: ignore[no-any-return]


@router.get(
    "/alerts/prometheus-rules",
    response_class=PlainTextResponse,
    responses={200: {"content": {"application/yaml": {}}}},
)
def prometheus_rules_file(session: SessionDep, who: ViewerDep, ctx: CtxDep) -> PlainTextResponse:
    """The enabled rules as a Prometheus alerting-rules file over this server's /metrics."""
    text = prometheus_rules(
        load_rules(session, enabled_only=True), public_url=ctx.settings.public_url
    )
    return PlainTextResponse(text, media_type="application/yaml")
