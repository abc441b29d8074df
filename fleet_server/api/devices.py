"""Devices, enrollment tokens and groups."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Query, status
from pydantic import BaseModel, Field
from sqlalchemy import select

from fleet_server import audit
from fleet_server.api.deps import CtxDep, OperatorDep, SessionDep, ViewerDep
from fleet_server.api.device_schemas import LABEL_KEY
from fleet_server.api.pagination import Page, PageDep, paginate
from fleet_server.db.models import (
    Assignment,
    Bundle,
    Device,
    DeviceModel,
    EnrollmentToken,
    Group,
)
from fleet_server.db.types import utcnow
from fleet_server.errors import BadRequestError, ConflictError, NotFoundError
from fleet_server.registry.certificates import revoke_certificates
from fleet_server.registry.enrollment import issue_enrollment_token
from fleet_server.registry.groups import group_members
from fleet_server.security import new_id

router = APIRouter()

Labels = dict[str, str]


def _check_labels(labels: Labels) -> None:
    import re

    for k, v in labels.items():
        if not re.match(LABEL_KEY, k):
            raise BadRequestError(f"label key {k!r} is not allowed (letters, digits, _.-/)")
        if len(v) > 200:
            raise BadRequestError(f"label {k!r}: value longer than 200 characters")


# -- devices ------------------------------------------------------------------
class DeviceModelPublic(BaseModel):
    bundle_id: str | None = None
    version: int | None = None
    assignment: dict[str, Any] | None = None


class DevicePublic(BaseModel):
    id: str
    device_class: str
    labels: Labels
    enrolled_at: datetime
    last_seen_at: datetime | None
    current_bundle_id: str | None
    current_name: str | None
    current_version: int | None
    shadow_bundle_id: str | None = Field(
        default=None, description="Candidate run beside the active model, serving nothing"
    )
    shadow_name: str | None = None
    shadow_version: int | None = None
    health: str
    health_code: str | None = Field(
        default=None,
        description="Why the health is not ok: the last report's code (stale_metadata, "
        "not_released, wrong_model, ...)",
    )
    revoked: bool
    assignment: dict[str, Any] | None = Field(
        default=None, description="The most recently changed model's assignment document"
    )
    models: dict[str, DeviceModelPublic] = Field(
        default_factory=dict,
        description="Per model name the device runs or is assigned: what its last install "
        "report of that model says it runs, and that model's assignment document",
    )
    records_lost: dict[str, int] = Field(
        default_factory=dict,
        description="Telemetry records missing from the database by kind (holes in the "
        "device's sequence numbers; see fleet_server.ingest.gaps)",
    )


class DeviceLabelsPatch(BaseModel):
    set: Labels = Field(default_factory=dict, max_length=64, description="Labels to add/replace")
    remove: list[str] = Field(default_factory=list, max_length=64, description="Keys to drop")


class AssignmentSet(BaseModel):
    desired_bundle_id: str | None = Field(default=None, max_length=40)
    shadow_bundle_id: str | None = Field(default=None, max_length=40)
    model: str | None = Field(
        default=None,
        max_length=128,
        description="The model this assignment is for (default: the bundles' model name); "
        "needed to clear a model's assignment on a device running several",
    )


@dataclass
class Assigned:
    """A device's per-model assignment rows and running models (read in one query each)."""

    assignments: list[Assignment] = field(default_factory=list)
    running: list[DeviceModel] = field(default_factory=list)

    @classmethod
    def of(cls, session: Any, ids: list[str]) -> dict[str, Assigned]:
        out: dict[str, Assigned] = {i: cls() for i in ids}
        if not ids:
            return out
        for a in session.scalars(
            select(Assignment)
            .where(Assignment.device_id.in_(ids))
            .order_by(Assignment.updated_at.desc())
        ):
            out[a.device_id].assignments.append(a)
        for m in session.scalars(select(DeviceModel).where(DeviceModel.device_id.in_(ids))):
            out[m.device_id].running.append(m)
        return out


