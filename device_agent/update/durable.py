"""Loading the update path's durable state files safely.

Every JSON file the agent keeps in its state directory (``update.json``,
``active.json``, ``shadow.json``, ``floors.json``) is validated against its
schema when loaded. A file that does not parse or does not validate is never
trusted and never fatal: when the caller may repair (it holds the update lock),
the file is moved aside as ``<name>.invalid-<UTC time>`` so a person can look
at it later, a :class:`Quarantined` note is kept for the report to the server,
and the caller continues from its safest state. Readers that must not change
anything (``edgefleet-agent status``) get ``None`` instead.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: largest state file the agent reads; anything bigger is invalid (they are a few KiB)
MAX_STATE_FILE_BYTES = 1024 * 1024


class StateFileError(ValueError):
    """A durable state file is not what its schema describes."""

    code = "state_file_invalid"


@dataclass(frozen=True)
class Quarantined:
    """A state file that was found invalid and moved aside."""

    file: str
    moved_to: str | None
    reason: str

    def to_report(self) -> dict[str, Any]:
        return {"file": self.file, "moved_to": self.moved_to, "reason": self.reason[:500]}


def read_json(path: Path) -> Any:
    """The decoded JSON of ``path``; ``None`` if it does not exist.

    Raises :class:`StateFileError` for an unreadable, oversized or non-JSON file.
    """
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_STATE_FILE_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StateFileError(f"cannot read {path.name}: {e}") from e
    if len(data) > MAX_STATE_FILE_BYTES:
        raise StateFileError(f"{path.name} is larger than {MAX_STATE_FILE_BYTES} bytes")
    try:
        return json.loads(data.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise StateFileError(f"{path.name} is not valid JSON: {type(e).__name__}: {e}") from e


def _no_constant(text: str) -> Any:
    raise ValueError(f"{text} is not allowed")


def quarantine(path: Path, reason: str, now: Callable[[], float] = time.time) -> Quarantined:
    """Move ``path`` aside as ``<name>.invalid-<UTC time>``; delete it if that fails."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now()))
    target = path.with_name(f"{path.name}.invalid-{stamp}")
    n = 1
    while target.exists():
        target = path.with_name(f"{path.name}.invalid-{stamp}-{n}")
        n += 1
    moved: str | None = str(target)
    try:
        os.replace(path, target)
    except FileNotFoundError:
        moved = None
    except OSError as e:  # cannot keep a copy: the file must still go
        log.error("cannot move %s aside (%s); deleting it", path, e)
        moved = None
        try:
            path.unlink()
        except OSError:
            log.error("cannot delete invalid state file %s", path)
    log.error(
        "state file invalid; moved aside, continuing from the safest state",
        extra={"file": path.name, "moved_to": moved, "reason": reason},
    )
    return Quarantined(file=path.name, moved_to=moved, reason=reason)


# -- schema helpers --------------------------------------------------------------------


def want_dict(obj: Any, what: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise StateFileError(f"{what} must be a JSON object, not {type(obj).__name__}")
    return obj


def want_str(obj: Any, what: str, *, optional: bool = False, max_len: int = 4096) -> Any:
    if obj is None and optional:
        return None
    if not isinstance(obj, str) or len(obj) > max_len:
        raise StateFileError(f"{what} must be a string, not {obj!r:.80}")
    return obj


def want_int(obj: Any, what: str, *, optional: bool = False) -> Any:
    if obj is None and optional:
        return None
    if not isinstance(obj, int) or isinstance(obj, bool) or not 0 <= obj < 2**63:
        raise StateFileError(f"{what} must be a non-negative integer, not {obj!r:.80}")
    return obj


def want_number(obj: Any, what: str, *, optional: bool = False) -> Any:
    if obj is None and optional:
        return None
    if (
        not isinstance(obj, (int, float))
        or isinstance(obj, bool)
        or not math.isfinite(obj)
        or obj < 0
    ):
        raise StateFileError(f"{what} must be a finite non-negative number, not {obj!r:.80}")
    return float(obj)


def want_bool(obj: Any, what: str) -> bool:
    if not isinstance(obj, bool):
        raise StateFileError(f"{what} must be true or false, not {obj!r:.80}")
    return obj


def want_choice(obj: Any, what: str, choices: tuple[str, ...], *, optional: bool = False) -> Any:
    if obj is None and optional:
        return None
    if obj not in choices:
        raise StateFileError(f"{what} must be one of {choices}, not {obj!r:.80}")
    return obj


def want_str_map(obj: Any, what: str, *, max_items: int = 1024) -> dict[str, str]:
    d = want_dict(obj, what)
    if len(d) > max_items or not all(isinstance(v, str) for v in d.values()):
        raise StateFileError(f"{what} must map strings to strings")
    return dict(d)
