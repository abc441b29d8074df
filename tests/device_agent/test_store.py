"""TelemetryStore against real SQLite files: seq numbers, eviction order, bounds, crashes."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from device_agent.store import (
    EVICTION_ORDER,
    InvalidRecordError,
    RecordTooLargeError,
    StoreClosedError,
    StoreConfigError,
    StoreCorruptError,
    StoreWriteError,
    TelemetryStore,
    UnknownKindError,
)

REPO = Path(__file__).resolve().parents[2]
MiB = 1024 * 1024


def sample_body(i: int) -> dict[str, object]:
    """A realistic sampled inference log record (16 input features, 4 class scores)."""
    return {
        "name": "mlp",
        "version": 3,
        "predicted": i % 4,
        "inputs": {
            "x": [round((i * 7 + j) % 97 / 97.0, 6) for j in range(16)],
            "user": "sha256:" + "ab" * 32,
        },
        "outputs": {"probabilities": [0.1, 0.2, 0.3, 0.4]},
    }


def summary_body(w: int) -> dict[str, object]:
    return {
        "window_start": 1000.0 + 60 * w,
        "window_end": 1060.0 + 60 * w,
        "name": "mlp",
        "version": 3,
        "slot": "a",
        "rollout_id": None,
        "count": 1000,
        "errors": 1,
        "latency_ms": {"p50": 0.01, "p95": 0.02, "p99": 0.05, "mean": 0.012},
        "latency_hist": [0] * 19,
        "drift": {
            "features": [
                {"name": f"f{j}", "psi": 0.01, "ks": 0.02, "counts": [100] * 10} for j in range(16)
            ],
            "psi_max": 0.01,
            "ks_max": 0.02,
            "prediction": {"counts": [250] * 4, "psi": 0.0},
        },
        "shadow": None,
        "dropped": {"samples": 0, "summaries": 0},
    }


@pytest.fixture
def store(tmp_path: Path):
    s = TelemetryStore(tmp_path / "telemetry.db", max_bytes=MiB)
    yield s
    s.close()


def test_seq_strictly_increasing_across_kinds(store: TelemetryStore) -> None:
    seqs = store.append_many([("summary", {"w": 1}, 1.0), ("sample", {"i": 1}, 2.0)])
    seqs += [store.append("event", {"type": "install"}, 3.0)]
    seqs += store.append_many([("samples", {"i": 2}, 4.0), ("events", {"e": 2}, 5.0)])
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert [r.seq for r in store.pending()] == seqs
    assert [r.kind for r in store.pending()] == [
        "summary",
        "samples",
        "events",
        "samples",
        "events",
    ]


def test_seq_never_reused_after_ack_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    with TelemetryStore(path, max_bytes=MiB) as s:
        first = s.append_many([("sample", {"i": i}, float(i)) for i in range(10)])
        assert s.ack(first) == 10
        assert s.pending() == []
        after_ack = s.append("summary", {"w": 1}, 1.0)
        assert after_ack > max(first)
        s.ack([after_ack])
    with TelemetryStore(path, max_bytes=MiB) as s:
        assert s.append("event", {"e": 1}, 2.0) == after_ack + 1


def test_pending_is_oldest_first_and_honours_kinds_and_after(store: TelemetryStore) -> None:
    seqs = store.append_many(
        [("sample" if i % 3 else "summary", {"i": i}, float(i)) for i in range(30)]
    )
    assert [r.seq for r in store.pending(limit=5)] == seqs[:5]
    summaries = store.pending(limit=100, kinds=["summary"])
    assert [r.body["i"] for r in summaries] == list(range(0, 30, 3))
    assert [r.seq for r in store.pending(limit=100, after=seqs[19])] == seqs[20:]
    assert store.pending(limit=3, kinds=["sample"], after=seqs[-1]) == []


def test_ack_deletes_only_the_given_rows_and_ignores_unknown(store: TelemetryStore) -> None:
    seqs = store.append_many([("sample", {"i": i}, float(i)) for i in range(6)])
    assert store.ack([seqs[1], seqs[3], 999_999]) == 2
    assert store.ack([seqs[1]]) == 0
    assert [r.seq for r in store.pending()] == [seqs[0], seqs[2], seqs[4], seqs[5]]


def test_eviction_drops_samples_before_summaries(tmp_path: Path) -> None:
    with TelemetryStore(tmp_path / "t.db", max_bytes=MiB) as s:
        summaries = s.append_many([("summary", summary_body(w), float(w)) for w in range(20)])
        samples: list[int] = []
        for i in range(0, 20_000, 500):
            samples += s.append_many([("sample", sample_body(i + j), 0.0) for j in range(500)])
        stats = s.stats()
        assert stats["dropped"]["samples"] > 0
        assert stats["dropped"]["summary"] == 0
        assert [r.seq for r in s.pending(limit=100, kinds=["summary"])] == summaries
        kept = [r.seq for r in s.pending(limit=100_000, kinds=["samples"])]
        assert kept == samples[-len(kept) :], "the oldest samples go first"
        assert stats["rows"]["samples"] + stats["dropped"]["samples"] == len(samples)


def test_eviction_drops_summaries_before_events_once_samples_are_gone(tmp_path: Path) -> None:
    assert EVICTION_ORDER == ("samples", "summary", "events")
    with TelemetryStore(tmp_path / "t.db", max_bytes=MiB) as s:
        events = s.append_many([("event", {"type": "install", "n": i}, 0.0) for i in range(10)])
        s.append_many([("sample", sample_body(i), 0.0) for i in range(100)])
        for w in range(0, 600, 50):
            s.append_many([("summary", summary_body(w + j), 0.0) for j in range(50)])
        stats = s.stats()
        assert stats["dropped"]["samples"] == 100
        assert stats["dropped"]["summary"] > 0
        assert stats["dropped"]["events"] == 0
        assert [r.seq for r in s.pending(limit=100, kinds=["event"])] == events


def test_dropped_counts_by_kind_reset_on_take_and_survive_reopen(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    with TelemetryStore(path, max_bytes=MiB) as s:
        assert s.take_dropped() == {"summaries": 0, "samples": 0, "events": 0}
        for i in range(0, 12_000, 1000):
            s.append_many([("sample", sample_body(i + j), 0.0) for j in range(1000)])
        total = s.stats()["dropped"]["samples"]
        assert total > 0
    with TelemetryStore(path, max_bytes=MiB) as s:
        taken = s.take_dropped()
        assert taken == {"summaries": 0, "samples": total, "events": 0}
        assert s.take_dropped() == {"summaries": 0, "samples": 0, "events": 0}
        assert s.stats()["dropped"]["samples"] == total, "lifetime totals are kept"


def test_file_and_wal_stay_within_max_bytes_under_sustained_writes(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    largest = 0
    with TelemetryStore(path, max_bytes=MiB) as s:
        for i in range(0, 30_000, 250):
            s.append_many([("sample", sample_body(i + j), 0.0) for j in range(250)])
            if i % 2000 == 0:
                s.append("summary", summary_body(i), 0.0)
            on_disk = sum(os.path.getsize(p) for p in (path, Path(f"{path}-wal")) if p.exists())
            largest = max(largest, on_disk)
        assert s.stats()["dropped"]["samples"] > 20_000
    assert largest <= MiB


def test_file_and_wal_stay_within_max_bytes_while_batches_larger_than_a_transaction_land(
    tmp_path: Path,
) -> None:
    """A batch bigger than one transaction is written as several, and each eviction
    rewrites the pages it empties: the bound holds during the writes, not only after."""
    path = tmp_path / "t.db"
    largest = 0
    done = threading.Event()

    def watch() -> None:
        nonlocal largest
        while not done.is_set():
            on_disk = 0
            for p in (path, Path(f"{path}-wal")):
                with contextlib.suppress(OSError):
                    on_disk += os.path.getsize(p)
            largest = max(largest, on_disk)

    with TelemetryStore(path, max_bytes=MiB) as s:
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            for n in (1_000, 5_000, 20_000, 3_000) * 2:
                s.append_many([("sample", sample_body(j), 0.0) for j in range(n)])
        finally:
            done.set()
            watcher.join()
        assert s.stats()["dropped"]["samples"] > 20_000
    assert largest <= MiB, f"the file and its WAL reached {largest} bytes; the bound is {MiB}"


def test_oversized_store_shrinks_when_reopened_with_a_smaller_bound(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    with TelemetryStore(path, max_bytes=8 * MiB) as s:
        s.append_many([("sample", sample_body(i), 0.0) for i in range(12_000)])
        s.append("summary", summary_body(0), 0.0)
    assert path.stat().st_size > MiB
    with TelemetryStore(path, max_bytes=MiB) as s:
        assert s.stats()["file_bytes"] <= MiB
        assert s.stats()["rows"]["summary"] == 1
        assert s.take_dropped()["samples"] > 0


def test_unknown_kind_is_refused_and_nothing_of_the_batch_is_written(
    store: TelemetryStore,
) -> None:
    with pytest.raises(UnknownKindError, match="use one of"):
        store.append_many([("sample", {"i": 1}, 0.0), ("metrics", {"i": 2}, 0.0)])
    assert store.pending() == []
    assert store.append("sample", {"i": 3}, 0.0) == 1, "a refused batch uses no seq numbers"


def test_body_that_is_not_json_is_refused(store: TelemetryStore) -> None:
    with pytest.raises(InvalidRecordError, match="JSON"):
        store.append("sample", {"x": object()}, 0.0)
    with pytest.raises(InvalidRecordError, match="NaN"):
        store.append("sample", {"x": float("nan")}, 0.0)
    with pytest.raises(InvalidRecordError, match="timestamp"):
        store.append("sample", {"x": 1}, float("inf"))
    assert store.pending() == []


def test_record_larger_than_the_per_record_limit_is_refused(tmp_path: Path) -> None:
    with TelemetryStore(tmp_path / "t.db", max_bytes=MiB, max_record_bytes=1000) as s:
        with pytest.raises(RecordTooLargeError, match="1000-byte"):
            s.append("sample", {"blob": "x" * 2000}, 0.0)
        assert s.pending() == []


def test_max_bytes_below_minimum_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StoreConfigError, match="at least"):
        TelemetryStore(tmp_path / "t.db", max_bytes=10_000)


def test_foreign_file_raises_store_corrupt_error_and_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreCorruptError, match="move it aside"):
        TelemetryStore(path, max_bytes=MiB)
    assert path.read_bytes() == b"this is not a database" * 100


def test_disk_full_raises_store_write_error_and_keeps_what_was_committed(
    tmp_path: Path,
) -> None:
    with TelemetryStore(tmp_path / "t.db", max_bytes=8 * MiB) as s:
        kept = s.append_many([("sample", sample_body(i), 0.0) for i in range(50)])
        # SQLite's own page cap produces the real SQLITE_FULL a full disk would
        pages = s._conn.execute("PRAGMA page_count").fetchone()[0]
        s._conn.execute(f"PRAGMA max_page_count={pages + 2}")
        with pytest.raises(StoreWriteError, match="Free disk space"):
            s.append_many([("sample", sample_body(i), 0.0) for i in range(2000)])
        assert [r.seq for r in s.pending(limit=10_000)] == kept
        s._conn.execute("PRAGMA max_page_count=1073741823")
        assert s.append("event", {"type": "disk_ok"}, 0.0) == kept[-1] + 1


def test_store_used_after_close_raises_store_closed_error(tmp_path: Path) -> None:
    s = TelemetryStore(tmp_path / "t.db", max_bytes=MiB)
    s.close()
    s.close()  # closing twice is harmless
    with pytest.raises(StoreClosedError, match="closed"):
        s.append("sample", {"i": 1}, 0.0)
    with pytest.raises(StoreClosedError):
        s.pending()


def test_writer_and_reader_threads_share_the_store(tmp_path: Path) -> None:
    s = TelemetryStore(tmp_path / "t.db", max_bytes=16 * MiB)
    written: list[int] = []
    acked: list[int] = []
    done = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            for i in range(0, 5000, 50):
                written.extend(s.append_many([("sample", {"i": i + j}, 0.0) for j in range(50)]))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)
        finally:
            done.set()

    def reader() -> None:
        try:
            while True:
                finished = done.is_set()
                batch = s.pending(limit=100)
                if batch:
                    s.ack([r.seq for r in batch])
                    acked.extend(r.seq for r in batch)
                elif finished:
                    return
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer), threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    s.close()
    assert not errors
    assert sorted(acked) == written == list(range(1, 5001))


KILL_SCRIPT = """
import sys, time
from device_agent.store import TelemetryStore
s = TelemetryStore(sys.argv[1], max_bytes=64 * 1024 * 1024)
i = 0
while True:
    seqs = s.append_many([("sample", {"i": i + j, "pad": "x" * 200}, time.time())
                          for j in range(20)])
    print(seqs[-1], flush=True)
    i += 20
