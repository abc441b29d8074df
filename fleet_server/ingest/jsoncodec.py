"""JSON for the ingestion hot path: orjson when installed, the standard library otherwise.

Messages are decoded and validated by the contract's one pass (:mod:`.contract`); a codec
encodes the JSON columns built from the validated records (count lists, drift counts) and
decodes the raw bodies kept for event and sample rows. Both codecs produce equal rows
(tested); orjson only makes it faster (about 8x for encoding the small count lists).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Codec:
    """``loads`` raises ValueError on bad JSON; ``dumps`` returns text or raises ValueError."""

    name: str
    loads: Callable[[bytes], Any]
    dumps: Callable[[Any], str]


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
