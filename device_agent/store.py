"""Bounded, crash-safe telemetry buffer on the device (SQLite via sqlite-utils).

The agent writes window summaries, sampled inference logs and events here; the
reporter drains them to MQTT and deletes rows only after the broker acknowledged
them. Invariants this module keeps:

* **Sequence numbers** are per device, strictly increasing across all kinds and
  never reused, even after rows are acknowledged, evicted, or the process is
  killed: the next number is kept in the ``meta`` table and advanced in the same
  transaction as the rows that use it.
* **Crash safety**: WAL journal, ``synchronous=NORMAL``; a batch is one
  transaction, so a ``kill -9`` loses at most the batch being written and never
  leaves a torn row. (A power cut may lose the last committed batches; it never
  corrupts the file.)
* **Bounded size**: the database file plus its WAL stay within ``max_bytes``.
  Each kind lives in its own table so evicting the oldest rows of one kind frees
  whole pages. When the pages in use exceed the budget, rows are evicted oldest
  first in :data:`EVICTION_ORDER` (raw samples, then summaries, then events) and
  every evicted row is counted per kind.
* **Dropped counts are reported**: :meth:`TelemetryStore.take_dropped` returns
  the counts evicted since the last call (persisted, so a restart does not forget
  them) in the shape of the summary body's ``"dropped"`` field.

* **Resilience** (``resilient=True``, what the agent uses): a file that fails
  SQLite's integrity check when opened, or turns out corrupt while in use, is
  moved aside as ``telemetry.db.corrupt-<UTC time>`` and replaced by an empty
  store; a full disk never raises from :meth:`TelemetryStore.append_many`:
  records that cannot be written are counted per kind in memory and folded into
  the dropped counts (reported in the next summary's ``"dropped"``) by the first
  write that succeeds once space returns. A disk too full to even open the file
  gives an in-memory store that moves to the file by itself when space returns.
  What happened is kept as notes for the agent to report
  (:meth:`TelemetryStore.take_notes`: ``telemetry_store_reset``, ``no_space``).

Thread safety: one connection guarded by a lock; safe for a writer thread (the
agent) and a reader thread (the reporter) at the same time.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlite_utils

from .protocol import TELEMETRY_KINDS

#: rows are evicted in this order when the store is over its size bound
EVICTION_ORDER: tuple[str, ...] = ("samples", "summary", "events")

#: singular spellings accepted on input and mapped to the protocol's kind names
KIND_ALIASES: Mapping[str, str] = {
    "summary": "summary",
    "summaries": "summary",
    "sample": "samples",
    "samples": "samples",
    "event": "events",
    "events": "events",
}

#: key used for each kind in the summary body's ``"dropped"`` field
DROPPED_KEYS: Mapping[str, str] = {"summary": "summaries", "samples": "samples", "events": "events"}

MIN_MAX_BYTES = 256 * 1024
_PAGE_SIZE = 4096
#: fraction of ``max_bytes`` the WAL may use between checkpoints
_WAL_FRACTION = 8
#: after an eviction the pages in use drop to this fraction of the budget
_LOW_WATER = 0.9
#: pages a write may touch beyond its rows (b-tree parents, freelist trunk, meta rows)
_TX_SLACK_PAGES = 8
#: estimated per-row bytes beyond the body (seq, ts, cell header)
_ROW_OVERHEAD = 24
#: seconds between attempts to move an in-memory store (disk full at open) to its file
_REOPEN_SECONDS = 5.0
#: SQLite messages that mean the disk (not the file) is the problem
_FULL_MESSAGES = (
    "database or disk is full",
    "disk i/o error",
    "unable to open database",
    "no space",
)


class TelemetryStoreError(Exception):
    """Root of telemetry store errors; nothing already stored is lost when one is raised."""


class StoreConfigError(TelemetryStoreError, ValueError):
    """The store was opened with a setting it cannot work with."""


class InvalidRecordError(TelemetryStoreError, ValueError):
    """A record was refused before anything of its batch was written."""


class UnknownKindError(InvalidRecordError):
    """The record's kind is not one of summary, samples (sample), events (event)."""


class RecordTooLargeError(InvalidRecordError):
    """One record's body is larger than the store allows for a single record."""


class StoreWriteError(TelemetryStoreError):
    """SQLite could not write (disk full, read-only file); the write was rolled back."""


