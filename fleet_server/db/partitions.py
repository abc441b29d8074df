"""PostgreSQL native partitioning of the raw telemetry tables (summaries and samples).

Invariants on PostgreSQL:

* ``telemetry_summaries`` and ``telemetry_samples`` are ``PARTITION BY RANGE
  (received_at)`` (the server's clock, so every row lands in a partition the server
  made ahead of time), one partition per UTC day named ``<table>_YYYYMMDD``, plus
  ``<table>_default`` for a row that no day covers (maintenance not run, a clock
  jump); all in the schema :data:`PART_SCHEMA`, so the application schema holds only
  the parents the models declare. Retention drops whole day partitions.
* PostgreSQL wants the partition key in every unique constraint, so the parents'
  primary key is ``(device_id, seq, received_at)``. That key no longer makes
  ingestion idempotent (a re-delivered record gets a later ``received_at``), so the
  plain table ``PART_SCHEMA.telemetry_keys`` (primary key ``(device_id, seq)``, a few
  dozen bytes a row) does: the writer inserts a batch's keys there first and stores
  only the records whose key was new, in the same transaction. Its rows are deleted
  with the raw rows they stand for, by ``received_at``.
* A day partition is created by moving the default partition's rows of that day
  aside, creating the partition, and inserting them back, so creating a day never
  fails on rows the default partition caught.

``telemetry_events`` stays a plain table: a few rows per device and install, read
over a whole rollout by the install gates.

SQLite has none of this: plain tables and DELETE-based retention.
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import Connection, Table, text
from sqlalchemy.schema import CreateIndex, CreateTable

#: schema of the day partitions and the key table (out of the models' schema)
PART_SCHEMA = "telemetry_parts"
#: the raw tables partitioned on PostgreSQL
PARTITIONED = ("telemetry_summaries", "telemetry_samples")
KEYS_TABLE = f"{PART_SCHEMA}.telemetry_keys"
DAY = 86400


def day_of(ts: float) -> int:
    """Days since the epoch (UTC) of a UNIX time."""
    return int(ts // DAY)


def partition_name(table: str, day: int) -> str:
    """``<table>_YYYYMMDD`` of day number ``day``."""
    return f"{table}_{datetime.fromtimestamp(day * DAY, timezone.utc):%Y%m%d}"


def _day_from_name(table: str, name: str) -> int | None:
    suffix = name[len(table) + 1 :]
    if not name.startswith(table + "_") or len(suffix) != 8 or not suffix.isdigit():
        return None
    dt = datetime.strptime(suffix, "%Y%m%d").replace(tzinfo=timezone.utc)
    return day_of(dt.timestamp())


def is_partitioned(conn: Connection, table: str) -> bool:
    """Whether ``table`` (in the current schema) is a partitioned table."""
    if conn.dialect.name != "postgresql":
        return False
    return bool(
        conn.execute(
            text(
                "SELECT EXISTS (SELECT 1 FROM pg_partitioned_table p "
                "JOIN pg_class c ON c.oid = p.partrelid "
                "WHERE c.relname = :t AND c.relnamespace = current_schema()::regnamespace)"
            ),
            {"t": table},
        ).scalar()
    )


def create_partitioned(conn: Connection, table: Table) -> None:
    """Create ``table`` partitioned by day on ``received_at``, its indexes, its default
    partition, and the key table (PostgreSQL)."""
    ddl = str(CreateTable(table).compile(dialect=conn.dialect)).strip()
    pk = "PRIMARY KEY (device_id, seq)"
    if pk not in ddl:
        raise RuntimeError(f"{table.name}: expected {pk} in its definition")
    ddl = ddl.replace(pk, "PRIMARY KEY (device_id, seq, received_at)")
    conn.execute(text(f"CREATE SCHEMA IF NOT EXISTS {PART_SCHEMA}"))
    conn.execute(text(ddl + " PARTITION BY RANGE (received_at)"))
    for index in sorted(table.indexes, key=lambda i: str(i.name)):
        conn.execute(CreateIndex(index))
    conn.execute(
        text(f"CREATE TABLE {PART_SCHEMA}.{table.name}_default PARTITION OF {table.name} DEFAULT")
    )
    create_keys_table(conn)


def create_keys_table(conn: Connection) -> None:
    conn.execute(text(f"CREATE SCHEMA IF NOT EXISTS {PART_SCHEMA}"))
    conn.execute(
        text(
            f"CREATE TABLE IF NOT EXISTS {KEYS_TABLE} ("
            "device_id VARCHAR(100) NOT NULL, seq BIGINT NOT NULL, "
            "received_at DOUBLE PRECISION NOT NULL, PRIMARY KEY (device_id, seq))"
        )
    )
    conn.execute(
        text(
            "CREATE INDEX IF NOT EXISTS ix_telemetry_keys_received_at "
            f"ON {KEYS_TABLE} (received_at)"
        )
    )


def day_partitions(conn: Connection, table: str) -> dict[int, str]:
    """Day number -> partition name of ``table``'s day partitions."""
    names = conn.execute(
        text(
            "SELECT c.relname FROM pg_inherits i "
            "JOIN pg_class c ON c.oid = i.inhrelid "
            "JOIN pg_class p ON p.oid = i.inhparent "
            "WHERE p.relname = :t AND p.relnamespace = current_schema()::regnamespace"
        ),
        {"t": table},
    ).scalars()
    out = {}
    for name in names:
        day = _day_from_name(table, name)
        if day is not None:
            out[day] = name
    return out


def ensure_day(conn: Connection, table: str, day: int) -> str | None:
    """Create ``table``'s partition for ``day`` unless it exists; its name if created.

    Rows of that day caught by the default partition are moved into it.
    """
    if day in day_partitions(conn, table):
        return None
    name = partition_name(table, day)
    lo, hi = float(day * DAY), float((day + 1) * DAY)
    default = f"{PART_SCHEMA}.{table}_default"
    moved = f"_moved_{name}"
    conn.execute(text(f"CREATE TEMPORARY TABLE {moved} (LIKE {table}) ON COMMIT DROP"))
    conn.execute(
        text(
            f"WITH m AS (DELETE FROM {default} WHERE received_at >= :lo AND received_at < :hi "
            f"RETURNING *) INSERT INTO {moved} SELECT * FROM m"
        ),
        {"lo": lo, "hi": hi},
    )
    conn.execute(
        text(
            f"CREATE TABLE {PART_SCHEMA}.{name} PARTITION OF {table} "
            f"FOR VALUES FROM ({lo!r}) TO ({hi!r})"
        )
    )
    conn.execute(text(f"INSERT INTO {table} SELECT * FROM {moved}"))
    return name


def drop_day(conn: Connection, table: str, day: int) -> str | None:
    """Drop ``table``'s partition of ``day`` (its rows go with it); its name if dropped."""
    name = day_partitions(conn, table).get(day)
    if name is None:
        return None
    conn.execute(text(f"DROP TABLE {PART_SCHEMA}.{name}"))
    return name


def partition_bytes(conn: Connection, table: str) -> int:
    """Bytes of ``table``'s partitions with their indexes and TOAST (PostgreSQL)."""
    return int(
        conn.execute(
            text(
                "SELECT COALESCE(SUM(pg_total_relation_size(i.inhrelid)), 0) FROM pg_inherits i "
                "JOIN pg_class p ON p.oid = i.inhparent "
                "WHERE p.relname = :t AND p.relnamespace = current_schema()::regnamespace"
            ),
            {"t": table},
        ).scalar_one()
    )