def device_public(d: Device, assigned: Assigned | None = None) -> DevicePublic:
    """A device as the API shows it; the shadow candidate (if any) apart from the active one."""
    assigned = assigned or Assigned()
    assignment = assigned.assignments[0] if assigned.assignments else None
    models: dict[str, DeviceModelPublic] = {
        m.name: DeviceModelPublic(bundle_id=m.bundle_id, version=m.version)
        for m in assigned.running
    }
    for a in assigned.assignments:
        if a.model:
            models.setdefault(a.model, DeviceModelPublic()).assignment = a.body
    shadow = (assignment.body or {}).get("shadow") if assignment is not None else None
    if not isinstance(shadow, dict):
        shadow = {}
    return DevicePublic(
        shadow_bundle_id=shadow.get("bundle_id"),
        shadow_name=shadow.get("name"),
        shadow_version=shadow.get("version"),
        id=d.id,
        device_class=d.device_class,
        labels=d.labels or {},
        enrolled_at=d.enrolled_at,
        last_seen_at=d.last_seen_at,
        current_bundle_id=d.current_bundle_id,
        current_name=d.current_name,
        current_version=d.current_version,
        health=d.health,
        health_code=d.health_code,
        revoked=d.revoked_at is not None,
        assignment=assignment.body if assignment is not None else None,
        models=dict(sorted(models.items())),
    )


def _device(session: Any, device_id: str) -> Device:
    d = session.get(Device, device_id)
    if d is None:
        raise NotFoundError(f"device {device_id} does not exist")
    return d  # type: ignore[no-any-return]


@router.get("/devices", response_model=Page[DevicePublic], tags=["devices"])
def list_devices(
    session: SessionDep,
    who: ViewerDep,
    page: PageDep,
    device_class: Annotated[str | None, Query(max_length=100)] = None,
    label: Annotated[list[str] | None, Query(description="key=value; repeat to AND")] = None,
) -> Page[DevicePublic]:
    """Devices with last seen, labels, class, current bundle and health."""
    stmt = select(Device).order_by(Device.id)
    if device_class:
        stmt = stmt.where(Device.device_class == device_class)
    selector = {}
    for item in label or []:
        k, sep, v = item.partition("=")
        if not sep:
            raise BadRequestError(f"label filter {item!r} must be key=value")
        selector[k] = v
    if selector:
        rows = [
            d
            for d in session.scalars(stmt)
            if all((d.labels or {}).get(k) == v for k, v in selector.items())
        ]
        total = len(rows)
        rows = rows[page.offset : page.offset + page.limit]
        nxt = page.offset + len(rows)
        nxt_off = nxt if nxt < total else None
    else:
        rows, total, nxt_off = paginate(session, stmt, page)
    assigned = Assigned.of(session, [d.id for d in rows])
    lost = _records_lost(session, [d.id for d in rows])
    return Page(
        items=[
            device_public(d, assigned.get(d.id)).model_copy(
                update={"records_lost": lost.get(d.id, {})}
            )
            for d in rows
        ],
        total=total,
        limit=page.limit,
        offset=page.offset,
        next_offset=nxt_off,
    )


def _records_lost(session: Any, ids: list[str]) -> dict[str, dict[str, int]]:
    from sqlalchemy.exc import SQLAlchemyError

    from fleet_server.ingest.gaps import records_lost

    out: dict[str, dict[str, int]] = {}
    try:
        losses = records_lost(session.get_bind(), device_ids=ids)
    except SQLAlchemyError:  # no telemetry tables yet
        return out
    for loss in losses:
        out.setdefault(loss.device_id, {})[loss.kind] = loss.records
    return out


def _assigned(session: Any, device_id: str) -> Assigned:
    return Assigned.of(session, [device_id])[device_id]


@router.get("/devices/{device_id}", response_model=DevicePublic, tags=["devices"])
def get_device(device_id: str, session: SessionDep, who: ViewerDep) -> DevicePublic:
    d = _device(session, device_id)
    return device_public(d, _assigned(session, device_id))


@router.patch("/devices/{device_id}/labels", response_model=DevicePublic, tags=["devices"])
def patch_labels(
    device_id: str, body: DeviceLabelsPatch, session: SessionDep, who: OperatorDep, ctx: CtxDep
) -> DevicePublic:
    """Add, replace or remove labels."""
    _check_labels(body.set)
    d = _device(session, device_id)
    before = dict(d.labels or {})
    labels = {k: v for k, v in before.items() if k not in body.remove}
    labels.update(body.set)
    d.labels = labels
    audit.record(
        session,
        actor=who.actor,
        action="device.labels",
        target_type="device",
        target_id=d.id,
        details={"before": before, "after": labels},
    )
    session.flush()
    changes = ctx.rollouts.sync_device(session, d)
    session.commit()
    ctx.assignments.publish(changes)
    return device_public(d, _assigned(session, d.id))


