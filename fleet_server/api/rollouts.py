"""Rollouts: create, inspect, and the operator actions around the engine."""

from __future__ import annotations

import time
from collections import Counter
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, status
from pydantic import BaseModel, Field
from sqlalchemy import select

from fleet_server.api.deps import CtxDep, OperatorDep, SessionDep, ViewerDep
from fleet_server.api.devices import get_group_or_404
from fleet_server.api.pagination import Page, PageDep, paginate
from fleet_server.db.models import Bundle, Rollout
from fleet_server.errors import (
    BadRequestError,
    ConflictError,
    InvalidRolloutSpecError,
    InvalidTransitionError,
    NotFoundError,
    ServerError,
)
from fleet_server.registry.groups import group_members
from fleet_server.registry.running import running
from fleet_server.rollouts import InvalidSpecError, RolloutError, decide
from fleet_server.rollouts import InvalidTransitionError as EngineTransitionError
from fleet_server.rollouts.figures import cohort_metrics, cohorts
from fleet_server.rollouts.live import live_status
from fleet_server.rollouts.numbering import people_stages
from fleet_server.rollouts.service import load

router = APIRouter(tags=["rollouts"])


class StageIn(BaseModel):
    percent: float = Field(gt=0, le=100)
    min_devices: int = Field(default=1, ge=0, le=10**6)
    soak_seconds: float = Field(default=600.0, ge=0, le=90 * 86400)


class GateIn(BaseModel):
    kind: Literal[
        "install_failure_rate",
        "error_rate",
        "latency_p95_ratio",
        "drift_psi",
        "prediction_shift",
        "shadow_agreement",
        "accuracy",
    ]
    threshold: float = Field(ge=0, le=1e9)
    min_samples: int = Field(default=100, ge=1, le=10**9)
    confidence: float = Field(default=0.95, ge=0.5, lt=1)
    against: Literal["reference", "control"] = "reference"
    metric: Literal["psi", "js"] = "psi"
    name: str = Field(default="", max_length=100)
    floor_ms: float = Field(
        default=0.0,
        ge=0,
        le=600_000,
        description=(
            "latency_p95_ratio: a p95 below this many ms counts as this many, so "
            "sub-millisecond noise cannot breach the ratio (0: no floor)"
        ),
    )


class RolloutCreate(BaseModel):
    name: str = Field(min_length=1, max_length=200)
    bundle_id: str = Field(min_length=1, max_length=40)
    group: str = Field(min_length=1, max_length=200, description="Group id or name")
    previous_bundle_id: str | None = Field(
        default=None,
        max_length=40,
        description=(
            "What the group runs now (what a rollback returns to); default: the version of "
            "the model most of the group's devices run, else the newest lower version"
        ),
    )
    force: bool = Field(
        default=False,
        description="Accept a candidate older than what the group's devices run",
    )
    strategy: Literal["staged_canary", "all_at_once", "shadow"] = "staged_canary"
    stages: list[StageIn] | None = Field(default=None, min_length=1, max_length=20)
    gates: list[GateIn] | None = Field(default=None, max_length=20)
    failure_policy: Literal["pause", "rollback"] = "rollback"
    start: bool = False


class RolloutAction(BaseModel):
    reason: str = Field(default="", max_length=2000)
    to_end: bool = Field(default=False, description="promote: finish instead of next stage")


class OlderCandidateError(ConflictError):
    """The candidate is older than what devices of the group already run."""

    code = "older_candidate"


class RolloutPublic(BaseModel):
    id: str
    name: str
    bundle_id: str
    group_id: str
    strategy: str
    status: str
    stage: int = Field(
        description="The engine's stage index (0-based, -1 while pending); people see stage_number"
    )
    stage_number: int = Field(
        default=0, description="The stage as shown everywhere: 1 = first stage, 0 = pending"
    )
    stages_total: int = 0
    spec: dict[str, Any]
    state: dict[str, Any]
    created_by: str
    created_at: datetime
    updated_at: datetime
    canary_devices: int | None = None
    control_devices: int | None = None


