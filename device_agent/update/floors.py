"""The anti-rollback floor: the lowest version of each model name the device accepts.

``floors.json`` (``{"schema_version": 1, "floors": {"<model name>": <version>}}``)
lives beside ``active.json`` but is a record of its own, so losing or corrupting
the active pointer never lowers the floor. Invariants:

* a floor only rises (:meth:`Floors.raise_to`); nothing in the agent lowers it;
* it is raised when a version is committed (probation passed, or a local install);
* it can be re-derived from the slots: every slot whose bundle verifies puts its
  version under the floor of its name (:meth:`Floors.merge`), which the updater
  does at every start, so a missing or invalid ``floors.json`` is rebuilt and an
  older device that never had one gets one;
* floors are kept per model name, ready for several models on one device.

    floors = Floors(state_dir)
    floors.get("tiny")          # -> 3, or None if never installed
    floors.raise_to("tiny", 4)  # durable (temp file, fsync, rename)
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

from .._fsutil import atomic_write_bytes
from .durable import Quarantined, StateFileError, quarantine, read_json, want_dict, want_int

SCHEMA_VERSION = 1
FILE_NAME = "floors.json"
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MAX_MODELS = 256


def parse_floors(obj: object) -> dict[str, int]:
    """Validate the content of ``floors.json``."""
    d = want_dict(obj, FILE_NAME)
    if d.get("schema_version") != SCHEMA_VERSION:
        raise StateFileError(f"{FILE_NAME} schema_version must be {SCHEMA_VERSION}")
    floors = want_dict(d.get("floors"), f"{FILE_NAME} floors")
    if len(floors) > MAX_MODELS:
        raise StateFileError(f"{FILE_NAME} lists more than {MAX_MODELS} models")
    out: dict[str, int] = {}
    for name, version in floors.items():
        if not _MODEL_NAME.match(name):
            raise StateFileError(f"{FILE_NAME}: {name!r:.80} is not a model name")
        out[name] = want_int(version, f"{FILE_NAME} floors.{name}")
    return out


class Floors:
    """Per-model-name anti-rollback floors in ``<state_dir>/floors.json``."""

    def __init__(self, state_dir: str | Path, *, repair: bool = False) -> None:
        """``repair``: move an invalid file aside (only under the update lock)."""
        self.path = Path(state_dir) / FILE_NAME
        self.repair = repair
        self.quarantined: list[Quarantined] = []
        self._floors: dict[str, int] | None = None

    def _load(self) -> dict[str, int]:
        if self._floors is None:
            try:
                obj = read_json(self.path)
                self._floors = {} if obj is None else parse_floors(obj)
            except StateFileError as e:
                if self.repair:
                    self.quarantined.append(quarantine(self.path, str(e)))
                self._floors = {}
        return self._floors

    def reload(self) -> None:
        """Forget the cached floors; the next read loads the file again."""
        self._floors = None

    def get(self, name: str) -> int | None:
        """The floor for model ``name``: no version below it installs. None: no floor."""
        return self._load().get(name)

    def all(self) -> dict[str, int]:
        """Every model name's floor."""
        return dict(self._load())

    def raise_to(self, name: str, version: int) -> bool:
        """Raise ``name``'s floor to ``version`` (durably); never lowers. True if raised."""
        return self.merge({name: version})

    def merge(self, versions: Mapping[str, int]) -> bool:
        """Raise each name's floor to at least the given version; True if any rose."""
        floors = self._load()
        changed = {
            n: v for n, v in versions.items() if _MODEL_NAME.match(n) and v > floors.get(n, -1)
        }
        missing_file = not self.path.exists()
        if not changed and not (missing_file and floors):
            return False
        new = {**floors, **changed}
        body = {"schema_version": SCHEMA_VERSION, "floors": dict(sorted(new.items()))}
        atomic_write_bytes(self.path, json.dumps(body, sort_keys=True).encode())
        self._floors = new
        return bool(changed)
