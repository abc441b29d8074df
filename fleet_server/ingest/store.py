"""Write parsed telemetry to the database: one transaction per batch, idempotent.

Each table gets one ``INSERT ... ON CONFLICT (device_id, seq) DO NOTHING``
executed with all the batch's rows (the driver's executemany) on SQLite and
PostgreSQL, so re-delivered records are dropped by the database itself, also
across replicas. Rows repeated inside one batch are collapsed before the insert.

Where summaries and samples are partitioned by day (PostgreSQL, :mod:`fleet_server.db.partitions`)
their primary key includes ``received_at``, which a re-delivered record does not
share; there the batch's keys go first into the key table (``INSERT ... ON CONFLICT
DO NOTHING RETURNING``, keys sorted so concurrent replicas lock them in one order) and
only the records whose key was new are inserted, in the same transaction.

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

from fleet_server.db.partitions import KEYS_TABLE, is_partitioned
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
        with engine.connect() as conn:
            #: kinds whose uniqueness is kept by the key table (partitioned tables)
            self.keyed = frozenset(
                k for k, t in TABLES_BY_KIND.items() if is_partitioned(conn, t.name)
            )
        for kind in self.keyed:  # the key table already let only new records through
            sql, columns_of = self._plans[kind]
            self._plans[kind] = (
                sql.replace(" ON CONFLICT (device_id, seq) DO NOTHING", ""),
                columns_of,
            )
        self._keys_sql = (
            f"INSERT INTO {KEYS_TABLE} (device_id, seq, received_at) "
            "SELECT * FROM unnest(%s::varchar[], %s::bigint[], %s::float8[]) "
            "ON CONFLICT DO NOTHING RETURNING device_id, seq"
        )

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
                if kind in self.keyed:
                    rows_by_key = self._new_keys(conn, rows_by_key)
                    if not rows_by_key:
                        continue
                params = list(map(columns_of, rows_by_key.values()))
                result = conn.exec_driver_sql(sql, params)
                if result.rowcount is not None and result.rowcount >= 0:
                    stored += result.rowcount
        return WriteResult(offered, stored)

    def _new_keys(
        self, conn: Any, rows_by_key: dict[tuple[str, int], dict[str, Any]]
    ) -> dict[tuple[str, int], dict[str, Any]]:
        """The rows whose (device id, seq) the key table did not hold; it now does."""
        keys = sorted(rows_by_key)
        received = [rows_by_key[k]["received_at"] for k in keys]
        result = conn.exec_driver_sql(
            self._keys_sql, ([k[0] for k in keys], [k[1] for k in keys], received)
        )
        return {(d, int(q)): rows_by_key[(d, int(q))] for d, q in result}

    @staticmethod
    def table(kind: str) -> Table:
        return TABLES_BY_KIND[kind]
