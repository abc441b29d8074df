"""JSON for the ingestion hot path: orjson when installed, the standard library otherwise.

Both codecs produce equal rows (tested); orjson only makes ingestion faster
(about 1.7x for decoding batches, 8x for encoding the small count lists).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_INT_LIST = re.compile(r"\[(?:-?\d+(?:, ?-?\d+)*)?\]")


@dataclass(frozen=True)
class Codec:
    """``loads`` raises ValueError on bad JSON; ``dumps`` returns text or raises ValueError."""

    name: str
    loads: Callable[[bytes], Any]
    dumps: Callable[[Any], str]

    def int_list(self, x: Any) -> str | None:
        """``x`` as JSON text if it is a list of integers (no bools, floats, strings).

        Encoding first and matching the text is the fast check in CPython: one
        C-level pass instead of an ``isinstance`` per element.
        """
        if type(x) is not list:
            return None
        try:
            text = self.dumps(x)
        except (ValueError, TypeError):
            return None
        return text if _INT_LIST.fullmatch(text) else None


def _std_dumps(x: Any) -> str:
    return json.dumps(x, allow_nan=False)


STDLIB = Codec("json", json.loads, _std_dumps)

try:
    import orjson

    def _fast_dumps(x: Any) -> str:
        try:
            return orjson.dumps(x).decode()
        except TypeError as e:  # e.g. an integer beyond 64 bits
            raise ValueError(str(e)) from e

    FAST: Codec | None = Codec("orjson", orjson.loads, _fast_dumps)
except ImportError:  # pragma: no cover - depends on the installation
    FAST = None

DEFAULT = FAST or STDLIB
