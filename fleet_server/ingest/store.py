"""Write parsed telemetry to the database: one transaction per batch, idempotent.

Each table gets one ``INSERT ... ON CONFLICT (device_id, seq) DO NOTHING``
executed with all the batch's rows (the driver's executemany) on SQLite and
PostgreSQL, so re-delivered records are dropped by the database itself, also
across replicas. Rows repeated inside one batch are collapsed before the insert.

The statement is built from the SQLAlchemy table definition but executed at the
driver level, with JSON columns already encoded by :mod:`.parse`: this is the
hot path of ingestion, and per-row type processing in SQLAlchemy would cost a
third of it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

from sqlalchemy import Engine, Table

from fleet_server.db.telemetry import TABLES_BY_KIND
from fleet_server.ingest.parse import ParsedMessage


@dataclass(frozen=True)
class WriteResult:
    """What one batch did: rows offered, rows new to the database."""

    offered: int
    stored: int

    @property
    def duplicates(self) -> int:
        return self.offered - self.stored


class TelemetryWriter:
    """Writes batches of :class:`ParsedMessage` into the telemetry tables."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        name = engine.dialect.name
        if name not in ("sqlite", "postgresql"):
            raise ValueError(f"telemetry ingestion supports SQLite and PostgreSQL, not {name}")
        mark = "?" if engine.dialect.paramstyle == "qmark" else "%s"
        self._plans: dict[str, tuple[str, Callable[[dict[str, Any]], tuple[Any, ...]]]] = {}
        for kind, table in TABLES_BY_KIND.items():
            cols = [c.name for c in table.columns]
            sql = (
                f"INSERT INTO {table.name} ({', '.join(cols)}) "
                f"VALUES ({', '.join([mark] * len(cols))}) "
                "ON CONFLICT (device_id, seq) DO NOTHING"
            )
            self._plans[kind] = (sql, itemgetter(*cols))

    def write(self, messages: Iterable[ParsedMessage]) -> WriteResult:
        """Insert every row of ``messages`` in one transaction."""
        by_kind: dict[str, dict[tuple[str, int], dict[str, Any]]] = {k: {} for k in TABLES_BY_KIND}
        offered = 0
        for m in messages:
            for kind, rows in m.rows.items():
                bucket = by_kind[kind]
                for row in rows:
                    offered += 1
                    bucket.setdefault((row["device_id"], row["seq"]), row)
        stored = 0
        with self.engine.begin() as conn:
            for kind, rows_by_key in by_kind.items():
                if not rows_by_key:
                    continue
                sql, columns_of = self._plans[kind]
                params = list(map(columns_of, rows_by_key.values()))
                result = conn.exec_driver_sql(sql, params)
                if result.rowcount is not None and result.rowcount >= 0:
                    stored += result.rowcount
        return WriteResult(offered, stored)

    @staticmethod
    def table(kind: str) -> Table:
        return TABLES_BY_KIND[kind]
