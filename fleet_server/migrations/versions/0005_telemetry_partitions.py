"""telemetry retention: hourly roll-ups, maintenance marks; day partitions on PostgreSQL

On PostgreSQL ``telemetry_summaries`` and ``telemetry_samples`` become tables
partitioned by day on ``received_at`` (``fleet_server.db.partitions``): the old table
is renamed, a partitioned one made like it (primary key ``(device_id, seq,
received_at)``, the same indexes, a default partition), day partitions made for the
days its rows were received on and the next few, the rows copied, their keys put in
``telemetry_parts.telemetry_keys``, and the old table dropped. On SQLite the tables
stay as they are. Both get ``telemetry_hourly`` and ``telemetry_marks``.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 05:00:00
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from fleet_server.db import partitions

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: table -> its indexes (name, columns), as revision 0001 made them
_INDEXES = {
    "telemetry_summaries": (
        ("ix_telemetry_summaries_model_received", "name, version, received_at"),
        ("ix_telemetry_summaries_shadow_received", "shadow_name, shadow_version, received_at"),
        ("ix_telemetry_summaries_rollout", "rollout_id"),
    ),
    "telemetry_samples": (("ix_telemetry_samples_model_received", "name, version, received_at"),),
}
#: day partitions made ahead of today
_AHEAD_DAYS = 2


def _partition(table: str) -> None:
    conn = op.get_bind()
    old = f"{table}_0004"
    op.execute(f"ALTER TABLE {table} RENAME TO {old}")
    op.execute(f"ALTER TABLE {old} DROP CONSTRAINT pk_{table}")
    for name, _ in _INDEXES[table]:
        op.execute(f"DROP INDEX IF EXISTS {name}")
    op.execute(f"CREATE SCHEMA IF NOT EXISTS {partitions.PART_SCHEMA}")
    op.execute(
        f"CREATE TABLE {table} (LIKE {old} INCLUDING DEFAULTS) PARTITION BY RANGE (received_at)"
    )
    op.execute(
        f"ALTER TABLE {table} ADD CONSTRAINT pk_{table} PRIMARY KEY (device_id, seq, received_at)"
    )
    for name, columns in _INDEXES[table]:
        op.execute(f"CREATE INDEX {name} ON {table} ({columns})")
    op.execute(
        f"CREATE TABLE {partitions.PART_SCHEMA}.{table}_default PARTITION OF {table} DEFAULT"
    )
    partitions.create_keys_table(conn)
    today = partitions.day_of(time.time())
    days = set(range(today, today + _AHEAD_DAYS + 1))
    days |= {
        int(d)
        for (d,) in conn.execute(
            sa.text(f"SELECT DISTINCT floor(received_at / {partitions.DAY}) FROM {old}")
        )
    }
    for day in sorted(days):
        partitions.ensure_day(conn, table, day)
    op.execute(
        f"INSERT INTO {partitions.KEYS_TABLE} (device_id, seq, received_at) "
        f"SELECT device_id, seq, received_at FROM {old} ON CONFLICT DO NOTHING"
    )
    op.execute(f"INSERT INTO {table} SELECT * FROM {old}")
    op.execute(f"DROP TABLE {old}")


def _unpartition(table: str) -> None:
    new = f"{table}_0005"
    op.execute(f"CREATE TABLE {new} (LIKE {table} INCLUDING DEFAULTS)")
    op.execute(
        f"INSERT INTO {new} SELECT DISTINCT ON (device_id, seq) * FROM {table} "
        "ORDER BY device_id, seq, received_at"
    )
    op.execute(f"DROP TABLE {table} CASCADE")
    op.execute(f"ALTER TABLE {new} RENAME TO {table}")
    op.execute(f"ALTER TABLE {table} ADD CONSTRAINT pk_{table} PRIMARY KEY (device_id, seq)")
    for name, columns in _INDEXES[table]:
        op.execute(f"CREATE INDEX {name} ON {table} ({columns})")


def upgrade() -> None:
    op.create_table(
        "telemetry_hourly",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("hour", sa.Float(), nullable=False),
        sa.Column("device_id", sa.String(length=100), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("rollout_id", sa.String(length=40), nullable=True),
        sa.Column("shadow_name", sa.String(length=200), nullable=True),
        sa.Column("shadow_version", sa.Integer(), nullable=True),
        sa.Column("windows", sa.Integer(), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.Column("errors", sa.BigInteger(), nullable=False),
        sa.Column("latency_hist", sa.JSON(), nullable=True),
        sa.Column("p95_sum", sa.Float(), nullable=False),
        sa.Column("p95_count", sa.BigInteger(), nullable=False),
        sa.Column("psi_sum", sa.Float(), nullable=False),
        sa.Column("psi_count", sa.BigInteger(), nullable=False),
        sa.Column("feature_counts", sa.JSON(), nullable=True),
        sa.Column("feature_weight", sa.BigInteger(), nullable=False),
        sa.Column("prediction_counts", sa.JSON(), nullable=True),
        sa.Column("labels_count", sa.BigInteger(), nullable=False),
        sa.Column("labels_correct", sa.BigInteger(), nullable=False),
        sa.Column("labelled_by_class", sa.JSON(), nullable=True),
        sa.Column("correct_by_class", sa.JSON(), nullable=True),
        sa.Column("previous_count", sa.BigInteger(), nullable=False),
        sa.Column("previous_agreements", sa.BigInteger(), nullable=False),
        sa.Column("shadow_count", sa.BigInteger(), nullable=False),
        sa.Column("shadow_errors", sa.BigInteger(), nullable=False),
        sa.Column("shadow_agreements", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_telemetry_hourly")),
    )
    with op.batch_alter_table("telemetry_hourly", schema=None) as batch_op:
        batch_op.create_index("ix_telemetry_hourly_hour", ["hour"], unique=False)
        batch_op.create_index(
            "ix_telemetry_hourly_model_hour", ["name", "version", "hour"], unique=False
        )
        batch_op.create_index(
            "ix_telemetry_hourly_shadow_hour",
            ["shadow_name", "shadow_version", "hour"],
            unique=False,
        )
    op.create_table(
        "telemetry_marks",
        sa.Column("name", sa.String(length=60), nullable=False),
        sa.Column("value", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_telemetry_marks")),
    )
    if op.get_bind().dialect.name == "postgresql":
        for table in partitions.PARTITIONED:
            _partition(table)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for table in partitions.PARTITIONED:
            _unpartition(table)
        op.execute(f"DROP SCHEMA IF EXISTS {partitions.PART_SCHEMA} CASCADE")
    op.drop_table("telemetry_marks")
    with op.batch_alter_table("telemetry_hourly", schema=None) as batch_op:
        batch_op.drop_index("ix_telemetry_hourly_shadow_hour")
        batch_op.drop_index("ix_telemetry_hourly_model_hour")
        batch_op.drop_index("ix_telemetry_hourly_hour")
    op.drop_table("telemetry_hourly")
