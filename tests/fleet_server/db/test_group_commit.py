"""Group commit on SQLite and PostgreSQL: writes waiting together share one transaction,
each caller learns its result only after the commit, and a write that fails is retried
alone so it takes no other write down with it."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future

import pytest
from sqlalchemy import Column, Integer, MetaData, Table, func, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from fleet_server.db.group_commit import GroupCommitter
from fleet_server.db.session import make_engine, make_sessionmaker
from tests.server_fixtures import Fleet

meta = MetaData()
rows = Table("gc_rows", meta, Column("k", Integer, primary_key=True))


@pytest.fixture
def committer(db_url: str) -> Iterator[tuple[GroupCommitter, object]]:
    engine = make_engine(db_url)
    meta.create_all(engine)
    sessions = make_sessionmaker(engine)
    gc = GroupCommitter(sessions, max_batch=64)
    yield gc, engine
    gc.close()
    engine.dispose()


def _count(engine: object) -> int:
    with make_sessionmaker(engine)() as s:  # type: ignore[arg-type]
        return int(s.scalar(select(func.count()).select_from(rows)) or 0)


def _writer(k: int) -> Callable[[Session], int]:
    def w(s: Session) -> int:
        s.execute(insert(rows).values(k=k))
        return k

    return w


def _wait_running(f: Future[int]) -> None:
    deadline = time.monotonic() + 10
    while not f.running() and time.monotonic() < deadline:
        time.sleep(0.005)
    assert f.running()


def test_waiting_writes_share_one_commit_and_a_bad_one_fails_alone(
    committer: tuple[GroupCommitter, object],
) -> None:
    gc, engine = committer
    gate = threading.Event()

    def first(s: Session) -> int:
        gate.wait(10)  # hold the worker until the others are queued behind it
        s.execute(insert(rows).values(k=0))
        return 0

    head = gc.submit(first)
    _wait_running(head)
    futures: list[Future[int]] = [gc.submit(_writer(k)) for k in range(1, 41)]
    # nothing is visible, and nobody has an answer, before a commit
    assert not any(f.done() for f in futures)
    gate.set()
    assert head.result(10) == 0
    assert [f.result(10) for f in futures] == list(range(1, 41))
    assert _count(engine) == 41
    # the first write ran alone (the worker was running it when the rest came); the
    # forty queued behind it went in one transaction
    assert gc.writes == 41 and gc.commits == 2

    # a duplicate key in a batch: the batch is rolled back and every write runs alone;
    # the good ones are stored, the bad one's caller gets the database's error
    gate2 = threading.Event()

    def hold(s: Session) -> int:
        gate2.wait(10)
        s.execute(insert(rows).values(k=100))
        return 100

    h = gc.submit(hold)
    _wait_running(h)
    mixed = [gc.submit(_writer(k)) for k in (101, 102, 5, 103)]  # 5 exists already
    gate2.set()
    assert h.result(10) == 100
    assert mixed[0].result(10) == 101 and mixed[1].result(10) == 102
    with pytest.raises(IntegrityError):
        mixed[2].result(10)
    assert mixed[3].result(10) == 103
    assert _count(engine) == 45


def test_close_finishes_queued_writes_then_refuses_new_ones(
    committer: tuple[GroupCommitter, object],
) -> None:
    gc, engine = committer
    futures = [gc.submit(_writer(k)) for k in range(200, 230)]
    gc.close()
    assert all(f.done() for f in futures)
    assert _count(engine) == 30
    with pytest.raises(RuntimeError, match="closed"):
        gc.submit(lambda s: None)


def test_prepare_sees_each_batch_keys_once_before_its_writes(db_url: str) -> None:
    """What a batch's writes look up is loaded before them, from the keys they were
    submitted with (the device reports load their devices in one query per table)."""
    engine = make_engine(db_url)
    meta.create_all(engine)
    seen: list[list[int]] = []
    gate = threading.Event()

    def prepare(s: Session, keys: list[object]) -> None:
        seen.append([int(str(k)) for k in keys])

    gc = GroupCommitter(make_sessionmaker(engine), prepare=prepare)
    try:

        def first(s: Session) -> int:
            gate.wait(10)
            return 0

        head = gc.submit(first, key=0)
        _wait_running(head)
        futures = [gc.submit(_writer(k), key=k) for k in range(300, 310)]
        gate.set()
        assert [f.result(10) for f in futures] == list(range(300, 310))
        assert seen == [[0], list(range(300, 310))]
    finally:
        gc.close()
        engine.dispose()


def test_reports_while_the_server_stops_get_a_coded_refusal(fleet: Fleet) -> None:
    """A report that arrives after the committer closed (the server is stopping) is
    refused 503 with a code and a message that says what to do, not an uncoded 500."""
    creds = fleet.enroll("cam-1")
    fleet.ctx.report_commits.close()
    r = fleet.client.post(
        "/device/v1/reports",
        headers=creds,
        json={"reports": [{"type": "health", "health": "ok"}]},
    )
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "unavailable"
    assert "send the reports again" in r.json()["error"]["message"]
