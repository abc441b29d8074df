"""The Alembic migrations create exactly the tables the models declare (server and
telemetry), on SQLite and on PostgreSQL, and running them twice is harmless."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from fleet_server.db.base import Base
from fleet_server.db.session import import_all_tables, make_engine, upgrade_database


def test_migrations_match_the_models(db_url: str) -> None:
    import_all_tables()
    engine = make_engine(db_url)
    try:
        upgrade_database(engine)
        upgrade_database(engine)  # idempotent: every server start runs it
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert diff == [], f"models changed without a migration: {diff}"
        tables = set(inspect(engine).get_table_names())
        assert {
            "devices",
            "bundles",
            "rollouts",
            "audit_log",
            "telemetry_summaries",
            "telemetry_events",
            "telemetry_samples",
        } <= tables
    finally:
        engine.dispose()
