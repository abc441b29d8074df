"""Bundle verification: a pure function of the bytes, the trust store, the
installed version and a reference time.

Invariants, in the order they are enforced (the design brief's order):

1. ``manifest.json`` and ``manifest.sig`` are the first two members and are
   read with size caps before anything else.
2. The signatures are checked against the trust store over the *exact*
   manifest bytes before the manifest is parsed or believed.
3. The bundle must be meant for this device (:class:`Expectation`): of the
   model name the slot runs (``wrong_model``), listing the device's class when
   it lists any (``wrong_device_class``).
4. The manifest must not be expired at the reference time ``now`` (freeze).
5. The manifest's version must not be lower than the floor of its model name
   (rollback), and a bundle with the version of an installed bundle of that
   name must be that bundle (``version_reused``: one version, one content).
6. Every following member is checked by name and type before its data is read
   (no ``..``, absolute names, links, device nodes; nothing the manifest does
   not list; no member larger than the manifest says or than the cap), then
   streamed in fixed-size chunks through sha256 and compared with the manifest.
7. At the end every listed file must have been seen exactly once.

Nothing here touches the file system: member data goes to an optional
:class:`MemberSink`, which the I/O shell (:mod:`device_agent.bundle.install`)
uses to stage files and only publishes once this function has returned.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import BinaryIO, Protocol

from .container import ByteSource, iter_headers, skip_padding
from .errors import (
    ExpiredBundleError,
    MalformedBundleError,
    MemberHashMismatchError,
    MemberSizeMismatchError,
    MissingMemberError,
    OversizedMemberError,
    RollbackError,
    UnlistedMemberError,
    UnsignedBundleError,
    VersionReusedError,
    WrongDeviceClassError,
    WrongModelError,
)
from .manifest import MANIFEST_NAME, SIGNATURE_NAME, FileEntry, Manifest, format_time
from .trust import TrustStore, decode_signatures


@dataclass(frozen=True)
class VerifyLimits:
    """Caps that bound what a bundle can make the verifier read or hold in memory."""

    max_manifest_bytes: int = 256 * 1024
    max_signature_bytes: int = 64 * 1024
    max_member_bytes: int = 2 * 1024**3
    max_members: int = 32
    chunk_size: int = 1024 * 1024


@dataclass(frozen=True)
class Expectation:
    """What this device expects of a bundle beyond a valid signature (all pure data).

    * ``model_name``: the model the slot runs; a bundle of another name is
      ``wrong_model``. None: the slot is empty and the assignment chooses.
    * ``device_class``: this device's class; a bundle whose
      ``target_device_classes`` is non-empty and does not list it is
      ``wrong_device_class`` (an empty list means every class).
    * ``floors``: per model name, the lowest version accepted (anti-rollback;
      one floor per name, so another model's version never locks this one out).
    * ``installed``: per model name, ``(version, sha256 of manifest.json)`` of
      bundles installed on the device; the same version with other bytes is
      ``version_reused``.
    """

    model_name: str | None = None
    device_class: str | None = None
    floors: Mapping[str, int] = field(default_factory=dict)
    installed: Mapping[str, tuple[tuple[int, str], ...]] = field(default_factory=dict)


def check_expectation(
    manifest: Manifest, manifest_bytes: bytes, expect: Expectation, now: datetime
) -> None:
    """Steps 3 to 5 for a trusted manifest: binding, freeze, floor and version reuse."""
    if expect.model_name is not None and manifest.name != expect.model_name:
        raise WrongModelError(
            f"bundle is model {manifest.name!r} but this device runs {expect.model_name!r} in "
            "that slot; the assignment is wrong or was tampered with. Assign a bundle of "
            f"{expect.model_name!r}"
        )
    classes = manifest.target_device_classes
    if expect.device_class is not None and classes and expect.device_class not in classes:
        raise WrongDeviceClassError(
            f"bundle {manifest.name} v{manifest.version} is built for device class(es) "
            f"{', '.join(classes)}, not for this {expect.device_class!r} device; assign the "
            "variant built for this class"
        )
    _check_expiry(manifest, now)
    floor = expect.floors.get(manifest.name)
    if floor is not None and manifest.version < floor:
        raise RollbackError(
            f"bundle {manifest.name} v{manifest.version} is below this device's floor "
            f"v{floor} for {manifest.name}; devices refuse downgrades below the floor"
        )
    digest = hashlib.sha256(manifest_bytes).hexdigest()
    for version, installed in expect.installed.get(manifest.name, ()):
        if version == manifest.version and not hmac.compare_digest(installed, digest):
            raise VersionReusedError(
                f"bundle {manifest.name} v{manifest.version} differs from the installed "
                f"{manifest.name} v{version} (manifest sha256 {digest[:16]}… vs "
                f"{installed[:16]}…): one version must name one content. Release it under a "
                "new version"
            )


def _check_expiry(manifest: Manifest, now: datetime) -> None:
    if now >= manifest.expires_at:
        raise ExpiredBundleError(
            f"bundle {manifest.name} v{manifest.version} expired at "
            f"{format_time(manifest.expires_at)} (now {format_time(now)}); ask the operator "
            "for a freshly signed bundle, and check the device clock"
        )


class MemberSink(Protocol):
    """Receives verified-as-we-go member data; used by the install shell."""

    def prepare(self, manifest: Manifest) -> None:
        """Called once the manifest is trusted, before any member data."""

    def begin(self, entry: FileEntry) -> None: ...

    def write(self, data: memoryview) -> None: ...

    def end(self, entry: FileEntry) -> None:
        """Called after the member's size and hash matched the manifest."""


@dataclass(frozen=True)
class VerifiedBundle:
    manifest: Manifest
    manifest_bytes: bytes
    signature_bytes: bytes
    signed_by: tuple[str, ...]


def verify_bundle(
    stream: BinaryIO,
    trust: TrustStore,
    *,
    now: datetime,
    installed_version: int | None = None,
    limits: VerifyLimits | None = None,
    sink: MemberSink | None = None,
    expect: Expectation | None = None,
) -> VerifiedBundle:
    """Verify the bundle read from ``stream``; raise a :class:`BundleError` subclass if bad.

    ``installed_version`` is a floor for any model name (the single-model form);
    ``expect`` carries the per-name binding, floors and installed digests."""
    limits = limits or VerifyLimits()
    src = ByteSource(stream)
    headers = iter_headers(src, limits.max_members)

    # 1. size-capped manifest and signature
    first = next(headers, None)
    if first is None or first.name != MANIFEST_NAME:
        raise MalformedBundleError(
            "bundle does not start with manifest.json; it is not an edgefleet bundle"
        )
    if first.size > limits.max_manifest_bytes:
        raise OversizedMemberError(
            f"manifest.json is {first.size} bytes, above the cap of {limits.max_manifest_bytes}"
        )
    manifest_bytes = src.read_exact(first.size, "manifest.json")
    skip_padding(src, first.size, MANIFEST_NAME)

    second = next(headers, None)
    if second is None or second.name != SIGNATURE_NAME:
        raise UnsignedBundleError(
            "bundle has no manifest.sig after its manifest; it is unsigned. Sign it with "
            "`edgefleet bundle sign --key KEY BUNDLE`"
        )
    if second.size > limits.max_signature_bytes:
        raise OversizedMemberError(
            f"manifest.sig is {second.size} bytes, above the cap of {limits.max_signature_bytes}"
        )
    signature_bytes = src.read_exact(second.size, "manifest.sig")
    skip_padding(src, second.size, SIGNATURE_NAME)

    # 2. signatures over the exact bytes, before believing anything in them
    signed_by = trust.verify(manifest_bytes, decode_signatures(signature_bytes))
    manifest = Manifest.from_bytes(manifest_bytes)

    # 3.-5. binding, freeze, per-name floor, one content per version
    check_expectation(manifest, manifest_bytes, expect or Expectation(), now)
    # 5. rollback (single floor, for callers without per-name floors)
    if installed_version is not None and manifest.version < installed_version:
        raise RollbackError(
            f"bundle {manifest.name} v{manifest.version} is older than the installed "
            f"v{installed_version}; devices refuse downgrades. To go back to an older model, "
            "publish it again under a new, higher version"
        )

    # 6. members
    listed = {f.path: f for f in manifest.files}
    seen: set[str] = set()
    if sink is not None:
        sink.prepare(manifest)
    buf = bytearray(limits.chunk_size)
    view = memoryview(buf)
    for header in headers:
        entry = listed.get(header.name)
        if entry is None:
            raise UnlistedMemberError(
                f"bundle member {header.name!r} is not listed in the signed manifest; "
                "something was added to the bundle after signing"
            )
        if header.name in seen:
            raise MalformedBundleError(f"bundle member {header.name!r} appears twice")
        if header.size > entry.size:
            raise OversizedMemberError(
                f"bundle member {header.name!r} is {header.size} bytes but the manifest says "
                f"{entry.size}; refusing to read past the signed size"
            )
        if header.size > limits.max_member_bytes:
            raise OversizedMemberError(
                f"bundle member {header.name!r} is {header.size} bytes, above this device's "
                f"cap of {limits.max_member_bytes}; raise the cap or use a smaller variant"
            )
        if header.size < entry.size:
            raise MemberSizeMismatchError(
                f"bundle member {header.name!r} is {header.size} bytes but the manifest says "
                f"{entry.size}; the file was replaced or cut short"
            )
        _stream_member(src, header.name, header.size, entry, view, sink)
        skip_padding(src, header.size, header.name)
        seen.add(header.name)

    # 7. completeness
    missing = [p for p in listed if p not in seen]
    if missing:
        raise MissingMemberError(
            f"bundle lacks file(s) {', '.join(missing)} that its manifest lists; "
            "rebuild it with `edgefleet bundle pack`"
        )
    return VerifiedBundle(manifest, manifest_bytes, signature_bytes, tuple(signed_by))


def _stream_member(
    src: ByteSource,
    name: str,
    size: int,
    entry: FileEntry,
    view: memoryview,
    sink: MemberSink | None,
) -> None:
    digest = hashlib.sha256()
    if sink is not None:
        sink.begin(entry)
    remaining = size
    chunk = len(view)
    while remaining:
        n = min(chunk, remaining)
        part = view[:n]
        src.readinto_exact(part, f"member {name!r}")
        digest.update(part)
        if sink is not None:
            sink.write(part)
        remaining -= n
    if not hmac.compare_digest(digest.hexdigest(), entry.sha256):
        raise MemberHashMismatchError(
            f"bundle member {name!r} does not match the sha256 in the signed manifest: it was "
            "modified or swapped in from another bundle. Do not install; fetch the bundle again"
        )
    if sink is not None:
        sink.end(entry)
