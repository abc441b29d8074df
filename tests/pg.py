"""Fresh PostgreSQL databases for tests (127.0.0.1:5432, user postgres, trust auth)."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator

import psycopg

PG_ADMIN_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"


@contextlib.contextmanager
def fresh_database(prefix: str = "edgefleet_test") -> Iterator[str]:
    """Create a database, yield its SQLAlchemy URL, drop it (even with open connections)."""
    name = f"{prefix}_{secrets.token_hex(6)}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
