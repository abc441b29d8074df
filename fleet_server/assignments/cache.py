"""In-memory caches that keep the check-in hot path off the ORM.

* :class:`DeviceAuthCache` maps a credential hash to a device id (bounded LRU);
  a miss costs one indexed query. Revoking a device evicts its entries.
* :class:`AssignmentCache` maps a device id and model to its assignment ETag and body.
  Entries are replaced in-process the moment an assignment changes here, and a
  background poll picks up changes other replicas made (rows whose
  ``updated_at`` is newer than the last poll minus an overlap window).
* :class:`LastSeenBuffer` collects check-in times and writes them in one
  batched UPDATE every few seconds instead of one write per check-in.

All three are safe to use from the event loop and from worker threads.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, bindparam, exists, select, update

from fleet_server.assignments.document import TelemetryPolicy, build_assignment, canonical
from fleet_server.db.models import Assignment, Device, DeviceCertificate
from fleet_server.db.types import utcnow


class DeviceAuthCache:
    """Credential hash -> device id, bounded, least recently used evicted first."""

    def __init__(self, engine: Engine, max_size: int) -> None:
        self._engine = engine
        self._max = max_size
        self._entries: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()
        # a device with a certificate authenticates by it: its bearer token is refused
        self._stmt = select(Device.id).where(
            Device.credential_hash == bindparam("h"),
            Device.revoked_at.is_(None),
            ~exists().where(DeviceCertificate.device_id == Device.id),
        )

    def get(self, credential_hash: str) -> str | None:
        """The cached device id, or None on a miss (no database access)."""
        with self._lock:
            device_id = self._entries.get(credential_hash)
            if device_id is not None:
                self._entries.move_to_end(credential_hash)
            return device_id

    def load(self, credential_hash: str) -> str | None:
        """Look the hash up in the database (blocking) and cache a hit."""
        with self._engine.connect() as conn:
            device_id = conn.execute(self._stmt, {"h": credential_hash}).scalar()
        if device_id is not None and self._max > 0:
            with self._lock:
                self._entries[credential_hash] = device_id
                while len(self._entries) > self._max:
                    self._entries.popitem(last=False)
        return device_id

    def evict_device(self, device_id: str) -> None:
        with self._lock:
            for h in [h for h, d in self._entries.items() if d == device_id]:
                del self._entries[h]


@dataclass(frozen=True)
class CachedAssignment:
    etag: str
    body: bytes
    doc: dict[str, Any]


def _key(device_id: str, model: str | None) -> str:
    return device_id if model is None else f"{device_id}\x00{model}"


class AssignmentCache:
    """(device id, model) -> current assignment (ETag, encoded body).

    ``model=None`` is the device's default entry: its most recently changed model's
    assignment (what an agent running one model, which names none, is given).
    """

    def __init__(self, engine: Engine, telemetry: TelemetryPolicy, overlap_seconds: float = 10.0):
        self._engine = engine
        self._telemetry = telemetry
        self._entries: dict[str, CachedAssignment] = {}
        self._lock = threading.Lock()
        self._overlap = timedelta(seconds=overlap_seconds)
        self._polled_at: datetime = utcnow()
        self._stmt_default = (
            select(Assignment.etag, Assignment.body)
            .where(Assignment.device_id == bindparam("d"))
            .order_by(Assignment.updated_at.desc())
            .limit(1)
        )
        self._stmt_model = select(Assignment.etag, Assignment.body).where(
            Assignment.device_id == bindparam("d"), Assignment.model == bindparam("m")
        )

    def get(self, device_id: str, model: str | None = None) -> CachedAssignment | None:
        return self._entries.get(_key(device_id, model))

    def _entry(
        self, device_id: str, model: str | None, etag: str | None, doc: dict[str, Any] | None
    ) -> CachedAssignment:
        if doc is None:
            doc = build_assignment(
                device_id, model=model or "", desired=None, telemetry=self._telemetry
            )
            etag = doc["assignment_id"]
        assert etag is not None
        return CachedAssignment(etag=etag, body=canonical(doc), doc=doc)

    def load(self, device_id: str, model: str | None = None) -> CachedAssignment:
        """Read the assignment from the database (blocking) and cache it."""
        with self._engine.connect() as conn:
            if model is None:
                row = conn.execute(self._stmt_default, {"d": device_id}).first()
            else:
                row = conn.execute(self._stmt_model, {"d": device_id, "m": model}).first()
        entry = self._entry(device_id, model, row[0] if row else None, row[1] if row else None)
        with self._lock:
            self._entries[_key(device_id, model)] = entry
        return entry

    def put(self, device_id: str, etag: str, doc: dict[str, Any], model: str = "") -> None:
        """A model's assignment changed here: it is also the device's newest (default)."""
        entry = self._entry(device_id, model, etag, doc)  # one encoding serves both keys
        with self._lock:
            self._entries[_key(device_id, model)] = entry
            self._entries[_key(device_id, None)] = entry

    def evict(self, device_id: str) -> None:
        with self._lock:
            prefix = f"{device_id}\x00"
            for k in [k for k in self._entries if k == device_id or k.startswith(prefix)]:
                del self._entries[k]

    def poll(self) -> int:
        """Refresh cached entries changed by any replica since the last poll (blocking).

        Reads only (device id, model, ETag) of recently updated rows; bodies are fetched
        for the cached entries whose ETag changed (a device's default entry is re-read
        when any of its models changed to an ETag it does not hold).
        """
        since = self._polled_at - self._overlap
        now = utcnow()
        with self._engine.connect() as conn:
            rows = conn.execute(
                select(Assignment.device_id, Assignment.model, Assignment.etag).where(
                    Assignment.updated_at >= since
                )
            ).all()
            stale: list[tuple[str, str | None]] = []
            for d, m, etag in rows:
                for key_model in (m, None):
                    old = self._entries.get(_key(d, key_model))
                    if old is not None and old.etag != etag:
                        stale.append((d, key_model))
        for device_id, model in dict.fromkeys(stale):
            self.load(device_id, model)
        self._polled_at = now
        return len(set(stale))


FLUSH_CHUNK = 500


class LastSeenBuffer:
    """Buffers check-in times; :meth:`flush` writes them in one batched UPDATE."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._pending: dict[str, datetime] = {}
        self._lock = threading.Lock()

    def touch(self, device_id: str, when: datetime | None = None) -> None:
        self._pending[device_id] = when or utcnow()

    def flush(self) -> int:
        with self._lock:
            pending, self._pending = self._pending, {}
        if not pending:
            return 0
        stmt = (
            update(Device)
            .where(Device.id == bindparam("d"))
            .values(last_seen_at=bindparam("t"))
            .execution_options(synchronize_session=False)
        )
        params = [{"d": d, "t": t} for d, t in pending.items()]
        # small transactions with a pause between them: a flush of many devices must
        # not hold the interpreter (and so the check-in path) for long in one go
        for i in range(0, len(params), FLUSH_CHUNK):
            with self._engine.begin() as conn:
                conn.execute(stmt, params[i : i + FLUSH_CHUNK])
            time.sleep(0.002)
        return len(params)
