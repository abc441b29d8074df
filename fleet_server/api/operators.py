"""Operators and their tokens (admin only), and ``whoami`` for any operator."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from fastapi import APIRouter, status
from pydantic import BaseModel, Field
from sqlalchemy import select

from fleet_server import audit
from fleet_server.api.deps import AdminDep, CtxDep, SessionDep, ViewerDep
from fleet_server.api.pagination import Page, PageDep, paginate
from fleet_server.db.models import Operator, OperatorToken
from fleet_server.db.types import utcnow
from fleet_server.errors import ConflictError, NotFoundError
from fleet_server.security import OPERATOR_TOKEN_PREFIX, Role, new_id, new_secret

router = APIRouter(tags=["operators"])

ROLE_PATTERN = "^(viewer|operator|admin)$"


class OperatorCreate(BaseModel):
    name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.@\-]+$")
    role: str = Field(pattern=ROLE_PATTERN)


class OperatorPublic(BaseModel):
    id: str
    name: str
    role: str
    created_at: datetime


class TokenCreate(BaseModel):
    ttl_days: int | None = Field(default=None, ge=1, le=3650)


class TokenIssued(BaseModel):
    id: str
    operator_id: str
    token: str = Field(description="Shown once; the server stores only its hash.")
    expires_at: datetime | None


class TokenPublic(BaseModel):
    id: str
    operator_id: str
    created_at: datetime | None
    expires_at: datetime | None
    revoked_at: datetime | None


class WhoAmI(BaseModel):
    operator_id: str
    name: str
    role: str


def _public(op: Operator) -> OperatorPublic:
    return OperatorPublic(id=op.id, name=op.name, role=op.role, created_at=op.created_at)


def _operator(session: Any, ref: str) -> Operator:
    """An operator by id or by name (404 otherwise)."""
    op = session.get(Operator, ref) or session.scalar(select(Operator).where(Operator.name == ref))
    if op is None:
        raise NotFoundError(f"operator {ref} does not exist; see `edgefleet operator list`")
    return op  # type: ignore[no-any-return]


def _token_public(t: OperatorToken) -> TokenPublic:
    return TokenPublic(
        id=t.id,
        operator_id=t.operator_id,
        created_at=t.created_at,
        expires_at=t.expires_at,
        revoked_at=t.revoked_at,
    )


@router.get("/whoami", response_model=WhoAmI)
def whoami(who: ViewerDep) -> WhoAmI:
    """The operator behind the token."""
    return WhoAmI(operator_id=who.operator_id, name=who.name, role=who.role.name)


@router.get("/operators", response_model=Page[OperatorPublic])
def list_operators(session: SessionDep, who: AdminDep, page: PageDep) -> Page[OperatorPublic]:
    rows, total, nxt = paginate(session, select(Operator).order_by(Operator.name), page)
    return Page(
        items=[_public(o) for o in rows],
        total=total,
        limit=page.limit,
        offset=page.offset,
        next_offset=nxt,
    )


@router.post("/operators", response_model=OperatorPublic, status_code=status.HTTP_201_CREATED)
def create_operator(body: OperatorCreate, session: SessionDep, who: AdminDep) -> OperatorPublic:
    """Create an operator with a role (viewer < operator < admin)."""
    if session.scalar(select(Operator.id).where(Operator.name == body.name)):
        raise ConflictError(f"operator {body.name!r} exists")
    op = Operator(
        id=new_id("op"), name=body.name, role=Role.parse(body.role).name, created_at=utcnow()
    )
    session.add(op)
    audit.record(
        session,
        actor=who.actor,
        action="operator.create",
        target_type="operator",
        target_id=op.id,
        details={"name": op.name, "role": op.role},
    )
    session.commit()
    return _public(op)


@router.get("/operators/{operator_id}", response_model=OperatorPublic)
def get_operator(operator_id: str, session: SessionDep, who: AdminDep) -> OperatorPublic:
    """One operator, by id or name."""
    return _public(_operator(session, operator_id))


@router.get("/operators/{operator_id}/tokens", response_model=list[TokenPublic])
def list_tokens(operator_id: str, session: SessionDep, who: AdminDep) -> list[TokenPublic]:
    """An operator's tokens (never the secrets), revoked ones included."""
    op = _operator(session, operator_id)
    rows = session.scalars(
        select(OperatorToken).where(OperatorToken.operator_id == op.id).order_by(OperatorToken.id)
    )
    return [_token_public(t) for t in rows]


@router.post(
    "/operators/{operator_id}/tokens",
    response_model=TokenIssued,
    status_code=status.HTTP_201_CREATED,
)
def create_token(
    operator_id: str, body: TokenCreate, session: SessionDep, who: AdminDep, ctx: CtxDep
) -> TokenIssued:
    """Issue an API token for an operator (by id or name; shown once)."""
    op = _operator(session, operator_id)
    token = new_secret(OPERATOR_TOKEN_PREFIX)
    expires = utcnow() + timedelta(days=body.ttl_days) if body.ttl_days else None
    row = OperatorToken(
        id=new_id("tok"), operator_id=op.id, token_hash=ctx.hasher.hash(token), expires_at=expires
    )
    session.add(row)
    audit.record(
        session,
        actor=who.actor,
        action="operator.token.create",
        target_type="operator",
        target_id=op.id,
        details={"token_id": row.id, "expires_at": expires.isoformat() if expires else None},
    )
    session.commit()
    return TokenIssued(id=row.id, operator_id=op.id, token=token, expires_at=expires)


@router.delete("/operators/{operator_id}/tokens/{token_id}", status_code=204)
def revoke_token(operator_id: str, token_id: str, session: SessionDep, who: AdminDep) -> None:
    """Revoke one of an operator's tokens (by id or name); it stops working at once."""
    operator_id = _operator(session, operator_id).id
    row = session.get(OperatorToken, token_id)
    if row is None or row.operator_id != operator_id:
        raise NotFoundError(f"token {token_id} of operator {operator_id} does not exist")
    row.revoked_at = utcnow()
    audit.record(
        session,
        actor=who.actor,
        action="operator.token.revoke",
        target_type="operator",
        target_id=operator_id,
        details={"token_id": token_id},
    )
    session.commit()
