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

log = logging.getLogger(__name__)

SLOT_NAMES = ("a", "b")


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


class Slots:
    """The two slots and the pointer files in ``state_dir``."""

    def __init__(self, state_dir: str | Path) -> None:
        self.state_dir = Path(state_dir)
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
        obj = _read_json(self.active_file)
        if obj is None:
            return None
        try:
            return ActivePointer(**obj)
        except TypeError:
            log.error(
                "active pointer %s is malformed; treating the device as empty", self.active_file
            )
            return None

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
        return _read_json(self.shadow_file)

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


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError:
        log.error("%s is not valid JSON; ignoring it", path)
        return None
