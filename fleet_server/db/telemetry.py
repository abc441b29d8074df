"""Telemetry tables: window summaries, sampled inference logs and device events.

Every table's primary key is ``(device_id, seq)``. A device's ``seq`` is strictly
increasing across all kinds (:mod:`device_agent.protocol`), so the key makes
ingestion idempotent: a record delivered twice (QoS 1 re-delivery, a device
re-sending after a lost PUBACK) is inserted once, with
``INSERT ... ON CONFLICT DO NOTHING`` on SQLite and PostgreSQL alike.

Times: ``ts`` is the device's clock (UNIX seconds), ``received_at`` the server's
when the record was stored; queries for a rollout stage filter on
``received_at`` so device clock skew cannot move data between stages.

On PostgreSQL, summaries and samples are partitioned by day on ``received_at``
(:mod:`.partitions`: there the primary key includes ``received_at`` and a key table
keeps ingestion idempotent). Summaries are rolled up into :class:`TelemetryHourly`
(one row per device, model and hour, received time) before retention removes them;
:func:`summary_split` tells a reader which part of a window is only in the roll-ups.
"""

from __future__ import annotations

import math
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Connection,
    Float,
    Index,
    Integer,
    String,
    Table,
    Text,
    delete,
    insert,
    select,
)
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


