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
from .errors import AssignmentError

log = logging.getLogger(__name__)

_HEX = set("0123456789abcdef")


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
        if not ref.bundle_id or "/" in ref.bundle_id or ref.bundle_id.startswith("."):
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

    @classmethod
    def from_json(cls, obj: Any) -> Assignment:
        if not isinstance(obj, dict):
            raise AssignmentError("the assignment must be a JSON object")
        desired, shadow = obj.get("desired"), obj.get("shadow")
        return cls(
            device_id=str(obj.get("device_id", "")),
            assignment_id=str(obj.get("assignment_id", "")),
            desired=BundleRef.from_json(desired, "desired") if desired is not None else None,
            shadow=BundleRef.from_json(shadow, "shadow") if shadow is not None else None,
            rollout_id=obj.get("rollout_id"),
            stage=obj.get("stage"),
            telemetry=dict(obj.get("telemetry") or {}),
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

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["target"] = self.target.to_json() if self.target else None
        return d

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> UpdateRecord:
        rec = cls(**{k: v for k, v in obj.items() if k in cls.__dataclass_fields__})
        if isinstance(rec.target, dict):
            rec.target = BundleRef.from_json(rec.target, "target")
        return rec

    def begin(self, mode: str, target: BundleRef | None, now: float) -> None:
        """Reset per-attempt fields for a new update attempt."""
        self.mode, self.target = mode, target
        self.bundle_path, self.local, self.slot, self.from_slot = None, False, None, None
        self.error, self.probation_started, self.started_at = None, None, now
        self.probation = True


def load_record(path: Path) -> UpdateRecord:
    try:
        return UpdateRecord.from_json(json.loads(path.read_text()))
    except FileNotFoundError:
        return UpdateRecord()
    except (ValueError, TypeError, AssignmentError) as e:
        # written atomically, so this is not a torn write; start over from idle
        log.error("update state %s is unreadable (%s); starting from idle", path, e)
        return UpdateRecord()


def save_record(path: Path, record: UpdateRecord) -> None:
    atomic_write_bytes(path, json.dumps(record.to_json(), sort_keys=True).encode())
