"""Alert tables: rules, each rule's evaluation state, and the alerts that fired/resolved.

* ``alert_rules``: what to watch (a kind of figure, a group, optionally a model), the
  threshold and the clear threshold (hysteresis), the window, and where to deliver.
* ``alert_states``: one row per rule, the state the evaluator left it in. ``revision``
  is bumped on every change: a transition is recorded only by the replica whose
  compare-and-set on it succeeds, so several replicas evaluating at once do not send
  the same alert twice.
* ``alert_events``: every firing and resolution with its figures; it doubles as the
  webhook delivery queue (``delivery`` pending → delivered | failed, with the attempt
  count and the next attempt's time), so a restart does not lose an undelivered alert.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Boolean, Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from fleet_server.db.base import Base
from fleet_server.db.models import BigIntId
from fleet_server.db.types import UTCDateTime, utcnow


class AlertRule(Base):
    __tablename__ = "alert_rules"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    kind: Mapped[str] = mapped_column(String(20))
    group_id: Mapped[str] = mapped_column(ForeignKey("groups.id", ondelete="CASCADE"), index=True)
    #: the model's name; None: every model the group runs (silent, stale, records_lost)
    model: Mapped[str | None] = mapped_column(String(200), nullable=True)
    threshold: Mapped[float] = mapped_column(Float)
    clear_threshold: Mapped[float] = mapped_column(Float)
    window_seconds: Mapped[float] = mapped_column(Float)
    for_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    min_samples: Mapped[int] = mapped_column(Integer, default=0)
    webhooks: Mapped[list[str]] = mapped_column(JSON, default=list)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    created_by: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class AlertState(Base):
    __tablename__ = "alert_states"

    rule_id: Mapped[str] = mapped_column(
        ForeignKey("alert_rules.id", ondelete="CASCADE"), primary_key=True
    )
    #: ok | pending (in breach, waiting for for_seconds) | firing
    status: Mapped[str] = mapped_column(String(20), default="ok")
    #: when the current status began (UNIX seconds)
    since: Mapped[float | None] = mapped_column(Float, nullable=True)
    value: Mapped[float | None] = mapped_column(Float, nullable=True)
    evaluated_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    #: why the last evaluation had no figure (no samples, no labels, ...), else None
    no_data: Mapped[str | None] = mapped_column(String(300), nullable=True)
    #: figures some kinds keep between rounds (records_lost: totals over the window)
    memo: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    revision: Mapped[int] = mapped_column(Integer, default=0)


class AlertEvent(Base):
    __tablename__ = "alert_events"
    __table_args__ = (Index("ix_alert_events_delivery", "delivery", "next_attempt_at"),)

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    rule_id: Mapped[str] = mapped_column(String(40), index=True)
    rule_name: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(20))
    group_name: Mapped[str] = mapped_column(String(200))
    model: Mapped[str | None] = mapped_column(String(200), nullable=True)
    #: firing | resolved
    status: Mapped[str] = mapped_column(String(20))
    ts: Mapped[float] = mapped_column(Float, index=True)
    value: Mapped[float | None] = mapped_column(Float, nullable=True)
    threshold: Mapped[float] = mapped_column(Float)
    window_start: Mapped[float] = mapped_column(Float)
    window_end: Mapped[float] = mapped_column(Float)
    #: the webhook body, exactly as sent
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    webhooks: Mapped[list[str]] = mapped_column(JSON, default=list)
    #: none (no webhook) | pending | delivered | failed
    delivery: Mapped[str] = mapped_column(String(20))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    delivered_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)


__all__ = ["AlertEvent", "AlertRule", "AlertState"]