class TelemetryHourly(Base):
    """One device's summaries of one model received in one hour, summed (the roll-up).

    Sums, not means, so hours add up: ``psi_sum`` is the windows' ``drift_psi_max``
    times their inferences (``psi_count`` those inferences), ``p95_sum`` likewise;
    histograms, binned inputs and predictions are bin-wise sums; agreements are the
    rounded ``agreement x runs`` of each window, as the gates count them.
    """

    __tablename__ = "telemetry_hourly"
    __table_args__ = (
        Index("ix_telemetry_hourly_model_hour", "name", "version", "hour"),
        Index("ix_telemetry_hourly_shadow_hour", "shadow_name", "shadow_version", "hour"),
        Index("ix_telemetry_hourly_hour", "hour"),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    #: start of the hour (UNIX seconds, multiple of 3600) of ``received_at``
    hour: Mapped[float] = mapped_column(Float)
    device_id: Mapped[str] = mapped_column(String(100))
    name: Mapped[str] = mapped_column(String(200))
    version: Mapped[int] = mapped_column(Integer)
    rollout_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    shadow_name: Mapped[str | None] = mapped_column(String(200), nullable=True)
    shadow_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    windows: Mapped[int] = mapped_column(Integer, default=0)
    count: Mapped[int] = mapped_column(BigInteger, default=0)
    errors: Mapped[int] = mapped_column(BigInteger, default=0)
    latency_hist: Mapped[list[int] | None] = mapped_column(JSON, nullable=True)
    p95_sum: Mapped[float] = mapped_column(Float, default=0.0)
    p95_count: Mapped[int] = mapped_column(BigInteger, default=0)
    psi_sum: Mapped[float] = mapped_column(Float, default=0.0)
    psi_count: Mapped[int] = mapped_column(BigInteger, default=0)
    feature_counts: Mapped[dict[str, list[int]] | None] = mapped_column(JSON, nullable=True)
    #: inferences of the windows that carried binned inputs (at least 1 a window)
    feature_weight: Mapped[int] = mapped_column(BigInteger, default=0)
    prediction_counts: Mapped[list[int] | None] = mapped_column(JSON, nullable=True)
    labels_count: Mapped[int] = mapped_column(BigInteger, default=0)
    labels_correct: Mapped[int] = mapped_column(BigInteger, default=0)
    labelled_by_class: Mapped[list[int] | None] = mapped_column(JSON, nullable=True)
    correct_by_class: Mapped[list[int] | None] = mapped_column(JSON, nullable=True)
    previous_count: Mapped[int] = mapped_column(BigInteger, default=0)
    previous_agreements: Mapped[int] = mapped_column(BigInteger, default=0)
    shadow_count: Mapped[int] = mapped_column(BigInteger, default=0)
    shadow_errors: Mapped[int] = mapped_column(BigInteger, default=0)
    shadow_agreements: Mapped[int] = mapped_column(BigInteger, default=0)


class TelemetryMark(Base):
    """Named times of telemetry maintenance (:data:`RAW_SINCE`, :data:`ROLLED_UNTIL`)."""

    __tablename__ = "telemetry_marks"

    name: Mapped[str] = mapped_column(String(60), primary_key=True)
    value: Mapped[float] = mapped_column(Float)


#: raw summaries are complete from this time on (retention removed older ones)
RAW_SINCE = "summaries_raw_since"
#: every hour before this time is rolled up
ROLLED_UNTIL = "rolled_up_until"
HOUR = 3600


def hour_of(ts: float) -> float:
    """Start of the hour holding ``ts``."""
    return math.floor(ts / HOUR) * HOUR


def read_mark(conn: Connection, name: str) -> float | None:
    return conn.execute(select(TelemetryMark.value).where(TelemetryMark.name == name)).scalar()


def write_mark(conn: Connection, name: str, value: float) -> None:
    conn.execute(delete(TelemetryMark).where(TelemetryMark.name == name))
    conn.execute(insert(TelemetryMark).values(name=name, value=value))


def summary_split(conn: Connection, since: float | None) -> tuple[float | None, float | None]:
    """Where a window starting at ``since`` (None: the beginning) is read from:
    ``(first roll-up hour or None, first raw time)``.

    Roll-ups cover ``[first roll-up hour, first raw time)``; the raw summaries
    ``[first raw time, ...)``. Before retention removed anything, all of it is raw.
    In the rolled-up part the window starts at the hour holding ``since``.
    """
    raw_since = read_mark(conn, RAW_SINCE)
    if raw_since is None or (since is not None and since >= raw_since):
        return None, since
    return (hour_of(since) if since is not None else -math.inf), raw_since


def hourly_summary_rows(
    conn: Connection,
    lo: float,
    hi: float,
    name: str | None = None,
    version: int | None = None,
    rollout_id: str | None = None,
) -> list[tuple[Any, ...]]:
    """Rolled-up hours ``[lo, hi)`` as rows shaped like summaries: (device_id, count,
    errors, latency_hist, psi, feature_counts, prediction_counts, labels_count,
    labels_correct, previous_count, previous_agreement, labels); ``psi`` and
    ``previous_agreement`` are the hour's means, so ``psi x count`` and ``agreement x
    runs`` give back the sums."""
    h = TelemetryHourly
    stmt = select(h.__table__).where(h.hour >= lo, h.hour < hi)
    if name is not None:
        stmt = stmt.where(h.name == name)
    if version is not None:
        stmt = stmt.where(h.version == version)
    if rollout_id is not None:
        stmt = stmt.where(h.rollout_id == rollout_id)
    out = []
    for row in conn.execute(stmt):
        r = row._mapping
        labels = (
            {"labelled": r["labelled_by_class"], "correct_by_class": r["correct_by_class"]}
            if r["labelled_by_class"] is not None
            else None
        )
        out.append(
            (
                r["device_id"],
                r["count"],
                r["errors"],
                r["latency_hist"],
                r["psi_sum"] / r["count"] if r["psi_count"] and r["count"] else None,
                r["feature_counts"],
                r["prediction_counts"],
                r["labels_count"],
                r["labels_correct"],
                r["previous_count"],
                r["previous_agreements"] / r["previous_count"] if r["previous_count"] else None,
                labels,
            )
        )
    return out


def hourly_shadow_rows(
    conn: Connection, lo: float, hi: float, name: str, version: int
) -> list[tuple[str, int, int, float | None]]:
    """Rolled-up hours ``[lo, hi)`` of a shadow candidate: (device_id, runs, errors,
    agreement)."""
    h = TelemetryHourly
    stmt = select(h.device_id, h.shadow_count, h.shadow_errors, h.shadow_agreements).where(
        h.shadow_name == name, h.shadow_version == version, h.hour >= lo, h.hour < hi
    )
    return [(dev, n, err, agreed / n if n else None) for dev, n, err, agreed in conn.execute(stmt)]


#: tables of the roll-up and maintenance, created with the raw ones
MAINTENANCE_TABLES: tuple[Table, ...] = (
    TelemetryHourly.__table__,  # type: ignore[assignment]
    TelemetryMark.__table__,  # type: ignore[assignment]
)


def create_telemetry_tables(engine: Engine, *, partitioned: bool | None = None) -> None:
    """Create the telemetry tables if missing (tests, benchmarks; the server migrates).

    On PostgreSQL summaries and samples are partitioned by day unless ``partitioned``
    is False (the benchmark's comparison).
    """
    from fleet_server.db import partitions

    if partitioned is None:
        partitioned = engine.dialect.name == "postgresql"
    plain = [t for k, t in TABLES_BY_KIND.items() if not partitioned or k == "events"]
    Base.metadata.create_all(engine, tables=[*plain, *MAINTENANCE_TABLES])
    if not partitioned:
        return
    with engine.begin() as conn:
        for kind in ("summary", "samples"):
            table = TABLES_BY_KIND[kind]
            if not partitions.is_partitioned(conn, table.name):
                partitions.create_partitioned(conn, table)
