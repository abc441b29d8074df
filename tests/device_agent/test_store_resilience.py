"""A resilient telemetry store (what the agent runs): corrupt files are replaced, a full
disk is counted in memory and recovered from by itself. Real SQLite files, a real tmpfs."""

from __future__ import annotations

from pathlib import Path

import pytest

from device_agent import store as store_module
from device_agent.store import TelemetryStore
from tests.tmpfs import fill, tmpfs, unfill

MiB = 1024 * 1024


def _body(i: int) -> dict[str, object]:
    return {"i": i, "pad": "x" * 200}


def _corrupt_files(tmp_path: Path) -> list[Path]:
    return sorted(tmp_path.glob("t.db.corrupt-*"))


def test_garbage_telemetry_db_is_moved_aside_and_replaced(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    path.write_bytes(b"not a database" * 1000)
    with TelemetryStore(path, max_bytes=4 * MiB, resilient=True) as s:
        seq = s.append("event", {"type": "after"}, 1.0)
        assert [r.seq for r in s.pending()] == [seq]
        notes = s.take_notes()
    assert [n["code"] for n in notes] == ["telemetry_store_reset"]
    assert notes[0]["lost_bytes"] == 14000
    moved = _corrupt_files(tmp_path)
    assert len(moved) == 1 and moved[0].read_bytes() == b"not a database" * 1000
    assert seq > 10**15, "sequence numbers continue above any the lost file can have used"


def test_truncated_telemetry_db_is_moved_aside_and_replaced(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    with TelemetryStore(path, max_bytes=8 * MiB) as s:
        s.append_many([("sample", _body(i), 0.0) for i in range(5000)])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with TelemetryStore(path, max_bytes=8 * MiB, resilient=True) as s:
        assert s.pending() == []
        s.append("event", {"type": "ok"}, 0.0)
        assert [n["code"] for n in s.take_notes()] == ["telemetry_store_reset"]
    assert len(_corrupt_files(tmp_path)) == 1


def test_store_corrupted_while_in_use_is_replaced_on_next_read(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    with TelemetryStore(path, max_bytes=16 * MiB) as s:
        s.append_many([("sample", _body(i), 0.0) for i in range(20000)])
    s = TelemetryStore(path, max_bytes=16 * MiB, resilient=True)
    try:
        size = path.stat().st_size
        with open(path, "r+b") as f:  # another writer scribbles over the file's pages
            f.seek(8192)
            f.write(b"\xff" * (size - 8192))
        s._conn.execute("PRAGMA cache_size=0")
        assert s.pending(limit=100_000) == []
        assert [n["code"] for n in s.take_notes()] == ["telemetry_store_reset"]
        seq = s.append("event", {"type": "ok"}, 0.0)
        assert [r.seq for r in s.pending()] == [seq]
    finally:
        s.close()


def test_non_resilient_store_still_leaves_a_foreign_file_alone(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    path.write_bytes(b"foreign" * 100)
    with pytest.raises(store_module.StoreCorruptError):
        TelemetryStore(path, max_bytes=MiB)
    assert path.read_bytes() == b"foreign" * 100


def test_full_disk_counts_records_in_memory_and_reports_them_when_space_returns(
    tmp_path: Path,
) -> None:
    with tmpfs(tmp_path / "disk", "24m") as mnt:
        s = TelemetryStore(mnt / "t.db", max_bytes=64 * MiB, resilient=True)
        try:
            kept = s.append_many([("sample", _body(i), 0.0) for i in range(100)])
            fill(mnt)
            lost = s.append_many([("sample", _body(i), 0.0) for i in range(3000)])
            assert lost[0] == kept[-1] + 1, "sequence numbers still advance"
            assert s.unstored["samples"] == 3000, "nothing raised: counted in memory"
            assert [n["code"] for n in s.take_notes()] == ["no_space"]
            unfill(mnt)
            after = s.append("event", {"type": "space back"}, 0.0)
            assert after == lost[-1] + 1
            assert s.unstored == {}
            assert s.take_dropped()["samples"] == 3000, "reported as dropped once space is back"
            assert [r.seq for r in s.pending(limit=10_000)] == [*kept, after]
        finally:
            s.close()


def test_disk_too_full_to_open_gives_an_in_memory_store_that_moves_to_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "_REOPEN_SECONDS", 0.0)
    with tmpfs(tmp_path / "disk", "24m") as mnt:
        fill(mnt)
        s = TelemetryStore(mnt / "t.db", max_bytes=8 * MiB, resilient=True)
        try:
            assert s.in_memory
            first = s.append("event", {"type": "while full"}, 0.0)
            assert [n["code"] for n in s.take_notes()] == ["no_space"]
            unfill(mnt)
            second = s.append("event", {"type": "space back"}, 0.0)
            assert not s.in_memory
            assert [r.seq for r in s.pending()] == [first, second]
        finally:
            s.close()
        with TelemetryStore(mnt / "t.db", max_bytes=8 * MiB) as again:
            assert [r.seq for r in again.pending()] == [first, second]
