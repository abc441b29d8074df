"""Build the :class:`~device_agent.bundle.verify.Expectation` for the next bundle from
what is on the device: the slots' manifests, the per-model floors and the device class.

The verifier stays pure; this module does the reading."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

from ..bundle.manifest import MANIFEST_NAME, Manifest
from ..bundle.verify import Expectation

SLOT_NAMES = ("a", "b")


def installed_digests(slots_root: Path) -> dict[str, tuple[tuple[int, str], ...]]:
    """Per model name, ``(version, sha256 of manifest.json)`` of each slot's bundle."""
    out: dict[str, list[tuple[int, str]]] = {}
    for slot in SLOT_NAMES:
        try:
            data = (slots_root / slot / MANIFEST_NAME).read_bytes()
            m = Manifest.from_bytes(data)
        except Exception:  # noqa: BLE001 - an empty or unreadable slot holds nothing
            continue
        out.setdefault(m.name, []).append((m.version, hashlib.sha256(data).hexdigest()))
    return {k: tuple(v) for k, v in out.items()}


def expectation(
    *,
    slots_root: Path,
    model_name: str | None,
    device_class: str | None,
    floors: Mapping[str, int],
) -> Expectation:
    """The expectation for a bundle destined to the slot that runs ``model_name``
    (None: an empty slot, or an operator's local install, where any name may come)."""
    return Expectation(
        model_name=model_name,
        device_class=device_class,
        floors=dict(floors),
        installed=installed_digests(slots_root),
    )
