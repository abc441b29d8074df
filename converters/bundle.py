"""Writing and signing bundles (format v1).

A bundle is a POSIX ustar archive whose first member is the canonical
``manifest.json``, whose second member is ``manifest.sig`` and whose other
members are the files the manifest lists. Packing writes an unsigned bundle
(an empty signature list); signing adds a signature and rewrites the file
atomically. See :mod:`device_agent.bundle` for the reading side.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import IO, Any, cast

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_agent._fsutil import fsync_dir
from device_agent.bundle.container import ByteSource, iter_headers, iter_members, skip_padding
from device_agent.bundle.errors import BundleError
from device_agent.bundle.manifest import (
    MANIFEST_NAME,
    SIGNATURE_NAME,
    FileEntry,
    Manifest,
    TensorSpec,
)
from device_agent.bundle.trust import (
    Signature,
    decode_signatures,
    encode_signatures,
    key_id,
)

from .errors import PackError

CONVERTER_VERSION = "0.1.0"
_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class BundleFile:
    """A file to put into a bundle: where it is now, its member name and role."""

    source: Path
    member: str
    role: str


def sha256_file(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
            size += n
    return h.hexdigest(), size


def build_manifest(
    *,
    name: str,
    version: int,
    fmt: str,
    files: Sequence[BundleFile],
    inputs: Sequence[TensorSpec] = (),
    outputs: Sequence[TensorSpec] = (),
    runtime: Mapping[str, Any] | None = None,
    target_device_classes: Sequence[str] = (),
    provenance: Mapping[str, Any] | None = None,
    labels: Mapping[str, str] | None = None,
    created_at: datetime | None = None,
    valid_for: timedelta = timedelta(days=90),
) -> Manifest:
    """Hash the files and build the manifest (validated by a round-trip)."""
    created = (created_at or datetime.now(timezone.utc)).replace(microsecond=0)
    entries = []
    for f in files:
        digest, size = sha256_file(f.source)
        entries.append(FileEntry(path=f.member, role=f.role, sha256=digest, size=size))
    prov = {"converter_version": CONVERTER_VERSION, **(provenance or {})}
    manifest = Manifest(
        name=name,
        version=version,
        format=fmt,
        files=tuple(entries),
        created_at=created,
        expires_at=created + valid_for,
        inputs=tuple(inputs),
        outputs=tuple(outputs),
        runtime=dict(runtime or {}),
        target_device_classes=tuple(target_device_classes),
        provenance=prov,
        labels=dict(labels or {}),
    )
    try:
        return Manifest.from_bytes(manifest.to_bytes())
    except BundleError as e:
        raise PackError(f"cannot build a valid manifest: {e}") from e


def _tarinfo(name: str, size: int, mtime: float) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = int(mtime)
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


def write_bundle(
    out: str | os.PathLike[str],
    manifest: Manifest,
    signatures: Sequence[Signature],
    members: Iterable[tuple[str, int, IO[bytes]]],
) -> Path:
    """Write a bundle atomically (temp file in the target directory, fsync, rename)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    mtime = 0.0  # the device's strict reader requires mtime 0 (device_agent.bundle.container)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as raw:
            with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                mbytes = manifest.to_bytes()
                sbytes = encode_signatures(list(signatures))
                tar.addfile(_tarinfo(MANIFEST_NAME, len(mbytes), mtime), io.BytesIO(mbytes))
                tar.addfile(_tarinfo(SIGNATURE_NAME, len(sbytes), mtime), io.BytesIO(sbytes))
                for member, size, fh in members:
                    tar.addfile(_tarinfo(member, size, mtime), fh)
            raw.flush()
            os.fsync(raw.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return out


def pack_bundle(
    out: str | os.PathLike[str], manifest: Manifest, files: Sequence[BundleFile]
) -> Path:
    """Write an unsigned bundle holding ``files`` as described by ``manifest``."""
    by_member = {f.member: f for f in files}
    if set(by_member) != {e.path for e in manifest.files}:
        raise PackError("the files given do not match the files the manifest lists")
    handles: list[IO[bytes]] = []
    try:
        members: list[tuple[str, int, IO[bytes]]] = []
        for entry in manifest.files:
            fh: IO[bytes] = open(by_member[entry.path].source, "rb")  # noqa: SIM115 - closed below
            handles.append(fh)
            members.append((entry.path, entry.size, fh))
        return write_bundle(out, manifest, [], members)
    finally:
        for handle in handles:
            handle.close()


def read_header(path: str | os.PathLike[str]) -> tuple[Manifest, list[Signature], bytes]:
    """Read manifest and signatures *without* verifying them (for inspect/sign)."""
    with open(path, "rb") as f:
        src = ByteSource(f)
        headers = iter_headers(src, 64)
        first = next(headers, None)
        if first is None or first.name != MANIFEST_NAME:
            raise PackError(f"{path} does not start with manifest.json; not a bundle")
        mbytes = src.read_exact(first.size, MANIFEST_NAME)
        skip_padding(src, first.size, MANIFEST_NAME)
        second = next(headers, None)
        sigs: list[Signature] = []
        if second is not None and second.name == SIGNATURE_NAME:
            sigs = decode_signatures(src.read_exact(second.size, SIGNATURE_NAME))
    return Manifest.from_bytes(mbytes), sigs, mbytes


def sign_bundle(
    path: str | os.PathLike[str],
    private_key: Ed25519PrivateKey,
    out: str | os.PathLike[str] | None = None,
) -> Signature:
    """Add a signature by ``private_key`` over the bundle's manifest bytes.

    A signature by the same key replaces the old one, so re-signing is safe.
    The bundle is rewritten atomically (to ``out`` if given).
    """
    manifest, sigs, mbytes = read_header(path)
    kid = key_id(private_key.public_key())
    new = Signature(keyid=kid, sig=private_key.sign(mbytes))
    sigs = [s for s in sigs if s.keyid != kid] + [new]
    with open(path, "rb") as f:
        readers = iter_members(f)
        try:
            next(readers)  # manifest.json
            next(readers)  # manifest.sig
        except StopIteration as e:
            raise PackError(f"{path}: not a bundle (no manifest members)") from e
        # members are streamed from the strict reader straight into the new bundle
        members = ((m.header.name, m.header.size, cast(IO[bytes], m)) for m in readers)
        write_bundle(out or path, manifest, sigs, members)
    return new