@router.post("/devices/{device_id}/revoke", response_model=DevicePublic, tags=["devices"])
def revoke_device(
    device_id: str, session: SessionDep, who: OperatorDep, ctx: CtxDep
) -> DevicePublic:
    """Revoke the device's credential and certificates: HTTP and MQTT refuse it at once;
    it must enroll again."""
    d = _device(session, device_id)
    d.revoked_at = utcnow()
    serials = revoke_certificates(session, d.id)
    audit.record(
        session,
        actor=who.actor,
        action="device.revoke",
        target_type="device",
        target_id=d.id,
        details={"certificates": [format(s, "x") for s in serials]},
    )
    session.commit()
    ctx.device_auth.evict_device(d.id)
    ctx.device_certs.evict_device(d.id)
    if ctx.broker is not None:
        ctx.broker.remove_device(d.id)
    return device_public(d)


@router.put("/devices/{device_id}/assignment", response_model=DevicePublic, tags=["devices"])
def set_assignment(
    device_id: str, body: AssignmentSet, session: SessionDep, who: OperatorDep, ctx: CtxDep
) -> DevicePublic:
    """Pin what one device should run, outside any rollout."""
    d = _device(session, device_id)
    for bid in (body.desired_bundle_id, body.shadow_bundle_id):
        if bid is not None and session.get(Bundle, bid) is None:
            raise NotFoundError(f"bundle {bid} does not exist")
    try:
        change = ctx.assignments.assign(
            session,
            d.id,
            desired_bundle_id=body.desired_bundle_id,
            shadow_bundle_id=body.shadow_bundle_id,
            model=body.model,
        )
    except ValueError as e:
        raise BadRequestError(str(e)) from e
    audit.record(
        session,
        actor=who.actor,
        action="device.assign",
        target_type="device",
        target_id=d.id,
        details=body.model_dump(),
    )
    session.commit()
    ctx.assignments.publish([change])
    return device_public(d, _assigned(session, d.id))


# -- enrollment tokens --------------------------------------------------------
class EnrollmentTokenCreate(BaseModel):
    ttl_seconds: int | None = Field(default=None, ge=1, le=365 * 24 * 3600)
    device_class: str | None = Field(default=None, min_length=1, max_length=100)
    labels: Labels = Field(default_factory=dict, max_length=64)
    note: str = Field(default="", max_length=500)


class EnrollmentTokenPublic(BaseModel):
    id: str
    device_class: str | None
    labels: Labels
    note: str
    created_by: str
    created_at: datetime
    expires_at: datetime
    used_at: datetime | None
    used_by_device: str | None


class EnrollmentTokenIssued(EnrollmentTokenPublic):
    token: str = Field(description="Shown once; the server stores only its hash.")


def _token_public(t: EnrollmentToken) -> dict[str, Any]:
    return {
        "id": t.id,
        "device_class": t.device_class,
        "labels": t.labels or {},
        "note": t.note,
        "created_by": t.created_by,
        "created_at": t.created_at,
        "expires_at": t.expires_at,
        "used_at": t.used_at,
        "used_by_device": t.used_by_device,
    }


@router.post(
    "/enrollment-tokens",
    response_model=EnrollmentTokenIssued,
    status_code=status.HTTP_201_CREATED,
    tags=["enrollment"],
)
def create_enrollment_token(
    body: EnrollmentTokenCreate, session: SessionDep, who: OperatorDep, ctx: CtxDep
) -> EnrollmentTokenIssued:
    """A single-use, expiring token a new device exchanges for its credential."""
    _check_labels(body.labels)
    ttl = timedelta(seconds=body.ttl_seconds or ctx.settings.enrollment_token_ttl_seconds)
    issued = issue_enrollment_token(
        session,
        ctx.hasher,
        created_by=who.actor,
        ttl=ttl,
        device_class=body.device_class,
        labels=body.labels,
        note=body.note,
    )
    audit.record(
        session,
        actor=who.actor,
        action="enrollment_token.create",
        target_type="enrollment_token",
        target_id=issued.row.id,
        details={
            "ttl_seconds": int(ttl.total_seconds()),
            "device_class": body.device_class,
            "labels": body.labels,
        },
    )
    session.commit()
    return EnrollmentTokenIssued(**_token_public(issued.row), token=issued.token)


