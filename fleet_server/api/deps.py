"""FastAPI dependencies: the database session, the calling operator, the calling device.

Use the ``Annotated`` aliases in route signatures::

    def list_devices(session: SessionDep, who: ViewerDep) -> ...

Every admin route must depend on one of :data:`ViewerDep`, :data:`OperatorDep`
or :data:`AdminDep` (a test walks ``app.routes`` and fails on any that does not).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from fleet_server.context import ServerContext
from fleet_server.db.models import Operator, OperatorToken
from fleet_server.db.types import utcnow
from fleet_server.errors import InvalidTokenError, NotAuthenticatedError, PermissionDeniedError
from fleet_server.pki.serve import peer_certificate
from fleet_server.security import PERMISSIONS, Role, bearer_token

_bearer = HTTPBearer(auto_error=False, description="Operator token (`eft_...`)")
_device_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="DeviceCredential",
    description="Per-device credential issued at enrollment (`efd_...`)",
)


def get_ctx(request: Request) -> ServerContext:
    ctx: ServerContext = request.app.state.ctx
    return ctx


CtxDep = Annotated[ServerContext, Depends(get_ctx)]


def get_session(ctx: CtxDep) -> Iterator[Session]:
    with ctx.sessions() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


@dataclass(frozen=True)
class Principal:
    """The authenticated operator behind a request."""

    operator_id: str
    name: str
    role: Role

    @property
    def actor(self) -> str:
        return f"operator:{self.name}"


def authenticate_operator(ctx: ServerContext, token: str | None) -> Principal:
    if token is None:
        raise NotAuthenticatedError(
            "this route needs an operator token: send `Authorization: Bearer <token>`"
        )
    h = ctx.hasher.hash(token)
    now = utcnow()
    stmt = (
        select(Operator.id, Operator.name, Operator.role)
        .join(OperatorToken, OperatorToken.operator_id == Operator.id)
        .where(
            OperatorToken.token_hash == h,
            OperatorToken.revoked_at.is_(None),
            or_(OperatorToken.expires_at.is_(None), OperatorToken.expires_at > now),
        )
    )
    with ctx.engine.connect() as conn:
        row = conn.execute(stmt).first()
    if row is None:
        raise InvalidTokenError("the operator token is unknown, revoked or expired")
    return Principal(row[0], row[1], Role.parse(row[2]))


class RoleRequirement:
    """Dependency: an operator with at least ``role``; tests find it on every admin route.

    Every refusal is written to the audit log (``permission.denied``) before the 403,
    naming the route (or the permission, for :class:`RequirePermission`)."""

    def __init__(self, role: Role) -> None:
        self.role = role

    def __call__(
        self,
        ctx: CtxDep,
        request: Request,
        creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> Principal:
        who = authenticate_operator(ctx, creds.credentials if creds else None)
        if who.role < self.role:
            route = getattr(request.scope.get("route"), "path", request.url.path)
            self._deny(ctx, who, "route", f"{request.method} {route}", "this action")
        return who

    def _deny(self, ctx: ServerContext, who: Principal, kind: str, what: str, says: str) -> None:
        from fleet_server import audit

        with ctx.sessions() as session:
            audit.record(
                session,
                actor=who.actor,
                action="permission.denied",
                target_type=kind,
                target_id=what[:200],
                details={kind: what, "needs": self.role.name, "role": who.role.name},
            )
            session.commit()
        raise PermissionDeniedError(
            f"{says} needs the {self.role.name} role; {who.name} is a {who.role.name}. "
            "The attempt was recorded in the audit log"
        )


class RequirePermission(RoleRequirement):
    """Dependency: an operator whose role :data:`~fleet_server.security.PERMISSIONS` allows
    ``permission``; a refusal is written to the audit log before the 403."""

    def __init__(self, permission: str) -> None:
        super().__init__(PERMISSIONS[permission])
        self.permission = permission

    def __call__(
        self,
        ctx: CtxDep,
        request: Request,
        creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> Principal:
        who = authenticate_operator(ctx, creds.credentials if creds else None)
        if who.role < self.role:
            self._deny(ctx, who, "permission", self.permission, self.permission)
        return who


ViewerDep = Annotated[Principal, Depends(RoleRequirement(Role.viewer))]
OperatorDep = Annotated[Principal, Depends(RoleRequirement(Role.operator))]
AdminDep = Annotated[Principal, Depends(RoleRequirement(Role.admin))]


def authenticate_device(
    ctx: ServerContext, authorization: str | None, peer_cert: bytes | None = None
) -> str:
    """The device id behind a request (blocking on a cache miss).

    A TLS client certificate (``peer_cert``, DER, already verified against the fleet CA
    by the TLS layer) decides alone: it must be one the server recorded for a device,
    not revoked nor expired. Without one, the bearer credential of a device enrolled
    without a certificate; a device that has a certificate is refused by token.
    """
    if peer_cert is not None:
        device_id = ctx.device_certs.get(peer_cert) or ctx.device_certs.load(peer_cert)
        if device_id is None:
            raise InvalidTokenError(
                "the client certificate is revoked, expired or was not issued to an "
                "enrolled device by this server; enroll the device again"
            )
        return device_id
    token = bearer_token(authorization)
    if token is None:
        raise NotAuthenticatedError(
            "this route needs the device's client certificate (TLS) or, for a device "
            "enrolled without one, its credential: `Authorization: Bearer <credential>`"
        )
    h = ctx.hasher.hash(token)
    device_id = ctx.device_auth.get(h) or ctx.device_auth.load(h)
    if device_id is None:
        raise InvalidTokenError(
            "the device credential is unknown or revoked, or the device has a certificate "
            "and must present it over TLS instead; re-enroll"
        )
    return device_id


def current_device(
    ctx: CtxDep,
    request: Request,
    _creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_device_bearer)],
) -> str:
    device_id = authenticate_device(
        ctx, request.headers.get("authorization"), peer_certificate(request.scope)
    )
    ctx.last_seen.touch(device_id)
    return device_id


CurrentDevice = Annotated[str, Depends(current_device)]


def certified_device(ctx: CtxDep, request: Request) -> str:
    """The device behind the request's TLS client certificate; a token does not do."""
    der = peer_certificate(request.scope)
    if der is None:
        raise NotAuthenticatedError(
            "this route needs the device's current client certificate over TLS"
        )
    return authenticate_device(ctx, None, der)


CertifiedDevice = Annotated[str, Depends(certified_device)]
