"""Reading a stored bundle's drift reference profile (for gates and reports)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from functools import lru_cache

from device_agent.bundle import BundleError
from device_agent.bundle.container import iter_members
from device_agent.payloads import DriftProfile
from fleet_server.db.models import Bundle

MAX_PROFILE_BYTES = 8 * 1024 * 1024


def bundle_profile(bundle: Bundle) -> DriftProfile | None:
    """The bundle's drift reference profile, read from the stored bundle file.

    The member's sha256 is checked against the stored manifest; anything
    missing, oversized or damaged gives None (no reference to compare with).
    """
    return _profile(bundle.file_path, bundle.sha256, json.dumps(bundle.manifest or {}))


@lru_cache(maxsize=256)
def _profile(path: str, _bundle_sha: str, manifest_json: str) -> DriftProfile | None:
    files = json.loads(manifest_json).get("files", [])
    entry = next(
        (f for f in files if isinstance(f, Mapping) and f.get("role") == "drift_profile"), None
    )
    if entry is None or int(entry.get("size", 0)) > MAX_PROFILE_BYTES:
        return None
    raw: bytes | None = None
    try:
        with open(path, "rb") as f:
            for member in iter_members(f):
                if member.header.name == str(entry["path"]):
                    if member.header.size > MAX_PROFILE_BYTES:
                        return None
                    raw = member.read()
                    break
    except (OSError, BundleError):
        return None
    if raw is None:
        return None
    if hashlib.sha256(raw).hexdigest() != entry.get("sha256"):
        return None
    try:
        return DriftProfile.from_json(json.loads(raw))
    except (ValueError, KeyError, TypeError):
        return None


def reference_proportions(bundle: Bundle | None) -> dict[str, Sequence[float]]:
    """Feature name -> reference bin proportions, or {} without a usable profile."""
    profile = bundle_profile(bundle) if bundle is not None else None
    if profile is None:
        return {}
    return {f.name: f.proportions for f in profile.features}
