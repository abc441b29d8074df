"""The server's tables (registry, auth, assignments, rollouts, audit).

Telemetry tables live in :mod:`fleet_server.db.telemetry` on the same
:class:`~fleet_server.db.base.Base`. Secrets (operator tokens, device
credentials, enrollment tokens) are stored only as HMAC-SHA256 hashes.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from fleet_server.db.base import Base
from fleet_server.db.types import UTCDateTime, utcnow

# BigInteger autoincrement ids that SQLite also autoincrements
BigIntId = BigInteger().with_variant(Integer(), "sqlite")


class Operator(Base):
    __tablename__ = "operators"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    role: Mapped[str] = mapped_column(String(20))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class OperatorToken(Base):
    __tablename__ = "operator_tokens"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    operator_id: Mapped[str] = mapped_column(ForeignKey("operators.id", ondelete="CASCADE"))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class EnrollmentToken(Base):
    __tablename__ = "enrollment_tokens"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    device_class: Mapped[str | None] = mapped_column(String(100), nullable=True)
    labels: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    note: Mapped[str] = mapped_column(String(500), default="")
    created_by: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    used_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    used_by_device: Mapped[str | None] = mapped_column(String(100), nullable=True)


class Device(Base):
    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(String(100), primary_key=True)
    device_class: Mapped[str] = mapped_column(String(100))
    labels: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    credential_hash: Mapped[str] = mapped_column(String(64), unique=True)
    enrolled_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_seen_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    current_bundle_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    current_name: Mapped[str | None] = mapped_column(String(200), nullable=True)
    current_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    health: Mapped[str] = mapped_column(String(20), default="unknown")
    health_details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)

    @property
    def health_code(self) -> str | None:
        """The error code of the report behind the health (a health or install report):
        ``stale_metadata``, ``metadata_refused``, ``wrong_model``... or None."""
        details = self.health_details
        if not isinstance(details, dict):
            return None
        code = details.get("error_code")
        if code is None and isinstance(details.get("last_install"), dict):
            code = details["last_install"].get("error_code")
        return code if isinstance(code, str) else None


class DeviceCertificate(Base):
    """A client certificate the fleet CA issued to a device (public: no key, no secret).

    HTTP device requests are authenticated by the TLS client certificate; the serial
    must be one of these rows, not revoked and not expired, for a device not revoked.
    """

    __tablename__ = "device_certificates"

    #: the certificate's serial number in lower-case hex
    serial: Mapped[str] = mapped_column(String(64), primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"), index=True)
    pem: Mapped[str] = mapped_column(Text)
    not_after: Mapped[datetime] = mapped_column(UTCDateTime)
    issued_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    #: "enroll" or "renew"
    reason: Mapped[str] = mapped_column(String(20), default="enroll")
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class Model(Base):
    __tablename__ = "models"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Bundle(Base):
    __tablename__ = "bundles"
    __table_args__ = (Index("ix_bundles_name_version", "name", "version"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id"))
    name: Mapped[str] = mapped_column(String(200))
    version: Mapped[int] = mapped_column(Integer)
    format: Mapped[str] = mapped_column(String(20))
    device_classes: Mapped[list[str]] = mapped_column(JSON, default=list)
    file_path: Mapped[str] = mapped_column(String(1000))
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    size: Mapped[int] = mapped_column(BigInteger)
    manifest: Mapped[dict[str, Any]] = mapped_column(JSON)
    signed_by: Mapped[list[str]] = mapped_column(JSON, default=list)
    source: Mapped[str] = mapped_column(String(20), default="upload")
    uploaded_by: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Group(Base):
    __tablename__ = "groups"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    selector: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    device_class: Mapped[str | None] = mapped_column(String(100), nullable=True)
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Assignment(Base):
    """What one model of one device should run; the ETag is stored so replicas agree on it.

    One row per (device, model name): a device running several models has one assignment
    entry per model, each with its own ETag, rollout and stage. ``model`` is the bundles'
    model name ("" for a row that names no bundle).
    """

    __tablename__ = "assignments"

    device_id: Mapped[str] = mapped_column(
        ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    model: Mapped[str] = mapped_column(String(200), primary_key=True, default="")
    desired_bundle_id: Mapped[str | None] = mapped_column(ForeignKey("bundles.id"), nullable=True)
    shadow_bundle_id: Mapped[str | None] = mapped_column(ForeignKey("bundles.id"), nullable=True)
    rollout_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    stage: Mapped[int | None] = mapped_column(Integer, nullable=True)
    etag: Mapped[str] = mapped_column(String(64))
    body: Mapped[dict[str, Any]] = mapped_column(JSON)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class DeviceModel(Base):
    """What one model of a device runs now: its last install report of that model name.

    ``Device.current_*`` is the device's most recent install of any model; on a device with
    several models, rollouts and status read this table by model name.
    """

    __tablename__ = "device_models"

    device_id: Mapped[str] = mapped_column(
        ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    bundle_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Rollout(Base):
    __tablename__ = "rollouts"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    bundle_id: Mapped[str] = mapped_column(ForeignKey("bundles.id"))
    group_id: Mapped[str] = mapped_column(ForeignKey("groups.id"))
    strategy: Mapped[str] = mapped_column(String(20))
    status: Mapped[str] = mapped_column(String(20))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    state: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    #: bumped on every state change; compare-and-set guard between replicas and operators
    revision: Mapped[int] = mapped_column(Integer, default=0)
    created_by: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class DeviceReport(Base):
    """Install and health reports posted by devices over HTTP."""

    __tablename__ = "device_reports"
    __table_args__ = (Index("ix_device_reports_device_ts", "device_id", "received_at"),)

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(100), index=True)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    type: Mapped[str] = mapped_column(String(20))
    outcome: Mapped[str | None] = mapped_column(String(20), nullable=True)
    name: Mapped[str | None] = mapped_column(String(200), nullable=True)
    version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    error_code: Mapped[str | None] = mapped_column(String(100), nullable=True)
    rollout_id: Mapped[str | None] = mapped_column(String(40), nullable=True, index=True)
    body: Mapped[dict[str, Any]] = mapped_column(JSON)


class AuditEntry(Base):
    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    ts: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(100), index=True)
    target_type: Mapped[str] = mapped_column(String(50))
    target_id: Mapped[str | None] = mapped_column(String(100), nullable=True)
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


__all__ = [
    "Assignment",
    "AuditEntry",
    "Bundle",
    "Device",
    "DeviceCertificate",
    "DeviceReport",
    "EnrollmentToken",
    "Group",
    "Model",
    "Operator",
    "OperatorToken",
    "Rollout",
]
