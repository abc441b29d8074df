"""Parse the review period: relative spans (``24h``, ``90m``, ``7d``) or ISO 8601 times."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

from fleet_server.report.errors import TimeRangeError

_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
_SPAN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")


def parse_time(value: str, *, now: datetime, what: str = "time") -> datetime:
    """``"now"``, a span before ``now`` (``"24h"``) or an ISO 8601 time (UTC if naive)."""
    text = value.strip()
    if text.lower() == "now":
        return now
    m = _SPAN.match(text.lower())
    if m:
        return now - timedelta(**{_UNITS[m.group(2)]: float(m.group(1))})
    try:
        ts = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as e:
        raise TimeRangeError(
            f"{what} {value!r} is neither a span like 24h, 90m, 7d nor an ISO 8601 time "
            "like 2026-11-21T08:00:00Z"
        ) from e
    return ts.replace(tzinfo=timezone.utc) if ts.tzinfo is None else ts.astimezone(timezone.utc)


def parse_range(since: str, until: str, *, now: datetime) -> tuple[datetime, datetime]:
    """The period ``since`` .. ``until``; a span in ``since`` counts back from ``until``.

    Refuses an empty or inverted period.
    """
    hi = parse_time(until, now=now, what="--until")
    lo = parse_time(since, now=hi, what="--since")
    if lo >= hi:
        raise TimeRangeError(
            f"the period is empty: --since {since!r} ({lo.isoformat()}) is not before "
            f"--until {until!r} ({hi.isoformat()})"
        )
    return lo, hi
