"""Leader election through a database lock: one replica runs the rollout scheduler.

* **PostgreSQL**: ``pg_try_advisory_lock(key)`` on a dedicated connection that is
  held for as long as the replica leads. PostgreSQL releases a session-level
  advisory lock when its session ends, so a crashed or partitioned leader loses
  the lock as soon as its connection is gone and another replica takes over on
  its next attempt. The leader checks its connection before each round
  (:meth:`LeaderLock.still_leader`) and stops leading when the check fails.
* **SQLite file**: an exclusive ``flock`` on ``<database>.leader.lock`` beside the
  database file (SQLite serves one machine, so a file lock covers every process
  that can open it).
* **SQLite in memory**: the single process just leads.

The key is derived from a name (sha256, first 8 bytes as a signed 64-bit int), so
several kinds of singleton work can elect leaders independently.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from typing import Protocol

from sqlalchemy import create_engine, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.pool import NullPool

from fleet_server.rollouts.errors import LeaderLockError

DEFAULT_NAME = "edgefleet.rollout-scheduler"


def lock_key(name: str) -> int:
    """The advisory lock key for ``name`` (a signed 64-bit integer)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


class LeaderLock(Protocol):
    """Who leads. Not thread-safe: one owner thread calls all three methods."""

    def try_acquire(self) -> bool:
        """Take the lock if free; True if this process leads (also if it already did)."""

    def still_leader(self) -> bool:
        """Whether this process still holds the lock (False after losing it)."""

    def release(self) -> None:
        """Give up leadership (idempotent)."""


class PostgresLeaderLock:
    """``pg_try_advisory_lock`` held on a dedicated connection."""

    def __init__(self, url: str, name: str = DEFAULT_NAME, connect_timeout: float = 5.0) -> None:
        self.key = lock_key(name)
        self._engine = create_engine(
            url,
            poolclass=NullPool,
            connect_args={
                "connect_timeout": max(1, int(connect_timeout)),
                "application_name": f"edgefleet-leader:{name}"[:63],
            },
        )
        self._conn: Connection | None = None

    def try_acquire(self) -> bool:
        if self._conn is not None:
            return self.still_leader()
        conn: Connection | None = None
        try:
            conn = self._engine.connect()
            conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            got = bool(
                conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": self.key}).scalar()
            )
        except SQLAlchemyError as e:
            if conn is not None:
                with contextlib.suppress(SQLAlchemyError):
                    conn.close()
            raise LeaderLockError(
                f"cannot reach PostgreSQL for the leader lock: {e}; check the database URL "
                "and that the server is up"
            ) from e
        if got:
            self._conn = conn
        else:
            conn.close()
        return got

    def still_leader(self) -> bool:
        if self._conn is None:
            return False
        try:
            unsigned = self.key & 0xFFFFFFFFFFFFFFFF
            held = self._conn.execute(
                text(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                    "AND pid = pg_backend_pid() AND granted AND objsubid = 1 "
                    "AND classid::bigint = :hi AND objid::bigint = :lo"
                ),
                {"hi": unsigned >> 32, "lo": unsigned & 0xFFFFFFFF},
            ).scalar()
            if held:
                return True
        except SQLAlchemyError:
            pass
        self._drop()
        return False

    def release(self) -> None:
        if self._conn is None:
            return
        with contextlib.suppress(SQLAlchemyError):
            self._conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": self.key})
        self._drop()

    def backend_pid(self) -> int | None:
        """The PostgreSQL backend pid holding the lock (for operators and tests)."""
        if self._conn is None:
            return None
        return int(self._conn.execute(text("SELECT pg_backend_pid()")).scalar_one())

    def _drop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(SQLAlchemyError):
                self._conn.close()
            self._conn = None

    def close(self) -> None:
        self.release()
        self._engine.dispose()


class FileLeaderLock:
    """An exclusive ``flock`` on a lock file (for SQLite databases)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        if self._fd is not None:
            return True
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise LeaderLockError(f"cannot open leader lock file {self.path}: {e}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def still_leader(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def close(self) -> None:
        self.release()


class SoleLeader:
    """The only process there is: always leads (in-memory SQLite, tests)."""

    def __init__(self) -> None:
        self._leading = False

    def try_acquire(self) -> bool:
        self._leading = True
        return True

    def still_leader(self) -> bool:
        return self._leading

    def release(self) -> None:
        self._leading = False

    def close(self) -> None:
        self.release()


def leader_lock_for(
    url: str, name: str = DEFAULT_NAME
) -> PostgresLeaderLock | FileLeaderLock | SoleLeader:
    """The right :class:`LeaderLock` for a SQLAlchemy database URL."""
    try:
        u = make_url(url)
    except ArgumentError as e:
        raise LeaderLockError(f"not a database URL: {url!r}") from e
    if u.get_backend_name() == "postgresql":
        return PostgresLeaderLock(url, name)
    if u.get_backend_name() == "sqlite":
        db = u.database
        if not db or db == ":memory:" or db.startswith("file::memory:"):
            return SoleLeader()
        return FileLeaderLock(f"{db}.leader.lock")
    raise LeaderLockError(
        f"no leader lock for database backend {u.get_backend_name()!r}; use PostgreSQL or SQLite"
    )
