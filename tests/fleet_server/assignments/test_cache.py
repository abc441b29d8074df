"""The check-in caches against a real database (SQLite and PostgreSQL): two replicas'
assignment caches agree after a poll, the credential cache is bounded and never serves a
revoked device from the database, and buffered last-seen times are written by flush."""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import select

from fleet_server.assignments.cache import AssignmentCache, DeviceAuthCache, LastSeenBuffer
from fleet_server.db.models import Device
from fleet_server.db.types import utcnow
from tests.server_fixtures import Fleet


def _assign(fleet: Fleet, device_id: str, bundle_id: str | None) -> str:
    ctx = fleet.ctx
    with ctx.session() as s:
        change = ctx.assignments.assign(s, device_id, desired_bundle_id=bundle_id)
        s.commit()
    assert change is not None
    return str(change.assignment_id)


def test_a_second_replica_sees_an_assignment_change_after_one_poll(fleet: Fleet) -> None:
    fleet.enroll("dev-1")
    b = fleet.upload_bundle(version=2)
    ctx = fleet.ctx
    other = AssignmentCache(ctx.engine, ctx.telemetry_policy, overlap_seconds=60)
    before = other.load("dev-1")
    assert before.doc["desired"] is None
    etag = _assign(fleet, "dev-1", b["id"])
    assert other.get("dev-1") == before  # not yet polled: still the old entry
    assert other.poll() == 1
    now = other.get("dev-1")
    assert now is not None and now.etag == etag and now.doc["desired"]["bundle_id"] == b["id"]
    assert other.poll() == 0  # nothing changed since


def test_an_unassigned_device_gets_the_empty_assignment_with_a_stable_etag(fleet: Fleet) -> None:
    ctx = fleet.ctx
    a = AssignmentCache(ctx.engine, ctx.telemetry_policy).load("nobody")
    b = AssignmentCache(ctx.engine, ctx.telemetry_policy).load("nobody")
    assert a.doc["desired"] is None and a.etag == b.etag == a.doc["assignment_id"]


def test_credential_cache_is_bounded_and_ignores_revoked_devices(fleet: Fleet) -> None:
    for i in range(3):
        fleet.enroll(f"dev-{i}")
    ctx = fleet.ctx
    with ctx.session() as s:
        hashes = dict(s.execute(select(Device.id, Device.credential_hash)).all())
    cache = DeviceAuthCache(ctx.engine, max_size=2)
    for i in range(3):
        assert cache.load(hashes[f"dev-{i}"]) == f"dev-{i}"
    assert cache.get(hashes["dev-0"]) is None  # least recently used, evicted
    assert cache.get(hashes["dev-2"]) == "dev-2"
    cache.evict_device("dev-2")
    assert cache.get(hashes["dev-2"]) is None
    with ctx.session() as s:
        d = s.get(Device, "dev-1")
        assert d is not None
        d.revoked_at = utcnow()
        s.commit()
    fresh = DeviceAuthCache(ctx.engine, max_size=2)
    assert fresh.load(hashes["dev-1"]) is None  # the database never answers for it


def test_last_seen_times_are_written_by_flush(fleet: Fleet) -> None:
    fleet.enroll("dev-1")
    ctx = fleet.ctx
    buf = LastSeenBuffer(ctx.engine)
    when = datetime(2026, 12, 1, 12, 0, 0, tzinfo=timezone.utc)
    buf.touch("dev-1", when)
    with ctx.session() as s:
        d = s.get(Device, "dev-1")
        assert d is not None and d.last_seen_at != when
    assert buf.flush() >= 1
    with ctx.session() as s:
        d = s.get(Device, "dev-1")
        assert d is not None and d.last_seen_at == when
    assert buf.flush() == 0
