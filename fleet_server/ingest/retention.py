"""Telemetry retention and hourly roll-ups (``edgefleet telemetry maintain``, the server's
background loop).

One run, each step in its own transaction; on PostgreSQL under a session advisory lock,
so one replica at a time does it and the others skip:

1. partitions (PostgreSQL): today's and the next ``ahead_days`` days' partitions of
   summaries and samples exist (:mod:`fleet_server.db.partitions`);
2. roll-up: each closed hour (ended ``settle_seconds`` ago) from ``relook_hours``
   before the :data:`~fleet_server.db.telemetry.ROLLED_UNTIL` mark on is recomputed
   from the raw summaries: the hour's roll-up rows are deleted and the sums inserted,
   so re-rolling an hour is idempotent and a batch stored late still counts. An hour
   older than the raw data kept (the :data:`~fleet_server.db.telemetry.RAW_SINCE`
   mark) is never recomputed;
3. retention, in whole UTC days: raw summaries older than ``raw_days`` but never an
   hour that is not rolled up yet, samples older than ``samples_days``, the key table
   with them, roll-ups older than ``rollup_days``. On PostgreSQL the day partitions are
   dropped (no row-by-row delete, nothing for vacuum) and only the default partitions
   see a DELETE; on SQLite the rows are deleted. ``RAW_SINCE`` moves to the cut, and
   readers (:func:`fleet_server.db.telemetry.summary_split`) take older hours from the
   roll-ups.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Engine, Text, cast, delete, func, insert, select, text

from fleet_server.db import partitions
from fleet_server.db.partitions import DAY, KEYS_TABLE, PART_SCHEMA, day_of
from fleet_server.db.telemetry import (
    HOUR,
    RAW_SINCE,
    ROLLED_UNTIL,
    TelemetryHourly,
    TelemetrySample,
    TelemetrySummary,
    hour_of,
    read_mark,
    write_mark,
)
from fleet_server.ingest.jsoncodec import DEFAULT
from fleet_server.settings import ServerSettings

log = logging.getLogger(__name__)

#: advisory lock key of the maintenance run (PostgreSQL)
LOCK_KEY = 0x65666D61  # "efma"


@dataclass(frozen=True)
class RetentionPolicy:
    """How long telemetry is kept and how the roll-up runs (safe defaults)."""

    #: raw window summaries (days); older hours are read from the roll-ups
    raw_days: int = 14
    #: sampled inference logs (days); not rolled up
    samples_days: int = 7
    #: hourly roll-ups (days)
    rollup_days: int = 400
    #: day partitions made ahead of today (PostgreSQL)
    ahead_days: int = 2
    #: an hour is rolled up this long after it ended (batches in flight)
    settle_seconds: float = 300.0
    #: hours before the roll-up mark recomputed when the next hour is rolled up (batches
    #: stored late)
    relook_hours: int = 1
    #: hours rolled up in one run at most (a first run over a long history)
    max_hours: int = 24 * 7

    def __post_init__(self) -> None:
        for name in ("raw_days", "samples_days", "rollup_days"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1 day, not {getattr(self, name)}")
        if self.rollup_days < self.raw_days:
            raise ValueError(
                f"rollup_days ({self.rollup_days}) must be at least raw_days ({self.raw_days}): "
                "roll-ups stand in for the raw summaries once those are gone"
            )


@dataclass
class MaintenanceReport:
    """What one run did."""

    skipped: bool = False
    partitions_created: list[str] = field(default_factory=list)
    partitions_dropped: list[str] = field(default_factory=list)
    hours_rolled: int = 0
    rollup_rows: int = 0
    rows_deleted: dict[str, int] = field(default_factory=dict)
    raw_since: float | None = None
    rolled_until: float | None = None

    def lines(self) -> list[str]:
        if self.skipped:
            return ["another replica is maintaining telemetry; nothing done"]
        out = [
            f"partitions created: {', '.join(self.partitions_created) or 'none'}",
            f"partitions dropped: {', '.join(self.partitions_dropped) or 'none'}",
            f"hours rolled up: {self.hours_rolled} ({self.rollup_rows} rows)",
        ]
        out += [f"rows deleted from {t}: {n}" for t, n in sorted(self.rows_deleted.items()) if n]
        return out


class TelemetryMaintenance:
    """Partitions, roll-ups and retention of the telemetry tables of ``engine``."""

    def __init__(self, engine: Engine, policy: RetentionPolicy | None = None) -> None:
        self.engine = engine
        self.policy = policy or RetentionPolicy()
        self.pg = engine.dialect.name == "postgresql"

    def run(self, now: float) -> MaintenanceReport:
        """One maintenance run at server time ``now`` (UNIX seconds)."""
        report = MaintenanceReport()
        with self.engine.connect() as conn:
            if self.pg:
                got = conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": LOCK_KEY})
                locked = bool(got.scalar())
                conn.commit()
                if not locked:
                    report.skipped = True
                    return report
            try:
                partitioned = [
                    t for t in partitions.PARTITIONED if partitions.is_partitioned(conn, t)
                ]
                conn.commit()
                if partitioned:
                    with conn.begin():
                        self._ensure_partitions(conn, partitioned, now, report)
                with conn.begin():
                    self._roll_up(conn, now, report)
                with conn.begin():
                    self._retain(conn, partitioned, now, report)
            finally:
                if self.pg:
                    conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": LOCK_KEY})
                    conn.commit()
        return report

    # -- partitions ---------------------------------------------------------------

    def _ensure_partitions(
        self, conn: Connection, tables: Iterable[str], now: float, report: MaintenanceReport
    ) -> None:
        today = day_of(now)
        # creating a partition locks the parent briefly: never queue ingestion behind a
        # long reader for long (a timeout fails this run; the next one makes the day)
        conn.execute(text("SET LOCAL lock_timeout = '10s'"))
        for table in tables:
            for day in range(today, today + self.policy.ahead_days + 1):
                name = partitions.ensure_day(conn, table, day)
                if name:
                    report.partitions_created.append(name)

    # -- roll-up ------------------------------------------------------------------

    def _roll_up(self, conn: Connection, now: float, report: MaintenanceReport) -> None:
        end = hour_of(now - self.policy.settle_seconds)
        rolled = read_mark(conn, ROLLED_UNTIL)
        raw_since = read_mark(conn, RAW_SINCE)
        if rolled is None:
            first = conn.execute(select(func.min(TelemetrySummary.received_at))).scalar()
            start = hour_of(first) if first is not None else end
        elif end <= rolled:
            report.rolled_until = rolled
            return  # no hour closed since the last run
        else:
            start = rolled - self.policy.relook_hours * HOUR
        if raw_since is not None:
            start = max(start, raw_since)
        stop = min(end, start + self.policy.max_hours * HOUR)
        hour = start
        while hour < stop:
            report.rollup_rows += roll_up_hour(conn, hour)
            report.hours_rolled += 1
            hour += HOUR
        new_mark = stop if rolled is None else max(stop, rolled)
        write_mark(conn, ROLLED_UNTIL, new_mark)
        report.rolled_until = new_mark

    # -- retention ----------------------------------------------------------------

    def _retain(
        self, conn: Connection, partitioned: list[str], now: float, report: MaintenanceReport
    ) -> None:
        p = self.policy
        rolled = read_mark(conn, ROLLED_UNTIL) or 0.0
        raw_cut = float(min(day_of(now) - p.raw_days, day_of(rolled)) * DAY)
        samples_cut = float((day_of(now) - p.samples_days) * DAY)
        for table, cut in (
            (TelemetrySummary.__tablename__, raw_cut),
            (TelemetrySample.__tablename__, samples_cut),
        ):
            done = f"retained:{table}"
            last = read_mark(conn, done)
            if last is not None and cut <= last:
                continue  # the cut moves once a day: nothing new to remove
            write_mark(conn, done, cut)
            if table in partitioned:
                if self.pg:
                    conn.execute(text("SET LOCAL lock_timeout = '10s'"))
                for day in sorted(partitions.day_partitions(conn, table)):
                    if (day + 1) * DAY <= cut:
                        name = partitions.drop_day(conn, table, day)
                        if name:
                            report.partitions_dropped.append(name)
                target = f"{PART_SCHEMA}.{table}_default"
            else:
                target = table
            n = conn.execute(text(f"DELETE FROM {target} WHERE received_at < :cut"), {"cut": cut})
            report.rows_deleted[target] = max(n.rowcount or 0, 0)
        if partitioned:
            n = conn.execute(
                text(f"DELETE FROM {KEYS_TABLE} WHERE received_at < :cut"),
                {"cut": min(raw_cut, samples_cut)},
            )
            report.rows_deleted[KEYS_TABLE] = max(n.rowcount or 0, 0)
        n = conn.execute(
            delete(TelemetryHourly).where(
                TelemetryHourly.hour < (day_of(now) - p.rollup_days) * DAY
            )
        )
        report.rows_deleted[TelemetryHourly.__tablename__] = max(n.rowcount or 0, 0)
        old = read_mark(conn, RAW_SINCE)
        raw_since = max(raw_cut, old) if old is not None else raw_cut
        write_mark(conn, RAW_SINCE, raw_since)
        report.raw_since = raw_since


def _add(acc: list[int] | None, counts: Any) -> list[int] | None:
    """``acc`` plus ``counts`` bin by bin (in place; ``acc`` grows to the longer)."""
    if not isinstance(counts, list):
        return acc
    if acc is None:
        return [int(c) for c in counts]
    if len(counts) > len(acc):
        acc.extend([0] * (len(counts) - len(acc)))
    acc[: len(counts)] = map(operator.add, acc, map(int, counts))
    return acc


class _Hour:
    """The sums of one (device, model, rollout, shadow) in one hour."""

    def __init__(self) -> None:
        self.v: dict[str, Any] = {
            "windows": 0,
            "count": 0,
            "errors": 0,
            "latency_hist": None,
            "p95_sum": 0.0,
            "p95_count": 0,
            "psi_sum": 0.0,
            "psi_count": 0,
            "feature_counts": None,
            "feature_weight": 0,
            "prediction_counts": None,
            "labels_count": 0,
            "labels_correct": 0,
            "labelled_by_class": None,
            "correct_by_class": None,
            "previous_count": 0,
            "previous_agreements": 0,
            "shadow_count": 0,
            "shadow_errors": 0,
            "shadow_agreements": 0,
        }

    def add(self, r: Any) -> None:
        v = self.v
        n = r["count"] or 0
        v["windows"] += 1
        v["count"] += n
        v["errors"] += r["errors"] or 0
        v["latency_hist"] = _add(v["latency_hist"], r["latency_hist"])
        if r["p95_ms"] is not None:
            v["p95_sum"] += float(r["p95_ms"]) * n
            v["p95_count"] += n
        if r["drift_psi_max"] is not None and n:
            v["psi_sum"] += float(r["drift_psi_max"]) * n
            v["psi_count"] += n
        if r["feature_counts"]:
            v["feature_weight"] += max(n, 1)
            feats = v["feature_counts"] = v["feature_counts"] or {}
            for name, counts in r["feature_counts"].items():
                cur = feats.get(name)
                if cur is None:
                    feats[name] = [int(c) for c in counts]
                elif len(cur) == len(counts):
                    feats[name] = _add(cur, counts)
        v["prediction_counts"] = _add(v["prediction_counts"], r["prediction_counts"])
        v["labels_count"] += r["labels_count"] or 0
        v["labels_correct"] += r["labels_correct"] or 0
        labels = r["labels"]
        if isinstance(labels, dict):
            labelled, correct = labels.get("labelled"), labels.get("correct_by_class")
            if isinstance(labelled, list) and isinstance(correct, list):
                v["labelled_by_class"] = _add(v["labelled_by_class"], labelled)
                v["correct_by_class"] = _add(v["correct_by_class"], correct)
        if r["previous_count"] and r["previous_agreement"] is not None:
            v["previous_count"] += r["previous_count"]
            v["previous_agreements"] += round(float(r["previous_agreement"]) * r["previous_count"])
        if r["shadow_count"]:
            v["shadow_count"] += r["shadow_count"]
            v["shadow_errors"] += r["shadow_errors"] or 0
            if r["shadow_agreement"] is not None:
                v["shadow_agreements"] += round(float(r["shadow_agreement"]) * r["shadow_count"])


_JSON_COLUMNS = ("latency_hist", "feature_counts", "prediction_counts", "labels")


def roll_up_hour(conn: Connection, hour: float) -> int:
    """Recompute the roll-up rows of the hour starting at ``hour`` from the raw summaries
    (delete, then insert: idempotent); how many rows it now has."""
    s = TelemetrySummary
    stmt = select(
        s.device_id,
        s.name,
        s.version,
        s.rollout_id,
        s.shadow_name,
        s.shadow_version,
        s.count,
        s.errors,
        cast(s.latency_hist, Text).label("latency_hist"),
        s.p95_ms,
        s.drift_psi_max,
        cast(s.feature_counts, Text).label("feature_counts"),
        cast(s.prediction_counts, Text).label("prediction_counts"),
        s.labels_count,
        s.labels_correct,
        cast(s.labels, Text).label("labels"),
        s.previous_count,
        s.previous_agreement,
        s.shadow_count,
        s.shadow_errors,
        s.shadow_agreement,
    ).where(s.received_at >= hour, s.received_at < hour + HOUR)
    groups: dict[tuple[Any, ...], _Hour] = {}
    loads = DEFAULT.loads
    for row in conn.execute(stmt):
        r = dict(row._mapping)
        for col in _JSON_COLUMNS:  # decoded here: orjson, not per-column type processing
            if r[col] is not None:
                r[col] = loads(r[col])
        key: tuple[Any, ...] = (r["device_id"], r["name"], r["version"], r["rollout_id"])
        key += (r["shadow_name"], r["shadow_version"])
        acc = groups.get(key)
        if acc is None:
            acc = groups[key] = _Hour()
        acc.add(r)
    conn.execute(delete(TelemetryHourly).where(TelemetryHourly.hour == hour))
    rows = [
        {
            "hour": hour,
            "device_id": k[0],
            "name": k[1],
            "version": k[2],
            "rollout_id": k[3],
            "shadow_name": k[4],
            "shadow_version": k[5],
            **acc.v,
        }
        for k, acc in sorted(groups.items(), key=lambda kv: tuple(str(x) for x in kv[0]))
    ]
    if rows:
        conn.execute(insert(TelemetryHourly), rows)
    return len(rows)


def policy_from_settings(settings: ServerSettings) -> RetentionPolicy:
    """The retention settings of the server (``telemetry_*_days``)."""
    return RetentionPolicy(
        raw_days=settings.telemetry_raw_days,
        samples_days=settings.telemetry_samples_days,
        rollup_days=settings.telemetry_rollup_days,
    )
