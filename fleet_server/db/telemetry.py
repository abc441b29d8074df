"""Telemetry tables: window summaries, sampled inference logs and device events.

Every table's primary key is ``(device_id, seq)``. A device's ``seq`` is strictly
increasing across all kinds (:mod:`device_agent.protocol`), so the key makes
ingestion idempotent: a record delivered twice (QoS 1 re-delivery, a device
re-sending after a lost PUBACK) is inserted once, with
``INSERT ... ON CONFLICT DO NOTHING`` on SQLite and PostgreSQL alike.

Times: ``ts`` is the device's clock (UNIX seconds), ``received_at`` the server's
when the record was stored; queries for a rollout stage filter on
``received_at`` so device clock skew cannot move data between stages.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Float, Index, Integer, String, Table, Text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Mapped, mapped_column

from fleet_server.db.base import Base


class TelemetrySummary(Base):
    """One window of one model on one device (``kind = "summary"``)."""

    __tablename__ = "telemetry_summaries"
    __table_args__ = (
        Index("ix_telemetry_summaries_model_received", "name", "version", "received_at"),
        Index(
            "ix_telemetry_summaries_shadow_received", "shadow_name", "shadow_version", "received_at"
        ),
        Index("ix_telemetry_summaries_rollout", "rollout_id"),
    )

    device_id: Mapped[str] = mapped_column(String(100), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    ts: Mapped[float] = mapped_column(Float)
    received_at: Mapped[float] = mapped_column(Float)
    window_start: Mapped[float | None] = mapped_column(Float, nullable=True)
    window_end: Mapped[float | None] = mapped_column(Float, nullable=True)
    name: Mapped[str] = mapped_column(String(200))
    version: Mapped[int] = mapped_column(Integer)
    slot: Mapped[str | None] = mapped_column(String(8), nullable=True)
    rollout_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    count: Mapped[int] = mapped_column(Integer, default=0)
    errors: Mapped[int] = mapped_column(Integer, default=0)
    latency_hist: Mapped[list[int] | None] = mapped_column(JSON, nullable=True)
    p95_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    drift_psi_max: Mapped[float | None] = mapped_column(Float, nullable=True)
    #: {feature name: [binned counts]} of the window's inputs
    feature_counts: Mapped[dict[str, list[int]] | None] = mapped_column(JSON, nullable=True)
    prediction_counts: Mapped[list[int] | None] = mapped_column(JSON, nullable=True)
    shadow_name: Mapped[str | None] = mapped_column(String(200), nullable=True)
    shadow_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    shadow_count: Mapped[int | None] = mapped_column(Integer, nullable=True)
    shadow_errors: Mapped[int | None] = mapped_column(Integer, nullable=True)
    shadow_agreement: Mapped[float | None] = mapped_column(Float, nullable=True)
    shadow_p95_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    dropped: Mapped[dict[str, int] | None] = mapped_column(JSON, nullable=True)
    #: labelled predictions (an app posted the true class) and how many were right
    labels_count: Mapped[int | None] = mapped_column(Integer, nullable=True)
    labels_correct: Mapped[int | None] = mapped_column(Integer, nullable=True)
    #: the window's whole label summary: per-class labelled/correct, confusion matrix
    labels: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    #: the model this one replaced, run beside it on a sample of inputs
    previous_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    previous_count: Mapped[int | None] = mapped_column(Integer, nullable=True)
    previous_errors: Mapped[int | None] = mapped_column(Integer, nullable=True)
    previous_agreement: Mapped[float | None] = mapped_column(Float, nullable=True)


class TelemetrySample(Base):
    """One sampled inference (inputs/outputs already masked on the device)."""

    __tablename__ = "telemetry_samples"
    __table_args__ = (
        Index("ix_telemetry_samples_model_received", "name", "version", "received_at"),
    )

    device_id: Mapped[str] = mapped_column(String(100), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    ts: Mapped[float] = mapped_column(Float)
    received_at: Mapped[float] = mapped_column(Float)
    name: Mapped[str | None] = mapped_column(String(200), nullable=True)
    version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    predicted: Mapped[str | None] = mapped_column(String(100), nullable=True)
    body: Mapped[dict[str, Any]] = mapped_column(JSON)


class TelemetryEvent(Base):
    """A device event; ``type = "install"`` carries an install outcome."""

    __tablename__ = "telemetry_events"
    __table_args__ = (
        Index("ix_telemetry_events_model_received", "name", "version", "received_at"),
        Index("ix_telemetry_events_rollout", "rollout_id"),
    )

    device_id: Mapped[str] = mapped_column(String(100), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    ts: Mapped[float] = mapped_column(Float)
    received_at: Mapped[float] = mapped_column(Float)
    type: Mapped[str] = mapped_column(String(40))
    outcome: Mapped[str | None] = mapped_column(String(40), nullable=True)
    name: Mapped[str | None] = mapped_column(String(200), nullable=True)
    version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    bundle_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    rollout_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    shadow: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    error_code: Mapped[str | None] = mapped_column(String(100), nullable=True)
    message: Mapped[str | None] = mapped_column(Text, nullable=True)
    body: Mapped[dict[str, Any]] = mapped_column(JSON)


#: the tables by protocol kind
TABLES_BY_KIND: dict[str, Table] = {
    "summary": TelemetrySummary.__table__,  # type: ignore[dict-item]
    "samples": TelemetrySample.__table__,  # type: ignore[dict-item]
    "events": TelemetryEvent.__table__,  # type: ignore[dict-item]
}

#: install outcomes that count as a failed install for the rollout gates
FAILED_INSTALL_OUTCOMES = ("failed", "rolled_back", "refused")


def create_telemetry_tables(engine: Engine) -> None:
    """Create the telemetry tables if missing (tests, benchmarks; the server migrates)."""
    Base.metadata.create_all(engine, tables=list(TABLES_BY_KIND.values()))