class StoreClosedError(TelemetryStoreError):
    """The store was used after :meth:`TelemetryStore.close`."""


class StoreCorruptError(TelemetryStoreError):
    """The file is not a telemetry store SQLite can open (corrupt or a foreign file)."""


@dataclass(frozen=True, slots=True)
class Record:
    """One stored telemetry record. ``body_json`` is the body as stored (compact JSON)."""

    seq: int
    kind: str
    ts: float
    body_json: str

    @property
    def body(self) -> dict[str, Any]:
        """The body decoded from JSON."""
        value: dict[str, Any] = json.loads(self.body_json)
        return value

    def to_wire(self) -> dict[str, Any]:
        """The record as it appears in a telemetry batch payload."""
        return {"seq": self.seq, "kind": self.kind, "ts": self.ts, "body": self.body}


def canonical_kind(kind: str) -> str:
    """Map ``kind`` (or its singular alias) to the protocol's kind name."""
    try:
        return KIND_ALIASES[kind]
    except (KeyError, TypeError):
        raise UnknownKindError(
            f"telemetry kind {kind!r} is unknown; use one of {TELEMETRY_KINDS}"
        ) from None


class TelemetryStore:
    """Bounded SQLite buffer of telemetry records; see the module docstring.

    ``max_bytes`` bounds the database file plus its WAL. ``max_record_bytes``
    (default ``max_bytes // 32``) bounds a single record's JSON body.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        max_bytes: int = 64 * 1024 * 1024,
        max_record_bytes: int | None = None,
        *,
        resilient: bool = False,
    ) -> None:
        if max_bytes < MIN_MAX_BYTES:
            raise StoreConfigError(
                f"max_bytes={max_bytes} is too small; give at least {MIN_MAX_BYTES} bytes"
            )
        self.path = Path(path)
        self.max_bytes = int(max_bytes)
        wal_bytes = self.max_bytes // _WAL_FRACTION
        self._wal_bytes = wal_bytes
        #: payload bytes written per transaction, so one transaction fits the WAL's share
        self._chunk_bytes = max(16 * 1024, wal_bytes // 4)
        self.max_record_bytes = int(max_record_bytes or self._chunk_bytes)
        self._next_seq = 1
        self._lock = threading.RLock()  # re-entrant: a reset under the lock reopens
        self._closed = False
        self.resilient = resilient
        #: what happened to the store, for the agent to report (see take_notes)
        self._notes: list[dict[str, Any]] = []
        #: records a full disk kept out, per kind, not yet folded into the dropped counts
        self._unstored: dict[str, int] = {}
        self._full = False
        self.in_memory = False
        self._next_reopen = 0.0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._open(str(self.path), check=resilient)
        except sqlite3.DatabaseError as e:
            if not resilient:
                raise StoreCorruptError(
                    f"{self.path} is not a readable telemetry store ({e}); move it aside and "
                    "the agent will start a new one"
                ) from e
            if _is_full(e):
                self._open_in_memory(e)
            else:
                self._replace_corrupt(e)
        if not self.in_memory and self._file_bytes() > self.max_bytes:
            with self._lock:
                self._evict_to(self._budget_pages)
                self._conn.execute("VACUUM")
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def _open(self, target: str, *, check: bool) -> None:
        """Open ``target`` (a file or ``:memory:``) and create the schema."""
        conn = sqlite3.connect(target, check_same_thread=False, isolation_level=None, timeout=30.0)
        try:
            self._conn = conn
            self._db = sqlite_utils.Database(conn)
            conn.execute(f"PRAGMA page_size={_PAGE_SIZE}")
            if check:
                rows = conn.execute("PRAGMA quick_check(1)").fetchall()
                if rows != [("ok",)]:
                    raise sqlite3.DatabaseError(f"integrity check failed: {rows[0][0]!s:.200}")
            if target != ":memory:":
                self._db.enable_wal()
            wal_bytes = self._wal_bytes
            conn.execute("PRAGMA synchronous=NORMAL")
            # Debian's SQLite zeroes freed pages by default, which writes every page an
            # eviction frees into the WAL; FAST zeroes only what is written anyway
            conn.execute("PRAGMA secure_delete=FAST")
            conn.execute(f"PRAGMA journal_size_limit={wal_bytes}")
            #: an existing file keeps the page size it was created with
            self._page = int(conn.execute("PRAGMA page_size").fetchone()[0])
            conn.execute(f"PRAGMA wal_autocheckpoint={max(16, wal_bytes // 2 // self._page)}")
            #: pages the main database may hold before eviction starts
            self._budget_pages = (self.max_bytes - wal_bytes) // self._page - 2
            self._create_schema()
            self._next_seq = max(self._load_next_seq(), getattr(self, "_next_seq", 1))
        except BaseException:
            conn.close()
            raise

    def _replace_corrupt(self, error: BaseException) -> None:
        """Move a corrupt file (and its WAL) aside and start an empty store."""
        lost = self._file_bytes()
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        moved = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        for suffix in ("", "-wal", "-shm"):
            src = Path(f"{self.path}{suffix}")
            try:
                os.replace(src, f"{moved}{suffix}")
            except FileNotFoundError:
                pass
            except OSError:
                with contextlib.suppress(OSError):
                    src.unlink()
        self._notes.append(
            {
                "code": "telemetry_store_reset",
                "message": f"{self.path.name} failed its integrity check ({error}); it was moved "
                f"aside to {moved.name} and replaced by an empty store. Telemetry not "
                f"yet sent ({lost} bytes on disk) is lost; serving continues",
                "lost_bytes": lost,
                "moved_to": str(moved),
            }
        )
        # the old file's sequence numbers are unknown: continue above any it can have used
        # (microseconds since the epoch), so the server never drops new records as repeats
        self._next_seq = max(self._next_seq, time.time_ns() // 1000)
        try:
            self._open(str(self.path), check=False)
        except sqlite3.DatabaseError as e:
            self._open_in_memory(e)

    def _open_in_memory(self, error: BaseException) -> None:
        """The disk is too full to open the file: keep records in memory for now."""
        self._next_seq = max(self._next_seq, time.time_ns() // 1000)
        self._open(":memory:", check=False)
        self.in_memory = True
        self._next_reopen = time.monotonic() + _REOPEN_SECONDS
        self._note_no_space(error)

    def _note_no_space(self, error: BaseException) -> None:
        """One note per full-disk episode (it ends with the first write that succeeds)."""
        if self._full:
            return
        self._full = True
        if not any(n["code"] == "no_space" for n in self._notes):
            self._notes.append(
                {
                    "code": "no_space",
                    "message": f"the telemetry store cannot write to {self.path} ({error}); "
                    "records are counted in memory and reported as dropped when "
                    "space returns. Free disk space on the device",
                }
            )

    def _maybe_reopen_locked(self) -> None:
        """Move an in-memory store to its file once the disk has room again."""
        if not self.in_memory or time.monotonic() < self._next_reopen:
            return
        self._next_reopen = time.monotonic() + _REOPEN_SECONDS
        memory = self._conn
        rows = {
            k: memory.execute(f"SELECT seq, ts, body FROM {_table(k)}").fetchall()
            for k in TELEMETRY_KINDS
        }
        try:
            self._open(str(self.path), check=True)
        except sqlite3.DatabaseError as e:
            self._conn = memory
            self._db = sqlite_utils.Database(memory)
            if not _is_full(e):
                self._replace_corrupt(e)
            return
        self.in_memory = False
        memory.close()
        self._conn.execute("BEGIN IMMEDIATE")
        for k, items in rows.items():
            self._conn.executemany(
                f"INSERT OR IGNORE INTO {_table(k)}(seq, ts, body) VALUES (?, ?, ?)", items
            )
        self._meta_set("next_seq", self._next_seq)
        self._conn.execute("COMMIT")

    def take_notes(self) -> list[dict[str, Any]]:
        """What happened to the store since the last call (resets, a full disk), each
        ``{"code", "message", ...}``; the agent reports them to the server."""
        with self._lock:
            notes, self._notes = self._notes, []
        return notes

    @property
    def unstored(self) -> dict[str, int]:
        """Records a full disk kept out, per kind, not yet counted as dropped."""
        return dict(self._unstored)

    # ---------------------------------------------------------------- schema

    def _create_schema(self) -> None:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                for kind in TELEMETRY_KINDS:
                    self._db[_table(kind)].create(  # type: ignore[union-attr]
                        {"seq": int, "ts": float, "body": str}, pk="seq", if_not_exists=True
                    )
                self._db["meta"].create(  # type: ignore[union-attr]
                    {"key": str, "value": int}, pk="key", if_not_exists=True
                )
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    def _load_next_seq(self) -> int:
        stored = self._meta("next_seq")
        highest = 0
        for kind in TELEMETRY_KINDS:
            row = self._conn.execute(f"SELECT MAX(seq) FROM {_table(kind)}").fetchone()
            highest = max(highest, row[0] or 0)
        return max(stored or 1, highest + 1)

    def _meta(self, key: str) -> int | None:
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else int(row[0])

    def _meta_add(self, key: str, delta: int) -> None:
        self._conn.execute(
            "INSERT INTO meta(key, value) VALUES (?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = value + excluded.value",
            (key, delta),
        )

    def _meta_set(self, key: str, value: int) -> None:
        self._conn.execute(
            "INSERT INTO meta(key, value) VALUES (?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    # ---------------------------------------------------------------- writes

    def append(self, kind: str, body: Mapping[str, Any], ts: float) -> int:
        """Store one record; return its sequence number."""
        return self.append_many([(kind, body, ts)])[0]

    def append_many(self, records: Iterable[tuple[str, Mapping[str, Any], float]]) -> list[int]:
        """Store ``(kind, body, ts)`` records; return their sequence numbers.

        The whole batch is validated first: an unknown kind, a body that is not
        JSON, or a body over ``max_record_bytes`` raises
        :class:`InvalidRecordError` and nothing of the batch is written. Valid
        batches are written in as few transactions as the WAL's share of
        ``max_bytes`` allows (one for ordinary batches); a crash keeps a prefix.
        """
        rows: list[tuple[str, float, str]] = []
        for kind, body, ts in records:
            k = canonical_kind(kind)
            try:
                text = json.dumps(body, separators=(",", ":"), allow_nan=False)
            except (TypeError, ValueError) as e:
                raise InvalidRecordError(
                    f"{k} record body is not JSON-serialisable ({e}); convert numpy values "
                    "with .tolist()/float() and replace NaN/inf before storing"
                ) from e
            if len(text) > self.max_record_bytes:
                raise RecordTooLargeError(
                    f"{k} record body is {len(text)} bytes, over the {self.max_record_bytes}-byte "
                    "limit per record; store fewer fields or raise max_record_bytes"
                )
            try:
                ts_f = float(ts)
            except (TypeError, ValueError) as e:
                raise InvalidRecordError(f"timestamp {ts!r} is not a number") from e
            if not math.isfinite(ts_f):
                raise InvalidRecordError(f"timestamp {ts!r} is not finite")
            rows.append((k, ts_f, text))
        if not rows:
            return []
        with self._lock:
            self._check_open()
            self._maybe_reopen_locked()
            first = self._next_seq
            start = 0
            while start < len(rows):
                end, size = start, 0
                while end < len(rows) and (end == start or size < self._chunk_bytes):
                    size += len(rows[end][2]) + _ROW_OVERHEAD
                    end += 1
                try:
                    need = int(size * 1.25) // self._page + 1
                    if self._used_pages() + need > self._budget_pages:
                        self._evict_to(self._budget_pages - need)
                    self._make_wal_room(size)
                    self._write(lambda s=start, e=end: self._insert_locked(rows, first, s, e))
                    if self._used_pages() > self._budget_pages:
                        self._evict_to(self._budget_pages)
                except StoreWriteError as err:
                    if not (self.resilient and _is_full(err.__cause__)):
                        raise
                    self._note_no_space(err)
                    for k, _, _ in rows[start:end]:
                        self._unstored[k] = self._unstored.get(k, 0) + 1
                self._next_seq = first + end
                start = end
            with contextlib.suppress(sqlite3.OperationalError):
                self._checkpoint_if_large()
        return list(range(first, first + len(rows)))

    def _insert_locked(
        self, rows: list[tuple[str, float, str]], first: int, start: int, end: int
    ) -> None:
        by_kind: dict[str, list[tuple[int, float, str]]] = {}
        for i in range(start, end):
            k, ts_f, text = rows[i]
            by_kind.setdefault(k, []).append((first + i, ts_f, text))
        for k, items in by_kind.items():
            self._conn.executemany(
                f"INSERT INTO {_table(k)}(seq, ts, body) VALUES (?, ?, ?)", items
            )
        self._meta_set("next_seq", first + end)
        for kind, n in self._unstored.items():  # space is back: count what it kept out
            self._meta_add(f"dropped_{kind}", n)
            self._meta_add(f"unreported_dropped_{kind}", n)
        self._unstored = {}
        self._full = False

    def ack(self, seqs: Iterable[int]) -> int:
        """Delete acknowledged records; unknown or already deleted seqs are ignored.

        Returns how many rows were deleted.
        """
        keys = sorted({int(s) for s in seqs})
        if not keys:
            return 0
        deleted = 0
        with self._lock:

            def delete() -> None:
                nonlocal deleted
                for i in range(0, len(keys), 500):
                    chunk = keys[i : i + 500]
                    marks = ",".join("?" * len(chunk))
                    for kind in TELEMETRY_KINDS:
                        cur = self._conn.execute(
                            f"DELETE FROM {_table(kind)} WHERE seq IN ({marks})", chunk
                        )
                        deleted += cur.rowcount

            self._write(delete)
        return deleted

    def take_dropped(self) -> dict[str, int]:
        """Evicted-row counts since the last call, keyed as the summary's ``"dropped"`` field.

        ``{"samples": n, "summaries": n, "events": n}``; the counts reset to zero.
        """
        with self._lock:
            out: dict[str, int] = {}

            def take() -> None:
                for kind in TELEMETRY_KINDS:
                    out[DROPPED_KEYS[kind]] = self._meta(f"unreported_dropped_{kind}") or 0
                    self._meta_set(f"unreported_dropped_{kind}", 0)

            self._write(take)
        return out

    # ---------------------------------------------------------------- reads

    def pending(
        self, limit: int = 200, kinds: Sequence[str] | None = None, after: int = 0
    ) -> list[Record]:
        """Up to ``limit`` stored records with ``seq > after``, oldest first."""
        wanted = TELEMETRY_KINDS if kinds is None else tuple(canonical_kind(k) for k in kinds)
        out: list[Record] = []
        with self._lock:
            self._check_open()
            try:
                for kind in dict.fromkeys(wanted):
                    cur = self._conn.execute(
                        f"SELECT seq, ts, body FROM {_table(kind)} WHERE seq > ? "
                        "ORDER BY seq LIMIT ?",
                        (after, limit),
                    )
                    out.extend(Record(seq, kind, ts, body) for seq, ts, body in cur)
            except sqlite3.DatabaseError as e:
                self._recover_read_locked(e)
                return []
        out.sort(key=lambda r: r.seq)
        return out[:limit]

    def stats(self) -> dict[str, Any]:
        """Rows per kind, bytes in use, file bytes, and total dropped per kind."""
        with self._lock:
            self._check_open()
            rows = {
                kind: self._conn.execute(f"SELECT COUNT(*) FROM {_table(kind)}").fetchone()[0]
                for kind in TELEMETRY_KINDS
            }
            dropped = {kind: self._meta(f"dropped_{kind}") or 0 for kind in TELEMETRY_KINDS}
            used = self._used_pages() * self._page
        return {
            "rows": rows,
            "bytes": used,
            "file_bytes": self._file_bytes(),
            "max_bytes": self.max_bytes,
            "dropped": dropped,
            "next_seq": self._next_seq,
        }

    @property
    def next_seq(self) -> int:
        """The sequence number the next appended record will get."""
        return self._next_seq

    def close(self) -> None:
        """Checkpoint the WAL and close the connection."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            with contextlib.suppress(sqlite3.DatabaseError):
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._conn.close()

    def __enter__(self) -> TelemetryStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- internals

    def _write(self, fn: Any) -> None:
        """Run ``fn`` in one write transaction (caller holds the lock)."""
        self._check_open()
        try:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                fn()
                self._conn.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise
        except sqlite3.OperationalError as e:
            raise StoreWriteError(
                f"could not write to {self.path} ({e}); nothing of this write was kept. "
                "Free disk space or check the file's permissions"
            ) from e
        except sqlite3.DatabaseError as e:
            if not self.resilient:
                raise StoreCorruptError(f"{self.path} is corrupt ({e}); move it aside") from e
            self._conn.close()
            self._replace_corrupt(e)
            self._write(fn)

    def _recover_read_locked(self, e: sqlite3.DatabaseError) -> None:
        """A read found the file corrupt: replace it (resilient) or say so."""
        if not self.resilient or isinstance(e, sqlite3.OperationalError):
            raise StoreCorruptError(f"{self.path} cannot be read ({e}); move it aside") from e
        self._conn.close()
        self._replace_corrupt(e)

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError(f"telemetry store {self.path} is closed; open a new one")

    def _used_pages(self) -> int:
        page_count = self._conn.execute("PRAGMA page_count").fetchone()[0]
        free = self._conn.execute("PRAGMA freelist_count").fetchone()[0]
        return int(page_count - free)

    def _file_bytes(self) -> int:
        total = 0
        for suffix in ("", "-wal"):
            with contextlib.suppress(OSError):
                total += os.path.getsize(f"{self.path}{suffix}")
        return total

    def _make_wal_room(self, payload_bytes: int) -> None:
        """Checkpoint before a write whose frames could carry the WAL past its share.

        A batch larger than one transaction is written as several; without this the
        WAL grows by every one of them before the checkpoint at the end of the batch,
        and the file plus its WAL outgrow ``max_bytes``.
        """
        if self.in_memory:
            return
        try:
            wal = os.path.getsize(f"{self.path}-wal")
        except OSError:
            return
        # rows at 1.25x their payload, plus the pages an eviction and the meta rows touch
        expected = int(payload_bytes * 1.25) + _TX_SLACK_PAGES * self._page
        if wal + expected > self._wal_bytes:
            with contextlib.suppress(sqlite3.OperationalError):
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def _checkpoint_if_large(self) -> None:
        """Fold the WAL back into the database and truncate it once it passes half its share."""
        try:
            wal = os.path.getsize(f"{self.path}-wal")
        except OSError:
            return
        if wal > self._wal_bytes // 2:
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def _evict_to(self, limit_pages: int) -> None:
        """Delete oldest rows in EVICTION_ORDER until the pages in use are under the low water.

        Deleting rows rewrites every page it empties, so the eviction runs as a series
        of small transactions with a checkpoint before each whenever the WAL needs the
        room: the file plus its WAL stay within ``max_bytes`` while it runs. Each
        transaction counts what it deleted in the dropped counters with the delete.
        """
        target = int(limit_pages * _LOW_WATER)
        step_pages = max(4, self._wal_bytes // self._page // 4)
        while self._used_pages() > target:
            self._make_wal_room(step_pages * self._page)
            deleted: list[int] = []
            self._write(lambda out=deleted: out.append(self._evict_step_locked(target, step_pages)))
            if not deleted or deleted[0] <= 0:
                return

    def _evict_step_locked(self, target: int, step_pages: int) -> int:
        """Delete up to ``step_pages`` pages' worth of the oldest rows; return the row count."""
        used = self._used_pages()
        n_rows = sum(
            self._conn.execute(f"SELECT COUNT(*) FROM {_table(k)}").fetchone()[0]
            for k in TELEMETRY_KINDS
        )
        if n_rows == 0 or used <= target:
            return 0
        rows_per_page = n_rows / max(1, used)
        chunk = max(1, math.ceil(min(used - target, step_pages) * rows_per_page))
        for kind in EVICTION_ORDER:
            table = _table(kind)
            cur = self._conn.execute(
                f"DELETE FROM {table} WHERE seq IN (SELECT seq FROM {table} ORDER BY seq LIMIT ?)",
                (chunk,),
            )
            if cur.rowcount > 0:
                self._meta_add(f"dropped_{kind}", cur.rowcount)
                self._meta_add(f"unreported_dropped_{kind}", cur.rowcount)
                return int(cur.rowcount)
        return 0


def _is_full(e: BaseException | None) -> bool:
    """True when ``e`` says the disk is full (or too full to open a file)."""
    if isinstance(e, OSError) and e.errno in (28, 122):  # ENOSPC, EDQUOT
        return True
    return isinstance(e, sqlite3.OperationalError) and any(
        m in str(e).lower() for m in _FULL_MESSAGES
    )


def _table(kind: str) -> str:
    return f"telemetry_{kind}"