@router.get("/enrollment-tokens", response_model=Page[EnrollmentTokenPublic], tags=["enrollment"])
def list_enrollment_tokens(
    session: SessionDep, who: OperatorDep, page: PageDep
) -> Page[EnrollmentTokenPublic]:
    stmt = select(EnrollmentToken).order_by(EnrollmentToken.created_at.desc(), EnrollmentToken.id)
    rows, total, nxt = paginate(session, stmt, page)
    return Page(
        items=[EnrollmentTokenPublic(**_token_public(t)) for t in rows],
        total=total,
        limit=page.limit,
        offset=page.offset,
        next_offset=nxt,
    )


# -- groups -----------------------------------------------------------------
class GroupCreate(BaseModel):
    name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.\-]+$")
    selector: Labels = Field(default_factory=dict, max_length=32)
    device_class: str | None = Field(default=None, min_length=1, max_length=100)
    description: str = Field(default="", max_length=2000)


class GroupPublic(BaseModel):
    id: str
    name: str
    selector: Labels
    device_class: str | None
    description: str
    created_at: datetime
    device_count: int | None = None


def _group_public(g: Group, count: int | None = None) -> GroupPublic:
    return GroupPublic(
        id=g.id,
        name=g.name,
        selector=g.selector or {},
        device_class=g.device_class,
        description=g.description,
        created_at=g.created_at,
        device_count=count,
    )


def get_group_or_404(session: Any, ref: str) -> Group:
    g = session.get(Group, ref) or session.scalar(select(Group).where(Group.name == ref))
    if g is None:
        raise NotFoundError(f"group {ref} does not exist")
    return g  # type: ignore[no-any-return]


@router.post(
    "/groups", response_model=GroupPublic, status_code=status.HTTP_201_CREATED, tags=["groups"]
)
def create_group(body: GroupCreate, session: SessionDep, who: OperatorDep) -> GroupPublic:
    """A group of devices chosen by labels (every pair must match) and optionally class."""
    _check_labels(body.selector)
    if session.scalar(select(Group.id).where(Group.name == body.name)):
        raise ConflictError(f"group {body.name!r} exists")
    g = Group(
        id=new_id("g"),
        name=body.name,
        selector=body.selector,
        device_class=body.device_class,
        description=body.description,
        created_at=utcnow(),
    )
    session.add(g)
    audit.record(
        session,
        actor=who.actor,
        action="group.create",
        target_type="group",
        target_id=g.id,
        details=body.model_dump(),
    )
    session.commit()
    return _group_public(g)


@router.get("/groups", response_model=Page[GroupPublic], tags=["groups"])
def list_groups(session: SessionDep, who: ViewerDep, page: PageDep) -> Page[GroupPublic]:
    rows, total, nxt = paginate(session, select(Group).order_by(Group.name), page)
    return Page(
        items=[_group_public(g) for g in rows],
        total=total,
        limit=page.limit,
        offset=page.offset,
        next_offset=nxt,
    )


@router.get("/groups/{group_id}", response_model=GroupPublic, tags=["groups"])
def get_group(group_id: str, session: SessionDep, who: ViewerDep) -> GroupPublic:
    g = get_group_or_404(session, group_id)
    return _group_public(g, len(group_members(session, g)))


@router.get("/groups/{group_id}/devices", response_model=Page[DevicePublic], tags=["groups"])
def group_devices(
    group_id: str, session: SessionDep, who: ViewerDep, page: PageDep
) -> Page[DevicePublic]:
    g = get_group_or_404(session, group_id)
    members = group_members(session, g)
    rows = members[page.offset : page.offset + page.limit]
    nxt = page.offset + len(rows)
    assigned = Assigned.of(session, [d.id for d in rows])
    return Page(
        items=[device_public(d, assigned.get(d.id)) for d in rows],
        total=len(members),
        limit=page.limit,
        offset=page.offset,
        next_offset=nxt if nxt < len(members) else None,
    )


@router.delete("/groups/{group_id}", status_code=204, tags=["groups"])
def delete_group(group_id: str, session: SessionDep, who: OperatorDep) -> None:
    from fleet_server.db.models import Rollout

    g = get_group_or_404(session, group_id)
    if session.scalar(select(Rollout.id).where(Rollout.group_id == g.id).limit(1)):
        raise ConflictError(f"group {g.name} is used by a rollout; it cannot be deleted")
    session.delete(g)
    audit.record(
        session,
        actor=who.actor,
        action="group.delete",
        target_type="group",
        target_id=g.id,
        details={"name": g.name},
    )
    session.commit()
