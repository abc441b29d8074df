"""Re-publish a previous bundle under a new, higher version (the rollback bundle).

Devices refuse a bundle whose version is lower than the one installed
(anti-rollback, :mod:`device_agent.bundle.verify`), so a rollback cannot send
the old bundle again. Instead the server re-packs the previous bundle's files
unchanged (same model, drift profile and smoke samples, byte for byte) into a
new manifest with ``version = max(previous, candidate) + 1``
(:meth:`RolloutSpec.rollback_version`), a fresh validity period and provenance
naming the bundle it came from, and signs it with the server's key.

Before re-signing, the previous bundle is verified against the server's trust
store (signature and every file hash; expiry is deliberately not checked, an
old bundle may have expired), so re-signing can never launder a tampered file.

This module does file I/O; the pure engine only asks for its result.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from converters.bundle import BundleFile, build_manifest, pack_bundle, read_header, sign_bundle
from converters.errors import ConverterError
from device_agent.bundle import BundleError, Manifest, TrustStore, unpack_bundle
from fleet_server.rollouts.errors import RepublishError


def republish_bundle(
    previous: str | os.PathLike[str],
    *,
    version: int,
    out: str | os.PathLike[str],
    signing_key: Ed25519PrivateKey,
    trust: TrustStore,
    now: datetime | None = None,
    valid_for: timedelta = timedelta(days=90),
) -> Manifest:
    """Write ``out``: the files of bundle ``previous`` under ``version``, signed by ``signing_key``.

    Raises :class:`RepublishError` if ``previous`` does not verify against
    ``trust``, if ``version`` is not above its version, or on I/O failure.
    Returns the new manifest.
    """
    previous, out = Path(previous), Path(out)
    try:
        old, _, old_bytes = read_header(previous)
    except (OSError, BundleError, ConverterError) as e:
        raise RepublishError(f"cannot read previous bundle {previous}: {e}") from e
    if version <= old.version:
        raise RepublishError(
            f"new version {version} must be above the previous bundle's v{old.version}; "
            "use RolloutSpec.rollback_version()"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.republish-"))
    try:
        staged = work / "files"
        try:
            # the signature and every hash are checked; expiry is not (now = created_at)
            unpack_bundle(previous, staged, trust, now=old.created_at)
        except BundleError as e:
            raise RepublishError(
                f"previous bundle {previous} does not verify ({e.code}): {e}; refusing to "
                "re-sign it. Re-upload the original bundle"
            ) from e
        files = [BundleFile(staged / f.path, f.path, f.role) for f in old.files]
        provenance = {
            **old.provenance,
            "republished_from": {
                "version": old.version,
                "manifest_sha256": hashlib.sha256(old_bytes).hexdigest(),
                "reason": "rollback",
            },
        }
        try:
            manifest = build_manifest(
                name=old.name,
                version=version,
                fmt=old.format,
                files=files,
                inputs=old.inputs,
                outputs=old.outputs,
                runtime=old.runtime,
                target_device_classes=old.target_device_classes,
                provenance=provenance,
                labels=old.labels,
                created_at=now or datetime.now(timezone.utc),
                valid_for=valid_for,
            )
            unsigned = work / "unsigned.efb"
            pack_bundle(unsigned, manifest, files)
            sign_bundle(unsigned, signing_key, out=out)
        except (OSError, ConverterError) as e:
            raise RepublishError(f"cannot write re-published bundle {out}: {e}") from e
        return manifest
    finally:
        shutil.rmtree(work, ignore_errors=True)