class RolloutEvaluation(BaseModel):
    """What the engine would decide now, with every number (no state is changed)."""

    rollout_id: str
    decision: dict[str, Any]


def _public(session: Any, r: Rollout, counts: bool = False) -> RolloutPublic:
    out = RolloutPublic(
        id=r.id,
        name=r.name,
        bundle_id=r.bundle_id,
        group_id=r.group_id,
        strategy=r.strategy,
        status=r.status,
        stage=int(r.state.get("stage", -1)),
        stage_number=int(r.state.get("stage", -1)) + 1,
        stages_total=len(r.spec.get("stages") or []),
        spec=r.spec,
        state=r.state,
        created_by=r.created_by,
        created_at=r.created_at,
        updated_at=r.updated_at,
    )
    if counts:
        spec, state = load(r)
        canary, control = cohorts(session, spec, state)
        out.canary_devices, out.control_devices = len(canary), len(control)
    return out


def _rollout(session: Any, rollout_id: str) -> Rollout:
    r = session.get(Rollout, rollout_id)
    if r is None:
        raise NotFoundError(f"rollout {rollout_id} does not exist")
    return r  # type: ignore[no-any-return]


def _engine_errors(e: RolloutError) -> ServerError:
    if isinstance(e, InvalidSpecError):
        return InvalidRolloutSpecError(str(e))
    if isinstance(e, EngineTransitionError):
        return InvalidTransitionError(str(e))
    return BadRequestError(str(e))


@router.post("/rollouts", response_model=RolloutPublic, status_code=status.HTTP_201_CREATED)
def create_rollout(
    body: RolloutCreate, session: SessionDep, who: OperatorDep, ctx: CtxDep
) -> RolloutPublic:
    """Create a rollout of a bundle to a group (pending unless ``start``)."""
    bundle = session.get(Bundle, body.bundle_id)
    if bundle is None:
        raise NotFoundError(f"bundle {body.bundle_id} does not exist")
    group = get_group_or_404(session, body.group)
    running = _running_versions(session, group, bundle.name)
    newest = max(running, default=None)
    if newest is not None and bundle.version < newest and not body.force:
        raise OlderCandidateError(
            f"{bundle.name} v{bundle.version} is older than v{newest}, which "
            f"{running[newest]} of group {group.name}'s devices run; devices refuse older "
            "versions (anti-rollback). Build and upload a higher version, or pass force "
            "(`--force`) to create the rollout anyway"
        )
    if body.previous_bundle_id:
        previous = session.get(Bundle, body.previous_bundle_id)
        if previous is None:
            raise NotFoundError(f"previous bundle {body.previous_bundle_id} does not exist")
    else:
        previous = _running_bundle(session, group, bundle) or session.scalar(
            select(Bundle)
            .where(
                Bundle.name == bundle.name,
                Bundle.version < bundle.version,
                Bundle.format == bundle.format,
            )
            .order_by(Bundle.version.desc(), Bundle.created_at.desc())
            .limit(1)
        )
    options: dict[str, Any] = {"strategy": body.strategy, "failure_policy": body.failure_policy}
    if body.stages is not None:
        options["stages"] = [s.model_dump() for s in body.stages]
    elif body.strategy == "all_at_once":
        options["stages"] = [{"percent": 100, "min_devices": 1, "soak_seconds": 600.0}]
    if body.gates is not None:
        options["gates"] = [g.model_dump() for g in body.gates]
    service = ctx.rollouts
    try:
        row = service.create(
            session,
            actor=who.actor,
            name=body.name,
            bundle=bundle,
            group=group,
            previous=previous,
            options=options,
        )
        session.flush()
        changes = service.act(session, row, "start", actor=who.actor) if body.start else []
    except RolloutError as e:
        raise _engine_errors(e) from e
    session.commit()
    ctx.assignments.publish(changes)
    session.refresh(row)
    return _public(session, row, counts=True)


def _running_versions(session: Any, group: Any, name: str) -> Counter[int]:
    """version -> how many of the group's devices run model ``name`` at that version."""
    models = running(session, name, [d.id for d in group_members(session, group)])
    return Counter(m.version for m in models.values() if m.version is not None)


