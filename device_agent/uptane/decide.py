"""The Uptane decision, pure: which bundles may this device install, given the director's
targets for it and the image repository's released targets.

Nothing here does I/O; TUF has already verified both metadata sets (signatures,
thresholds, versions, expiry) before this runs.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import (
    BadInstructionError,
    DirectorImageMismatchError,
    NotReleasedError,
    ReleaseRollbackError,
    WrongDeviceClassInstructionError,
    WrongDeviceError,
    WrongModelInstructionError,
)

ROLES = ("desired", "shadow")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class Target:
    """What a TUF targets entry says, in plain data (path, length, sha256, custom)."""

    path: str
    length: int
    sha256: str
    custom: Mapping[str, Any]


@dataclass(frozen=True)
class Instruction:
    """One bundle this device must run, agreed by both repositories."""

    role: str  # "desired" | "shadow"
    name: str
    version: int
    release_counter: int
    path: str
    sha256: str
    length: int


def _fields(t: Target, where: str) -> Mapping[str, Any]:
    f = t.custom.get("edgefleet") if isinstance(t.custom, Mapping) else None
    if not isinstance(f, Mapping):
        raise BadInstructionError(f"{where} target {t.path!r} has no 'edgefleet' custom fields")
    return f


def _int(v: Any, what: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise BadInstructionError(f"{what} must be a non-negative integer, not {v!r:.60}")
    return v


def _str(v: Any, what: str) -> str:
    if not isinstance(v, str) or not _NAME.match(v):
        raise BadInstructionError(f"{what} must be a name, not {v!r:.60}")
    return v


def decide(
    director: list[Target],
    released: Callable[[str], Target | None],
    *,
    device_id: str,
    device_class: str,
    floors: Mapping[str, int],
    active_name: str | None,
    models: Collection[str] = (),
) -> list[Instruction]:
    """The instructions both repositories agree on, or the first refusal (raised).

    * every director target is bound to this device id and class (``wrong_device``,
      ``wrong_device_class``: one device's instructions replayed to another);
    * the image repository lists the same path (``not_released``) with the same sha256 and
      length (``director_image_mismatch``);
    * the release is of the model the director names and, when the device already runs a
      model, of that model (``wrong_model``), for this device class, at or above the floor
      of its model name (``rollback``);
    * at most one target per role (per role and model name on a device running several
      ``models``; there every release must be of one of them, ``wrong_model``).
    """
    out: list[Instruction] = []
    for d in director:
        fd = _fields(d, "director")
        if fd.get("device_id") != device_id:
            raise WrongDeviceError(
                f"director instruction {d.path!r} is for device {fd.get('device_id')!r:.80}, "
                f"not {device_id!r}: instructions replayed from another device are refused"
            )
        if fd.get("device_class") != device_class:
            raise WrongDeviceClassInstructionError(
                f"director instruction {d.path!r} is for class {fd.get('device_class')!r:.80}, "
                f"this device is {device_class!r}"
            )
        role = fd.get("role", "desired")
        name = _str(fd.get("name"), "director name")
        if role not in ROLES or any(i.role == role and (not models or i.name == name) for i in out):
            raise BadInstructionError(f"director role {role!r:.40} is unknown or repeated")
        img = released(d.path)
        if img is None:
            raise NotReleasedError(
                f"the director names {d.path!r}, which the image repository does not list: it "
                "was never released (signed by the release keys). Release it with "
                "`edgefleet release sign`"
            )
        if img.length != d.length or not hmac.compare_digest(img.sha256, d.sha256):
            raise DirectorImageMismatchError(
                f"director and image repository disagree on {d.path!r} (length {d.length} vs "
                f"{img.length}, sha256 {d.sha256[:16]}… vs {img.sha256[:16]}…); refused"
            )
        if not _HEX64.match(img.sha256):
            raise BadInstructionError(f"target {d.path!r} has no sha256")
        fi = _fields(img, "image")
        iname = _str(fi.get("name"), "image name")
        version = _int(fi.get("version"), "image version")
        counter = _int(fi.get("release_counter"), "image release_counter")
        classes = fi.get("device_classes")
        if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
            raise BadInstructionError(f"image target {d.path!r}: device_classes must be a list")
        about = {"name": iname, "version": version, "sha256": img.sha256}
        if models and (iname != name or iname not in models):
            raise WrongModelInstructionError(
                f"release {d.path!r} is model {iname!r}; the director says {name!r} and this "
                f"device runs {', '.join(sorted(models))}: a slot never changes model name",
                about=about,
            )
        if iname != name or (not models and active_name is not None and iname != active_name):
            raise WrongModelInstructionError(
                f"release {d.path!r} is model {iname!r}; the director says {name!r} and this "
                f"device runs {active_name!r}: a slot never changes model name",
                about=about,
            )
        if classes and device_class not in classes:
            raise WrongDeviceClassInstructionError(
                f"release {d.path!r} is for {', '.join(classes)}, not this {device_class!r} device",
                about=about,
            )
        floor = floors.get(iname)
        if floor is not None and counter < floor:
            raise ReleaseRollbackError(
                f"release {iname} v{version} has release counter {counter}, below this "
                f"device's floor {floor} for {iname}: the release keys retired it",
                about=about,
            )
        out.append(Instruction(role, iname, version, counter, d.path, img.sha256, img.length))
    return out
