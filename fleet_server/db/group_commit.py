"""Group commit: many small writes from concurrent requests share one transaction.

A request hands :meth:`GroupCommitter.submit` a function that writes through the
session it is given (without committing) and gets a future. One worker thread takes
every function waiting (up to ``max_batch``), runs them in one session and commits
once; each future resolves only after that commit, so a caller that acknowledges its
client on the result still acknowledges durable data only. Ten thousand devices
reporting an install within a minute cost ten thousand transactions without it, one
database round trip each for BEGIN and COMMIT plus a pooled connection each, and the
requests queue for the pool.

If any function of a batch raises, or the commit fails, the whole batch is rolled back
and each function runs again alone in its own transaction, so one bad write never
fails or delays a good one beyond that retry and each caller gets its own outcome.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import AbstractContextManager
from typing import Any, TypeVar

from sqlalchemy.orm import Session

log = logging.getLogger(__name__)

T = TypeVar("T")
Write = Callable[[Session], Any]
#: loads, in one query per table, what a batch's writes will look up by primary key,
#: from the keys they were submitted with; what it returns is held for the batch (the
#: session's identity map keeps objects only while something refers to them)
Prepare = Callable[[Session, list[Any]], Any]
Item = tuple[Write, Future[Any], Any]


class GroupCommitter:
    """Runs submitted writes in shared transactions on one worker thread."""

    def __init__(
        self,
        sessions: Callable[[], AbstractContextManager[Session]],
        *,
        max_batch: int = 256,
        name: str = "group-commit",
        prepare: Prepare | None = None,
    ) -> None:
        self._sessions = sessions
        self._prepare = prepare
        self._max_batch = max_batch
        self._name = name
        self._queue: queue.SimpleQueue[Item | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False
        #: transactions committed and writes in them (read by the tests)
        self.commits = 0
        self.writes = 0

    def submit(self, write: Callable[[Session], T], key: Any = None) -> Future[T]:
        """Queue ``write``; the future holds its result once its transaction committed.
        ``key`` is handed to ``prepare`` with the batch's other keys."""
        fut: Future[T] = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self._name} is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._queue.put((write, fut, key))
        return fut

    def close(self, timeout: float = 30.0) -> None:
        """Finish every queued write, then stop the worker."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
        if thread is not None:
            self._queue.put(None)
            thread.join(timeout)

    # -- worker ------------------------------------------------------------------
    def _run(self) -> None:
        stop = False
        while not stop:
            item = self._queue.get()
            if item is None:
                break
            batch = [item]
            while len(batch) < self._max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            live = [item for item in batch if item[1].set_running_or_notify_cancel()]
            if live:
                self._commit(live)

    def _commit(self, batch: list[Item]) -> None:
        try:
            with self._sessions() as s:
                held = self._prepare(s, [k for *_, k in batch]) if self._prepare else None
                # the writes look rows up; flushing before each lookup would cost a round
                # trip per write: the commit flushes them together
                with s.no_autoflush:
                    results = [w(s) for w, _f, _k in batch]
                s.commit()
                del held
        except Exception as e:
            if len(batch) == 1:  # its own outcome already
                batch[0][1].set_exception(e)
                return
            log.info("%s: a batch of %d failed; each write runs alone", self._name, len(batch))
            for item in batch:
                self._alone(item)
            return
        self.commits += 1
        self.writes += len(batch)
        for (_w, f, _k), r in zip(batch, results, strict=True):
            f.set_result(r)

    def _alone(self, item: Item) -> None:
        write, fut, _key = item
        try:
            with self._sessions() as s:
                result = write(s)
                s.commit()
        except BaseException as e:  # the caller's outcome, whatever it is
            fut.set_exception(e)
            return
        self.commits += 1
        self.writes += 1
        fut.set_result(result)