"""


def test_seq_continues_after_sigkill_mid_writes(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    script = tmp_path / "writer.py"
    script.write_text(KILL_SCRIPT)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(path)],
        stdout=subprocess.PIPE,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    committed: list[int] = []
    try:
        assert proc.stdout is not None
        while len(committed) < 200:
            line = proc.stdout.readline()
            assert line, "writer exited early"
            committed.append(int(line))
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
    with TelemetryStore(path, max_bytes=64 * MiB) as s:
        stored = [r.seq for r in s.pending(limit=1_000_000)]
        assert stored == list(range(1, len(stored) + 1)), "no torn or missing rows"
        assert stored[-1] >= committed[-1], "every committed batch survived the kill"
        assert s.append("event", {"type": "restart"}, time.time()) == stored[-1] + 1


ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("append"),
            st.lists(st.sampled_from(["summary", "sample", "event"]), min_size=1, max_size=5),
        ),
        st.tuples(st.just("ack"), st.lists(st.integers(0, 40), max_size=6)),
        st.tuples(st.just("reopen"), st.just([])),
    ),
    max_size=25,
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=ops)
def test_store_matches_a_model_under_random_appends_acks_and_reopens(
    tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[str, list]]
) -> None:
    path = tmp_path_factory.mktemp("prop") / "t.db"
    s = TelemetryStore(path, max_bytes=MiB)
    model: dict[int, str] = {}
    issued: list[int] = []
    try:
        for op, arg in ops:
            if op == "append":
                seqs = s.append_many([(k, {"k": k}, 0.0) for k in arg])
                chain = issued[-1:] + seqs
                assert all(b > a for a, b in zip(chain, chain[1:], strict=False))
                issued += seqs
                model.update(zip(seqs, arg, strict=True))
            elif op == "ack":
                s.ack(arg)
                for q in arg:
                    model.pop(q, None)
            else:
                s.close()
                s = TelemetryStore(path, max_bytes=MiB)
            got = {r.seq: r.body["k"] for r in s.pending(limit=10_000)}
            assert got == model
        assert len(set(issued)) == len(issued)
    finally:
        s.close()
