"""Structured logs: one JSON object per line.

Each line carries ``ts`` (Unix seconds), ``level``, ``logger``, ``msg`` and
every ``extra={...}`` field given at the call site; an exception adds ``exc``.
Values that are not JSON (paths, enums) are written with ``str()``.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any, TextIO

#: attributes every LogRecord has; anything else came from ``extra=``
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object (no newlines inside)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, separators=(",", ":"))


def setup_logging(level: str = "INFO", stream: TextIO | None = None) -> logging.Handler:
    """Send all logs to ``stream`` (stderr) as JSON lines at ``level``; returns the handler."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"log level {level!r} is not one of DEBUG, INFO, WARNING, ERROR")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_edgefleet", False):
            root.removeHandler(h)
    handler._edgefleet = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(numeric)
    return handler