def _running_bundle(session: Any, group: Any, candidate: Bundle) -> Bundle | None:
    """The bundle of ``candidate``'s model that most of the group's devices run now."""
    models = running(session, candidate.name, [d.id for d in group_members(session, group)])
    counts: Counter[tuple[str | None, int]] = Counter(
        (m.bundle_id, m.version)
        for m in models.values()
        if m.version is not None and m.version != candidate.version
    )
    for (bundle_id, version), _n in counts.most_common():
        b = session.get(Bundle, bundle_id) if bundle_id else None
        if b is None:
            b = session.scalar(
                select(Bundle)
                .where(
                    Bundle.name == candidate.name,
                    Bundle.version == version,
                    Bundle.format == candidate.format,
                )
                .limit(1)
            )
        if b is not None:
            return b  # type: ignore[no-any-return]
    return None


@router.get("/rollouts", response_model=Page[RolloutPublic])
def list_rollouts(
    session: SessionDep,
    who: ViewerDep,
    page: PageDep,
    status_filter: Annotated[str | None, Query(alias="status", max_length=20)] = None,
) -> Page[RolloutPublic]:
    stmt = select(Rollout).order_by(Rollout.created_at.desc(), Rollout.id)
    if status_filter:
        stmt = stmt.where(Rollout.status == status_filter)
    rows, total, nxt = paginate(session, stmt, page)
    return Page(
        items=[_public(session, r) for r in rows],
        total=total,
        limit=page.limit,
        offset=page.offset,
        next_offset=nxt,
    )


@router.get("/rollouts/{rollout_id}", response_model=RolloutPublic)
def get_rollout(rollout_id: str, session: SessionDep, who: ViewerDep) -> RolloutPublic:
    """A rollout with its spec, state (history included) and cohort sizes."""
    return _public(session, _rollout(session, rollout_id), counts=True)


@router.get("/rollouts/{rollout_id}/evaluation", response_model=RolloutEvaluation)
def evaluate_rollout(rollout_id: str, session: SessionDep, who: ViewerDep) -> RolloutEvaluation:
    """Run the engine's pure decision on the current figures without acting on it."""
    r = _rollout(session, rollout_id)
    spec, state = load(r)
    now = time.time()
    d = decide(spec, state, cohort_metrics(session, spec, state, now), now).to_json()
    if isinstance(d.get("reason"), str):  # for people: stages counted from 1, as everywhere
        d["reason"] = people_stages(d["reason"])
    return RolloutEvaluation(rollout_id=r.id, decision=d)


@router.get("/rollouts/{rollout_id}/status")
def rollout_live_status(rollout_id: str, session: SessionDep, who: ViewerDep) -> dict[str, Any]:
    """The live picture: stage (numbered from 1) and soak progress, each gate's value
    against its threshold with sample counts, the group's devices by state, refusal and
    failure reasons with counts, what holds the rollout, and the actions that apply now."""
    r = _rollout(session, rollout_id)
    spec, state = load(r)
    out = live_status(session, r, spec, state)
    out["rollout"] = _public(session, r, counts=True).model_dump(mode="json")
    return out


def _action(action: str) -> Any:
    def handler(
        rollout_id: str,
        body: RolloutAction,
        session: SessionDep,
        who: OperatorDep,
        ctx: CtxDep,
    ) -> RolloutPublic:
        r = _rollout(session, rollout_id)
        try:
            changes = ctx.rollouts.act(
                session, r, action, actor=who.actor, reason=body.reason, to_end=body.to_end
            )
        except RolloutError as e:
            raise _engine_errors(e) from e
        session.commit()
        ctx.assignments.publish(changes)
        session.refresh(r)
        return _public(session, r, counts=True)

    handler.__name__ = f"{action}_rollout"
    handler.__doc__ = f"Operator action: {action} the rollout (audited)."
    return handler


for _name in ("start", "pause", "resume", "promote", "abort", "rollback"):
    router.add_api_route(
        f"/rollouts/{{rollout_id}}/{_name}",
        _action(_name),
        methods=["POST"],
        response_model=RolloutPublic,
        name=f"{_name}_rollout",
    )
