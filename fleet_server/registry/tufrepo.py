"""TUF metadata for the Uptane pattern (python-tuf's Metadata API): the image repository
and the director repository, as the server keeps them and the operator CLI edits them.

Who signs what (the keys named in each repository's root):

========================  =================================  ==========================
role                      image repository                   director repository
========================  =================================  ==========================
root                      offline root keys (threshold)      offline root keys
targets                   **release keys, k of n, offline**  server online key
snapshot, timestamp       server online key                  server online key
========================  =================================  ==========================

The server stores the image repository's root history and its ``targets.json`` (uploaded
after ``edgefleet release sign``) and re-signs only snapshot and timestamp; it never holds a
release key, so it cannot add a release. The director's targets, per device, say which
released bundle each model must run, bound to the device id and class, with short expiry.

Target paths are ``<model name>/<sha256>.efb``; image targets carry
``custom = {"edgefleet": {"name", "version", "release_counter", "device_classes"}}``,
director targets ``{"edgefleet": {"device_id", "device_class", "name", "role"}}``.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from securesystemslib.signer import CryptoSigner, Key, Signer, SSlibKey
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import (
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)

SPEC_VERSION = "1.0.31"
TIMESTAMP_LIFETIME = timedelta(hours=6)
SNAPSHOT_LIFETIME = timedelta(days=7)
DIRECTOR_TARGETS_LIFETIME = timedelta(days=1)
IMAGE_TARGETS_LIFETIME = timedelta(days=365)


class TufRepoError(ValueError):
    """Metadata that cannot be accepted, with what to do about it."""


def _expires(now: datetime, life: timedelta) -> datetime:
    return (now + life).replace(microsecond=0)


def signer_for(private: Ed25519PrivateKey) -> CryptoSigner:
    """A securesystemslib signer for an Ed25519 private key (from a KeyStore)."""
    return CryptoSigner(private, SSlibKey.from_crypto(private.public_key()))


def public_key(private: Ed25519PrivateKey) -> Key:
    return SSlibKey.from_crypto(private.public_key())


def target_path(name: str, sha256: str) -> str:
    return f"{name}/{sha256}.efb"


def make_root(
    *,
    root_keys: Iterable[Key],
    targets_keys: Iterable[Key],
    online_keys: Iterable[Key],
    root_threshold: int = 1,
    targets_threshold: int = 1,
    version: int = 1,
    now: datetime | None = None,
    lifetime: timedelta = timedelta(days=365 * 5),
) -> Metadata[Root]:
    """An unsigned root: ``root_keys`` for root, ``targets_keys`` (threshold) for targets,
    ``online_keys`` for snapshot and timestamp."""
    now = now or datetime.now(timezone.utc)
    root = Root(
        version=version,
        spec_version=SPEC_VERSION,
        expires=_expires(now, lifetime),
        consistent_snapshot=False,
    )
    for role, keys in (
        ("root", root_keys),
        ("targets", targets_keys),
        ("snapshot", online_keys),
        ("timestamp", online_keys),
    ):
        for k in keys:
            root.add_key(k, role)
    root.roles["root"].threshold = root_threshold
    root.roles["targets"].threshold = targets_threshold
    return Metadata(root)


def verify_role(root: Root, role: str, md: Metadata[Any]) -> None:
    """Raise :class:`TufRepoError` unless ``md`` meets ``role``'s threshold in ``root``."""
    try:
        root.verify_delegate(role, md.signed_bytes, md.signatures)
    except UnsignedMetadataError as e:
        raise TufRepoError(
            f"{role} metadata is not signed by enough {role} keys of the current root "
            f"({e}); collect signatures with `edgefleet release sign`"
        ) from e


