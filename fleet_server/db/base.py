"""The declarative base every server table derives from.

Constraint names follow one naming convention so Alembic migrations are stable
across SQLite and PostgreSQL (batch mode on SQLite needs named constraints).
"""

from __future__ import annotations

from sqlalchemy import MetaData
from sqlalchemy.orm import DeclarativeBase

NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    """Declarative base for all server tables (operators, devices, bundles, telemetry, ...)."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
