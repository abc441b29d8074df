"""Leader election: against a real PostgreSQL (fresh database per test) and SQLite files."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from fleet_server.rollouts import LeaderLockError
from fleet_server.rollouts.leader import (
    FileLeaderLock,
    PostgresLeaderLock,
    SoleLeader,
    leader_lock_for,
    lock_key,
)
from tests.pg import PG_ADMIN_DSN, fresh_database


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database on 127.0.0.1:5432, dropped afterwards."""
    with fresh_database("edgefleet_leader") as url:
        yield url


def terminate_backend(pid: int) -> None:
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(%s)", (pid,))


def test_two_contenders_only_one_leads_and_other_takes_over_when_connection_dies(
    pg_url: str,
) -> None:
    a, b = PostgresLeaderLock(pg_url), PostgresLeaderLock(pg_url)
    try:
        assert a.try_acquire() is True
        assert b.try_acquire() is False
        assert a.try_acquire() is True  # re-entrant for the holder
        assert a.still_leader() and not b.still_leader()
        pid = a.backend_pid()
        assert pid is not None
        # the leader's connection dies (crash, network partition): PostgreSQL frees the lock
        terminate_backend(pid)
        assert a.still_leader() is False
        assert b.try_acquire() is True
        assert a.try_acquire() is False
        assert b.still_leader()
    finally:
        a.close()
        b.close()


def test_released_lock_goes_to_the_next_contender(pg_url: str) -> None:
    a, b = PostgresLeaderLock(pg_url), PostgresLeaderLock(pg_url)
    try:
        assert a.try_acquire()
        a.release()
        assert not a.still_leader()
        assert b.try_acquire()
    finally:
        a.close()
        b.close()


def test_differently_named_locks_are_independent(pg_url: str) -> None:
    # "a" hashes to a negative key: the pg_locks check must handle the sign
    a, b = PostgresLeaderLock(pg_url, "a"), PostgresLeaderLock(pg_url, "one")
    assert lock_key("a") < 0 < lock_key("one")
    try:
        assert a.try_acquire() and b.try_acquire()
        assert a.still_leader() and b.still_leader()
    finally:
        a.close()
        b.close()


def test_unreachable_postgres_raises_leader_lock_error(tmp_path: Path) -> None:
    # a unix socket directory with no server in it: nothing can answer there
    lock = PostgresLeaderLock(f"postgresql+psycopg://postgres@/x?host={tmp_path}")
    with pytest.raises(LeaderLockError, match="cannot reach PostgreSQL"):
        lock.try_acquire()


def test_sqlite_file_lock_admits_one_leader(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'server.db'}"
    a, b = leader_lock_for(url), leader_lock_for(url)
    assert isinstance(a, FileLeaderLock)
    try:
        assert a.try_acquire() and not b.try_acquire()
        a.release()
        assert b.try_acquire() and b.still_leader()
    finally:
        a.close()
        b.close()


def test_in_memory_sqlite_just_leads() -> None:
    lock = leader_lock_for("sqlite:///:memory:")
    assert isinstance(lock, SoleLeader) and lock.try_acquire() and lock.still_leader()


def test_unsupported_backend_is_refused() -> None:
    with pytest.raises(LeaderLockError, match="no leader lock"):
        leader_lock_for("mysql://u@h/db")


def test_lock_key_is_a_stable_signed_64_bit_integer() -> None:
    k = lock_key("edgefleet.rollout-scheduler")
    assert k == lock_key("edgefleet.rollout-scheduler") and -(2**63) <= k < 2**63
