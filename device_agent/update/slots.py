"""A/B slots and the active pointer.

Layout under the agent's ``state_dir``::

    slots/a/, slots/b/      installed bundles (manifest.json, manifest.sig, files)
    active.json             {"slot", "name", "version", "previous", "previous_version",
                             "switched_at"}
    shadow.json             {"slot", "name", "version"} while a shadow candidate is loaded

Invariants:

* ``active.json`` is replaced atomically and only ever names a slot whose
  bundle passed verification and its smoke test.
* Staging writes only into the slot ``active.json`` does not name
  (:func:`device_agent.bundle.unpack_bundle` replaces it as a whole).
* The installed version used for anti-rollback is the active slot's manifest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .._fsutil import atomic_write_bytes, fsync_dir
from ..bundle import (
    Manifest,
    MemberHashMismatchError,
    MemberSizeMismatchError,
    MissingMemberError,
    TrustStore,
    UnlistedMemberError,
)
from ..bundle.manifest import MANIFEST_NAME, SIGNATURE_NAME
from ..bundle.trust import decode_signatures
from .durable import (
    Quarantined,
    StateFileError,
    quarantine,
    read_json,
    want_choice,
    want_dict,
    want_int,
    want_number,
    want_str,
)
from .state import SLOT_NAMES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ActivePointer:
    slot: str
    name: str
    version: int
    previous: str | None = None
    previous_version: int | None = None
    switched_at: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: Any) -> ActivePointer:
        """Validate ``active.json``; :class:`StateFileError` names the first bad field."""
        d = want_dict(obj, "active.json")
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise StateFileError(f"active.json has unknown fields {sorted(unknown)}")
        ptr = cls(
            slot=want_choice(d.get("slot"), "active.json slot", SLOT_NAMES),
            name=want_str(d.get("name"), "active.json name", max_len=128),
            version=want_int(d.get("version"), "active.json version"),
            previous=want_choice(
                d.get("previous"), "active.json previous", SLOT_NAMES, optional=True
            ),
            previous_version=want_int(
                d.get("previous_version"), "active.json previous_version", optional=True
            ),
            switched_at=want_number(d.get("switched_at", 0.0), "active.json switched_at"),
        )
        if ptr.previous == ptr.slot:
            raise StateFileError("active.json names the same slot as active and previous")
        return ptr


def _valid_shadow(obj: Any) -> dict[str, Any]:
    d = want_dict(obj, "shadow.json")
    want_choice(d.get("slot"), "shadow.json slot", SLOT_NAMES)
    want_str(d.get("name"), "shadow.json name", max_len=128)
    want_int(d.get("version"), "shadow.json version")
    want_str(d.get("sha256", ""), "shadow.json sha256", max_len=64)
    want_str(d.get("bundle_id", ""), "shadow.json bundle_id", max_len=200)
    return d


class Slots:
    """The two slots and the pointer files in ``state_dir``."""

    def __init__(self, state_dir: str | Path, *, repair: bool = False) -> None:
        """``repair``: move invalid pointer files aside (only under the update lock);
        without it an invalid file reads as absent and nothing is changed."""
        self.state_dir = Path(state_dir)
        self.repair = repair
        #: invalid pointer files moved aside by this object, for the report
        self.quarantined: list[Quarantined] = []
        self.root = self.state_dir / "slots"
        self.active_file = self.state_dir / "active.json"
        self.shadow_file = self.state_dir / "shadow.json"

    # -- paths ---------------------------------------------------------------
    def path(self, slot: str) -> Path:
        if slot not in SLOT_NAMES:
            raise ValueError(f"slot must be one of {SLOT_NAMES}, not {slot!r}")
        return self.root / slot

    @staticmethod
    def other(slot: str | None) -> str:
        return "b" if slot == "a" else "a"

    # -- pointers ------------------------------------------------------------
    def active(self) -> ActivePointer | None:
        """The active pointer, or None (no pointer, or an invalid one)."""
        return self._load(self.active_file, ActivePointer.from_json)

    def _load(self, path: Path, parse: Any) -> Any:
        try:
            obj = read_json(path)
            return None if obj is None else parse(obj)
        except StateFileError as e:
            if self.repair:
                self.quarantined.append(quarantine(path, str(e)))
            else:
                log.error("%s is invalid (%s); reading it as absent", path, e)
            return None

    def invalidate_active(self, reason: str) -> None:
        """Move an ``active.json`` that disagrees with its slot aside (under the lock)."""
        if self.active_file.exists():
            self.quarantined.append(quarantine(self.active_file, reason))

    def set_active(self, pointer: ActivePointer) -> None:
        atomic_write_bytes(self.active_file, json.dumps(pointer.to_json()).encode())

    def inactive(self) -> str:
        ptr = self.active()
        return self.other(ptr.slot if ptr else None)

    def installed_version(self) -> int | None:
        """The active slot's manifest version (anti-rollback floor), or None if empty."""
        ptr = self.active()
        if ptr is None:
            return None
        m = self.manifest(ptr.slot)
        return m.version if m is not None else None

    def shadow(self) -> dict[str, Any] | None:
        found: dict[str, Any] | None = self._load(self.shadow_file, _valid_shadow)
        return found

    def set_shadow(self, info: dict[str, Any] | None) -> None:
        if info is None:
            if self.shadow_file.exists():
                self.shadow_file.unlink()
                fsync_dir(self.state_dir)
        else:
            atomic_write_bytes(self.shadow_file, json.dumps(info).encode())

    # -- slot contents -------------------------------------------------------
    def manifest(self, slot: str) -> Manifest | None:
        try:
            return Manifest.from_bytes((self.path(slot) / MANIFEST_NAME).read_bytes())
        except FileNotFoundError:
            return None
        except Exception as e:  # noqa: BLE001 - an unreadable slot is an empty slot
            log.error("slot %s has an unreadable manifest: %s", slot, e)
            return None

    def signed_manifest(self, slot: str, trust: TrustStore) -> Manifest | None:
        """The slot's manifest if its signature verifies against ``trust`` (files unchecked);
        None for an empty slot. Raises a :class:`BundleError` subclass otherwise."""
        d = self.path(slot)
        try:
            manifest_bytes = (d / MANIFEST_NAME).read_bytes()
            sig_bytes = (d / SIGNATURE_NAME).read_bytes()
        except FileNotFoundError:
            return None
        trust.verify(manifest_bytes, decode_signatures(sig_bytes))
        return Manifest.from_bytes(manifest_bytes)

    def discard(self, slot: str) -> None:
        """Remove a slot's contents (never the active slot)."""
        ptr = self.active()
        if ptr is not None and ptr.slot == slot:
            raise ValueError(f"refusing to discard the active slot {slot!r}")
        p = self.path(slot)
        if p.exists():
            shutil.rmtree(p)
            fsync_dir(self.root)

    def clean_leftovers(self) -> None:
        """Remove half-staged directories a crash left behind (``.a.incoming-*``, ...)."""
        if not self.root.exists():
            return
        for p in self.root.iterdir():
            if p.name.startswith("."):
                shutil.rmtree(p, ignore_errors=True)

    def verify(self, slot: str, trust: TrustStore | None) -> Manifest:
        """Re-check an installed slot: signature against ``trust`` and every file's hash.

        With ``trust=None`` only integrity is checked (files against the
        manifest the install wrote), which is what boot does: the signature was
        checked at install time, and a later key rotation must not make the
        device refuse the model it is serving.

        Raises a :class:`~device_agent.bundle.BundleError` subclass if anything
        is off; the slot is then not fit to serve.
        """
        d = self.path(slot)
        try:
            manifest_bytes = (d / MANIFEST_NAME).read_bytes()
            sig_bytes = (d / SIGNATURE_NAME).read_bytes()
        except FileNotFoundError as e:
            raise MissingMemberError(f"slot {slot!r} holds no installed bundle ({e})") from e
        if trust is not None:
            trust.verify(manifest_bytes, decode_signatures(sig_bytes))
        manifest = Manifest.from_bytes(manifest_bytes)
        listed = {f.path for f in manifest.files} | {MANIFEST_NAME, SIGNATURE_NAME}
        extra = sorted(p.name for p in d.iterdir() if p.name not in listed)
        if extra:
            raise UnlistedMemberError(
                f"slot {slot!r} holds files the manifest does not list: {extra}"
            )
        for entry in manifest.files:
            h, size = hashlib.sha256(), 0
            try:
                with open(d / entry.path, "rb") as f:
                    while chunk := f.read(1 << 20):
                        h.update(chunk)
                        size += len(chunk)
            except FileNotFoundError as e:
                raise MissingMemberError(f"slot {slot!r} lacks {entry.path}") from e
            if size != entry.size:
                raise MemberSizeMismatchError(
                    f"slot {slot!r}: {entry.path} has {size} bytes, manifest says {entry.size}"
                )
            if h.hexdigest() != entry.sha256:
                raise MemberHashMismatchError(
                    f"slot {slot!r}: {entry.path} does not match its manifest hash"
                )
        return manifest
