"""What the update path persists: the assignment it acts on and its own progress.

``update.json`` (one :class:`UpdateRecord`) is replaced durably (temp file,
fsync, ``os.replace``) every time the state changes, before the side effect of
the new state begins. A missing or unreadable file means "idle".
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .._fsutil import atomic_write_bytes
from .durable import (
    Quarantined,
    StateFileError,
    quarantine,
    read_json,
    want_bool,
    want_choice,
    want_dict,
    want_int,
    want_number,
    want_str,
    want_str_map,
)
from .errors import AssignmentError

log = logging.getLogger(__name__)

_HEX = set("0123456789abcdef")
#: the slots a state file may name (a fixed set: never a path)
SLOT_NAMES = ("a", "b")
#: what an update attempt is doing
MODES = ("install", "shadow", "manual_rollback")


@dataclass(frozen=True)
class BundleRef:
    """One bundle named by an assignment (``desired`` or ``shadow``)."""

    bundle_id: str
    name: str
    version: int
    url: str
    sha256: str
    size: int

    @property
    def key(self) -> str:
        """Identity used to remember refused bundles: the file's digest."""
        return self.sha256

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: Any, where: str = "desired") -> BundleRef:
        if not isinstance(obj, dict):
            raise AssignmentError(f"assignment.{where} must be an object or null")
        for key, typ in (
            ("bundle_id", str),
            ("name", str),
            ("version", int),
            ("url", str),
            ("sha256", str),
            ("size", int),
        ):
            value = obj.get(key)
            if not isinstance(value, typ) or isinstance(value, bool):
                raise AssignmentError(
                    f"assignment.{where}.{key} must be a {typ.__name__}, not {value!r:.80}; "
                    "see device_agent.protocol"
                )
        try:
            ref = cls(
                bundle_id=str(obj["bundle_id"]),
                name=str(obj["name"]),
                version=int(obj["version"]),
                url=str(obj["url"]),
                sha256=str(obj["sha256"]).lower(),
                size=int(obj["size"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise AssignmentError(
                f"assignment.{where} is missing or has a bad field ({e}); expected bundle_id, "
                "name, version, url, sha256, size as in device_agent.protocol"
            ) from e
        if len(ref.sha256) != 64 or not set(ref.sha256) <= _HEX:
            raise AssignmentError(f"assignment.{where}.sha256 must be 64 hex digits")
        if ref.size < 0 or ref.version < 0:
            raise AssignmentError(f"assignment.{where}: size and version must be >= 0")
        if (
            not ref.bundle_id
            or len(ref.bundle_id) > 200
            or ref.bundle_id.startswith(".")
            or any(c in ref.bundle_id for c in "/\\\0")
        ):
            raise AssignmentError(f"assignment.{where}.bundle_id {ref.bundle_id!r} is not safe")
        return ref


@dataclass(frozen=True)
class Assignment:
    """The device's assignment document (see :mod:`device_agent.protocol`)."""

    device_id: str
    assignment_id: str
    desired: BundleRef | None
    shadow: BundleRef | None = None
    rollout_id: str | None = None
    stage: int | None = None
    telemetry: dict[str, Any] = field(default_factory=dict)
    #: the model this entry is for (a device running several has one entry per model)
    model: str | None = None

    @classmethod
    def from_json(cls, obj: Any) -> Assignment:
        if not isinstance(obj, dict):
            raise AssignmentError("the assignment must be a JSON object")
        desired, shadow = obj.get("desired"), obj.get("shadow")
        model = obj.get("model")
        if model is not None and not isinstance(model, str):
            raise AssignmentError("the assignment's model must be a string or null")
        return cls(
            device_id=str(obj.get("device_id", "")),
            assignment_id=str(obj.get("assignment_id", "")),
            desired=BundleRef.from_json(desired, "desired") if desired is not None else None,
            shadow=BundleRef.from_json(shadow, "shadow") if shadow is not None else None,
            rollout_id=obj.get("rollout_id"),
            stage=obj.get("stage"),
            telemetry=dict(obj.get("telemetry") or {}),
            model=model,
        )


@dataclass
class UpdateRecord:
    """The update path's persisted progress (``update.json``)."""

    state: str = "idle"
    mode: str = "install"  # "install" | "shadow"
    target: BundleRef | None = None
    bundle_path: str | None = None  # downloaded (or local) bundle file being installed
    local: bool = False  # installed from a file, not from the server
    slot: str | None = None  # slot being staged into
    from_slot: str | None = None  # slot that was active when the update began
    rollout_id: str | None = None
    error: dict[str, str] | None = None  # {"code": ..., "message": ...}
    probation: bool = True  # False: a local install commits right after the switch
    probation_started: float | None = None
    started_at: float | None = None
    etag: str | None = None  # of the last assignment acted on
    failed: dict[str, str] = field(default_factory=dict)  # bundle sha256 -> error code
    #: how many times a process started with this attempt persisted in each state
    restarts: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["target"] = self.target.to_json() if self.target else None
        return d

    @classmethod
    def from_json(cls, obj: Any) -> UpdateRecord:
        """Validate ``update.json``; :class:`StateFileError` names the first bad field."""
        from .machine import State

        d = want_dict(obj, "update.json")
        states = tuple(s.value for s in State)
        target = d.get("target")
        try:
            ref = BundleRef.from_json(target, "target") if target is not None else None
        except AssignmentError as e:
            raise StateFileError(f"update.json target: {e}") from e
        error = d.get("error")
        restarts = want_dict(d.get("restarts", {}), "update.json restarts")
        for k, v in restarts.items():
            want_choice(k, "update.json restarts key", states)
            want_int(v, f"update.json restarts.{k}")
        return cls(
            state=want_choice(d.get("state", "idle"), "update.json state", states),
            mode=want_choice(d.get("mode", "install"), "update.json mode", MODES),
            target=ref,
            bundle_path=want_str(d.get("bundle_path"), "update.json bundle_path", optional=True),
            local=want_bool(d.get("local", False), "update.json local"),
            slot=want_choice(d.get("slot"), "update.json slot", SLOT_NAMES, optional=True),
            from_slot=want_choice(
                d.get("from_slot"), "update.json from_slot", SLOT_NAMES, optional=True
            ),
            rollout_id=want_str(d.get("rollout_id"), "update.json rollout_id", optional=True),
            error=want_str_map(error, "update.json error") if error is not None else None,
            probation=want_bool(d.get("probation", True), "update.json probation"),
            probation_started=want_number(
                d.get("probation_started"), "update.json probation_started", optional=True
            ),
            started_at=want_number(d.get("started_at"), "update.json started_at", optional=True),
            etag=want_str(d.get("etag"), "update.json etag", optional=True),
            failed=want_str_map(d.get("failed", {}), "update.json failed"),
            restarts=dict(restarts),
        )

    def begin(self, mode: str, target: BundleRef | None, now: float) -> None:
        """Reset per-attempt fields for a new update attempt."""
        self.mode, self.target = mode, target
        self.bundle_path, self.local, self.slot, self.from_slot = None, False, None, None
        self.error, self.probation_started, self.started_at = None, None, now
        self.probation = True
        self.restarts = {}


def load_record(path: Path, quarantined: list[Quarantined] | None = None) -> UpdateRecord:
    """Load ``update.json``; a missing file is idle.

    An invalid file is idle too; with ``quarantined`` (the caller holds the update
    lock) it is moved aside and noted there, so the next start reads a valid file.
    """
    try:
        obj = read_json(path)
        return UpdateRecord() if obj is None else UpdateRecord.from_json(obj)
    except StateFileError as e:
        if quarantined is not None:
            quarantined.append(quarantine(path, str(e)))
        else:
            log.error("update state %s is invalid (%s); reading it as idle", path, e)
        return UpdateRecord()


def save_record(path: Path, record: UpdateRecord) -> None:
    atomic_write_bytes(path, json.dumps(record.to_json(), sort_keys=True).encode())
