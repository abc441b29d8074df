"""What a wheel needs of the device: the oldest glibc and the Python it runs on.

A wheel's file name carries its tags (PEP 427: ``name-version[-build]-python-abi-platform``).
``manylinux_2_X_<arch>`` (and the legacy aliases ``manylinux1``, ``manylinux2010``,
``manylinux2014``) promise the wheel runs on glibc 2.X or newer; a wheel with several
platform tags runs wherever any one of them holds, so it needs the *lowest* of them.
``musllinux_*`` wheels need musl, not glibc; a plain ``linux_<arch>`` wheel promises nothing.

:func:`check_wheels` compares every wheel of an image with what its recipe declares and
returns one refusal per wheel the declared device could not run.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

_LEGACY_MANYLINUX = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}
_MANYLINUX = re.compile(r"^manylinux_(\d+)_(\d+)_")
_MUSL = re.compile(r"^musllinux_(\d+)_(\d+)_")
_CP = re.compile(r"^cp(\d)(\d+)$")
_PY = re.compile(r"^py(\d)(\d*)$")


@dataclass(frozen=True)
class WheelTags:
    """The tags of one wheel file name."""

    filename: str
    python: tuple[str, ...]
    abi: tuple[str, ...]
    platform: tuple[str, ...]


@dataclass(frozen=True)
class Incompatibility:
    """One wheel the declared device could not run, and why (``reason`` says it in full)."""

    wheel: str
    kind: str  # "glibc", "libc" or "python"
    needs: str
    declared: str
    reason: str


def parse_wheel_name(filename: str) -> WheelTags:
    """Split a wheel file name into its tag sets; raises ValueError for a non-wheel name."""
    if not filename.endswith(".whl"):
        raise ValueError(f"{filename} is not a wheel file name")
    parts = filename[: -len(".whl")].split("-")
    if len(parts) not in (5, 6):
        raise ValueError(f"{filename} is not a wheel file name (PEP 427)")
    py, abi, plat = parts[-3:]
    return WheelTags(filename, tuple(py.split(".")), tuple(abi.split(".")), tuple(plat.split(".")))


def parse_version(text: str) -> tuple[int, int]:
    """``"2.34"`` -> ``(2, 34)``; raises ValueError for anything else."""
    m = re.fullmatch(r"(\d+)\.(\d+)", text.strip())
    if not m:
        raise ValueError(f"{text!r} is not a MAJOR.MINOR version")
    return int(m.group(1)), int(m.group(2))


def _fmt(v: tuple[int, int]) -> str:
    return f"{v[0]}.{v[1]}"


def glibc_needed(tags: WheelTags) -> tuple[int, int] | None:
    """The oldest glibc the wheel runs on; None for a pure wheel (platform ``any``).

    Raises ValueError naming the tag when the wheel is not for glibc at all (musllinux)
    or promises nothing (``linux_<arch>``).
    """
    if tags.platform == ("any",):
        return None
    versions: list[tuple[int, int]] = []
    musl: list[str] = []
    for plat in tags.platform:
        m = _MANYLINUX.match(plat)
        if m:
            versions.append((int(m.group(1)), int(m.group(2))))
            continue
        legacy = plat.split("_", 1)[0]
        if legacy in _LEGACY_MANYLINUX:
            versions.append(_LEGACY_MANYLINUX[legacy])
            continue
        if _MUSL.match(plat):
            musl.append(plat)
    if versions:
        return min(versions)
    if musl:
        raise ValueError(f"built for musl libc ({musl[0]}), not glibc")
    raise ValueError(
        f"platform tag {'.'.join(tags.platform)} promises no glibc version (not a manylinux wheel)"
    )


def python_problem(tags: WheelTags, python: tuple[int, int]) -> str | None:
    """Why the wheel does not run on CPython ``python`` (None when it does)."""
    want = f"{python[0]}.{python[1]}"
    seen: list[str] = []
    for py in tags.python:
        m = _PY.match(py)
        if m:
            major, minor = int(m.group(1)), m.group(2)
            if major == python[0] and (not minor or int(minor) <= python[1]):
                return None
            seen.append(f"Python {major}{'.' + minor if minor else ''} ({py})")
            continue
        m = _CP.match(py)
        if not m:
            seen.append(f"another implementation ({py})")
            continue
        version = (int(m.group(1)), int(m.group(2)))
        if "abi3" in tags.abi and version[0] == python[0] and version <= python:
            return None
        if version == python:
            return None
        stable = " and newer (abi3)" if "abi3" in tags.abi else ""
        seen.append(f"Python {_fmt(version)}{stable} ({py}-{'.'.join(tags.abi)})")
    return f"built for {', '.join(seen)}, the recipe declares Python {want}"


def check_wheels(
    wheel_names: Iterable[str], *, glibc: str, python: str
) -> tuple[list[Incompatibility], dict[str, str]]:
    """Compare each wheel with the recipe's oldest glibc and its Python.

    Returns the refusals (empty when every wheel runs on the declared device) and, for each
    binary wheel, the glibc it needs (``"2.34"``), for the image's record.
    """
    declared_glibc = parse_version(glibc)
    declared_python = parse_version(python)
    problems: list[Incompatibility] = []
    needs: dict[str, str] = {}
    for name in sorted(wheel_names):
        tags = parse_wheel_name(name)
        why_python = python_problem(tags, declared_python)
        if why_python:
            problems.append(
                Incompatibility(
                    name, "python", "", python, f"wheel {name} needs another Python: {why_python}"
                )
            )
        try:
            need = glibc_needed(tags)
        except ValueError as e:
            problems.append(
                Incompatibility(
                    name,
                    "libc",
                    "",
                    glibc,
                    f"wheel {name} cannot be checked against glibc {glibc}: {e}",
                )
            )
            continue
        if need is None:
            continue
        needs[name] = _fmt(need)
        if need > declared_glibc:
            problems.append(
                Incompatibility(
                    name,
                    "glibc",
                    _fmt(need),
                    glibc,
                    f"wheel {name} needs glibc {_fmt(need)} or newer, but the recipe declares "
                    f"the class's oldest glibc as {glibc}",
                )
            )
    return problems, needs
