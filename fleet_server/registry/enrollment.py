"""Enrollment tokens (single-use, expiring) and device enrollment.

Consuming a token is one conditional UPDATE (``used_at IS NULL AND
expires_at > now``), so two devices racing for the same token cannot both
win, on SQLite or PostgreSQL.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from fleet_server.db.models import Device, EnrollmentToken
from fleet_server.db.types import utcnow
from fleet_server.errors import ConflictError, EnrollmentTokenError
from fleet_server.security import (
    DEVICE_CREDENTIAL_PREFIX,
    ENROLLMENT_TOKEN_PREFIX,
    TokenHasher,
    new_id,
    new_secret,
)


@dataclass(frozen=True)
class IssuedToken:
    row: EnrollmentToken
    token: str


def issue_enrollment_token(
    session: Session,
    hasher: TokenHasher,
    *,
    created_by: str,
    ttl: timedelta,
    device_class: str | None = None,
    labels: dict[str, str] | None = None,
    note: str = "",
) -> IssuedToken:
    token = new_secret(ENROLLMENT_TOKEN_PREFIX)
    now = utcnow()
    row = EnrollmentToken(
        id=new_id("et"),
        token_hash=hasher.hash(token),
        device_class=device_class,
        labels=dict(labels or {}),
        note=note,
        created_by=created_by,
        created_at=now,
        expires_at=now + ttl,
    )
    session.add(row)
    return IssuedToken(row, token)


@dataclass(frozen=True)
class Enrolled:
    device: Device
    credential: str


def enroll_device(
    session: Session,
    hasher: TokenHasher,
    *,
    token: str,
    device_id: str | None,
    device_class: str,
    labels: dict[str, str],
) -> Enrolled:
    """Consume ``token`` and create the device; the caller commits."""
    now = utcnow()
    device_id = device_id or new_id("d")
    h = hasher.hash(token)
    consumed = session.execute(
        update(EnrollmentToken)
        .where(
            EnrollmentToken.token_hash == h,
            EnrollmentToken.used_at.is_(None),
            EnrollmentToken.expires_at > now,
        )
        .values(used_at=now, used_by_device=device_id)
        .execution_options(synchronize_session=False)
    )
    if consumed.rowcount != 1:  # type: ignore[attr-defined]
        raise EnrollmentTokenError(
            "the enrollment token is unknown, already used or expired; ask an operator "
            "for a new one (`edgefleet enroll-token create`)"
        )
    row = session.scalar(select(EnrollmentToken).where(EnrollmentToken.token_hash == h))
    assert row is not None
    if row.device_class is not None and row.device_class != device_class:
        raise EnrollmentTokenError(
            f"this enrollment token is for device class {row.device_class!r}, not {device_class!r}"
        )
    if session.get(Device, device_id) is not None:
        raise ConflictError(f"device id {device_id!r} is already enrolled; pick another id")
    credential = new_secret(DEVICE_CREDENTIAL_PREFIX)
    device = Device(
        id=device_id,
        device_class=device_class,
        labels={**labels, **row.labels},
        credential_hash=hasher.hash(credential),
        enrolled_at=now,
        health="unknown",
        health_details={},
    )
    session.add(device)
    return Enrolled(device, credential)