@dataclass
class ImageRepository:
    """The image repository in ``directory``: root history and targets from offline keys;
    snapshot and timestamp signed here with ``online`` (the server's online key)."""

    directory: Path
    online: Signer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.directory = Path(self.directory)

    # -- reading -----------------------------------------------------------------
    def exists(self) -> bool:
        return (self.directory / "root.json").exists()

    def root(self) -> Metadata[Root]:
        return Metadata[Root].from_bytes((self.directory / "root.json").read_bytes())

    def targets(self) -> Metadata[Targets]:
        return Metadata[Targets].from_bytes((self.directory / "targets.json").read_bytes())

    def file(self, name: str, now: datetime | None = None) -> bytes | None:
        """The bytes of metadata file ``name`` (``N.root.json``, ``timestamp.json``, ...)."""
        if name == "timestamp.json" and self.online is not None:
            self._refresh_online(now or datetime.now(timezone.utc))
        if "/" in name or name.startswith("."):
            return None
        p = self.directory / name
        return p.read_bytes() if p.is_file() else None

    # -- writing -----------------------------------------------------------------
    def init(self, root: Metadata[Root], targets: Metadata[Targets]) -> None:
        """Start the repository with a signed root and signed (possibly empty) targets."""
        verify_role(root.signed, "root", root)
        verify_role(root.signed, "targets", targets)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._write(f"{root.signed.version}.root.json", root.to_bytes())
        self._write("root.json", root.to_bytes())
        self._write("targets.json", targets.to_bytes())

    def add_root(self, new: Metadata[Root]) -> None:
        """Rotate: ``new`` must be the next version, signed by the old root's threshold and
        its own (TUF's rule), so keys are rotated and revoked over the air."""
        old = self.root()
        if new.signed.version != old.signed.version + 1:
            raise TufRepoError(f"new root must be version {old.signed.version + 1}")
        verify_role(old.signed, "root", new)
        verify_role(new.signed, "root", new)
        self._write(f"{new.signed.version}.root.json", new.to_bytes())
        self._write("root.json", new.to_bytes())
        self._invalidate_online()

    def put_targets(self, data: bytes) -> Metadata[Targets]:
        """Accept a targets.json signed offline by the release keys' threshold, at a
        version above the current one."""
        try:
            md = Metadata[Targets].from_bytes(data)
        except Exception as e:  # noqa: BLE001 - any parse error is the uploader's
            raise TufRepoError(f"not TUF targets metadata: {e}") from e
        verify_role(self.root().signed, "targets", md)
        cur = self.targets().signed.version
        if md.signed.version <= cur:
            raise TufRepoError(
                f"targets version {md.signed.version} is not above the current {cur}; "
                "`edgefleet release add` bumps it"
            )
        for path, t in md.signed.targets.items():
            check_release_fields(path, t)
        self._write("targets.json", md.to_bytes())
        self._invalidate_online()
        return md

    def _invalidate_online(self) -> None:
        """Nothing to drop: the next timestamp request sees the new targets version (versions
        of snapshot and timestamp must keep growing, so their files stay)."""

    def _refresh_online(self, now: datetime) -> None:
        """Re-sign snapshot and timestamp (online key) when targets changed or either is
        past half its lifetime; versions only grow."""
        assert self.online is not None
        with self._lock:
            targets_version = self.targets().signed.version
            snap_file, ts_file = self.directory / "snapshot.json", self.directory / "timestamp.json"
            snap = _load(snap_file, Snapshot)
            if (
                snap is None
                or snap.signed.meta["targets.json"].version != targets_version
                or snap.signed.expires - now < SNAPSHOT_LIFETIME / 2
            ):
                snap = Metadata(
                    Snapshot(
                        version=_current_version(snap_file) + 1,
                        spec_version=SPEC_VERSION,
                        expires=_expires(now, SNAPSHOT_LIFETIME),
                        meta={"targets.json": MetaFile(version=targets_version)},
                    )
                )
                snap.sign(self.online)
                self._write("snapshot.json", snap.to_bytes())
            ts = _load(ts_file, Timestamp)
            if (
                ts is not None
                and ts.signed.snapshot_meta.version == snap.signed.version
                and ts.signed.expires - now > TIMESTAMP_LIFETIME / 2
            ):
                return
            ts = Metadata(
                Timestamp(
                    version=_current_version(ts_file) + 1,
                    spec_version=SPEC_VERSION,
                    expires=_expires(now, TIMESTAMP_LIFETIME),
                    snapshot_meta=MetaFile(version=snap.signed.version),
                )
            )
            ts.sign(self.online)
            self._write("timestamp.json", ts.to_bytes())

    def _write(self, name: str, data: bytes) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.directory / f".{name}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, self.directory / name)


def _load(path: Path, cls: type[Any]) -> Metadata[Any] | None:
    try:
        md: Metadata[Any] = Metadata.from_bytes(path.read_bytes())
    except (OSError, ValueError):
        return None
    return md if isinstance(md.signed, cls) else None


def _current_version(path: Path) -> int:
    try:
        return int(json.loads(path.read_bytes())["signed"]["version"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def _root_version(data: bytes) -> int:
    return int(json.loads(data)["signed"]["version"])


def _version_now() -> int:
    """A version that grows with time, so a restarted server never reuses one."""
    return int(time.time() * 1000)


def check_release_fields(path: str, t: TargetFile) -> None:
    """A released target must carry name, version, release counter and device classes."""
    f = (t.custom or {}).get("edgefleet") if isinstance(t.custom, dict) else None
    ok = (
        isinstance(f, dict)
        and isinstance(f.get("name"), str)
        and isinstance(f.get("version"), int)
        and isinstance(f.get("release_counter"), int)
        and isinstance(f.get("device_classes"), list)
        and "sha256" in t.hashes
        and path == target_path(f["name"], t.hashes["sha256"])
    )
    if not ok:
        raise TufRepoError(
            f"released target {path!r} needs custom edgefleet name, version, release_counter, "
            "device_classes, a sha256, and the path <name>/<sha256>.efb"
        )


def release_target(
    *,
    name: str,
    version: int,
    sha256: str,
    length: int,
    release_counter: int,
    device_classes: Iterable[str],
) -> TargetFile:
    """The image repository's entry for a released bundle."""
    return TargetFile(
        length=length,
        hashes={"sha256": sha256},
        path=target_path(name, sha256),
        unrecognized_fields={
            "custom": {
                "edgefleet": {
                    "name": name,
                    "version": version,
                    "release_counter": release_counter,
                    "device_classes": sorted(device_classes),
                }
            }
        },
    )


def bundle_release_target(bundle: Path, counter: int | None = None) -> TargetFile:
    """The image repository's entry for the bundle file ``bundle``: name, version and
    device classes from its signed manifest, sha256 and length of the file; the release
    counter defaults to the version."""
    import hashlib

    from converters.bundle import read_header

    manifest, _, _ = read_header(bundle)
    data = Path(bundle).read_bytes()
    return release_target(
        name=manifest.name,
        version=manifest.version,
        sha256=hashlib.sha256(data).hexdigest(),
        length=len(data),
        release_counter=manifest.version if counter is None else counter,
        device_classes=manifest.target_device_classes,
    )


def new_targets(now: datetime | None = None, version: int = 1) -> Metadata[Targets]:
    now = now or datetime.now(timezone.utc)
    return Metadata(
        Targets(
            version=version,
            spec_version=SPEC_VERSION,
            expires=_expires(now, IMAGE_TARGETS_LIFETIME),
        )
    )


@dataclass(frozen=True)
class DeviceInstruction:
    role: str  # "desired" | "shadow"
    name: str
    sha256: str
    length: int


@dataclass
class DirectorRepository:
    """The director: a static root; per device, timestamp/snapshot/targets signed on demand
    with the online key, cached until the instructions change or the timestamp ages."""

    root_bytes: bytes
    online: Signer
    _cache: dict[str, tuple[str, datetime, dict[str, bytes]]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def file(
        self,
        name: str,
        *,
        device_id: str,
        device_class: str,
        instructions: list[DeviceInstruction],
        now: datetime | None = None,
    ) -> bytes | None:
        now = now or datetime.now(timezone.utc)
        if name in ("root.json", f"{_root_version(self.root_bytes)}.root.json"):
            return self.root_bytes
        if name not in ("timestamp.json", "snapshot.json", "targets.json"):
            return None
        key = json.dumps([device_class, [i.__dict__ for i in instructions]], sort_keys=True)
        with self._lock:
            cached = self._cache.get(device_id)
            fresh = (
                cached is not None and cached[0] == key and cached[1] - now > TIMESTAMP_LIFETIME / 2
            )
            if not fresh:
                files = self._generate(device_id, device_class, instructions, now)
                cached = (key, _expires(now, TIMESTAMP_LIFETIME), files)
                self._cache[device_id] = cached
            assert cached is not None
            return cached[2][name]

    def _generate(
        self,
        device_id: str,
        device_class: str,
        instructions: list[DeviceInstruction],
        now: datetime,
    ) -> dict[str, bytes]:
        version = _version_now()
        targets: dict[str, TargetFile] = {}
        for i in instructions:
            path = target_path(i.name, i.sha256)
            targets[path] = TargetFile(
                length=i.length,
                hashes={"sha256": i.sha256},
                path=path,
                unrecognized_fields={
                    "custom": {
                        "edgefleet": {
                            "device_id": device_id,
                            "device_class": device_class,
                            "name": i.name,
                            "role": i.role,
                        }
                    }
                },
            )
        t = Metadata(
            Targets(
                version=version,
                spec_version=SPEC_VERSION,
                expires=_expires(now, DIRECTOR_TARGETS_LIFETIME),
                targets=targets,
            )
        )
        s = Metadata(
            Snapshot(
                version=version,
                spec_version=SPEC_VERSION,
                expires=_expires(now, DIRECTOR_TARGETS_LIFETIME),
                meta={"targets.json": MetaFile(version=version)},
            )
        )
        ts = Metadata(
            Timestamp(
                version=version,
                spec_version=SPEC_VERSION,
                expires=_expires(now, TIMESTAMP_LIFETIME),
                snapshot_meta=MetaFile(version=version),
            )
        )
        for md in (t, s, ts):
            md.sign(self.online)
        return {
            "targets.json": t.to_bytes(),
            "snapshot.json": s.to_bytes(),
            "timestamp.json": ts.to_bytes(),
        }


def director_root(
    *, root_keys: Iterable[Key], online_keys: Iterable[Key], now: datetime | None = None
) -> Metadata[Root]:
    """The director's root: every top-level role but root is the online key's."""
    online = list(online_keys)
    return make_root(root_keys=root_keys, targets_keys=online, online_keys=online, now=now)


def sign_all(md: Metadata[Any], signers: Iterable[Signer]) -> Metadata[Any]:
    for s in signers:
        md.sign(s, append=True)
    return md
