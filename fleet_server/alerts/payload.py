"""The webhook body of an alert, and where the window's sampled inputs can be fetched.

The body is plain JSON, one object per alert (firing or resolved)::

    {"id": 17, "alert": "gateways-drift", "rule_id": "ar-…", "kind": "drift",
     "status": "firing" | "resolved", "group": "gateways", "model": "m" | null,
     "figure": "drift_psi", "value": 0.41, "threshold": 0.2, "clear_threshold": 0.16,
     "comparison": "above" | "below",
     "window": {"start": "2026-12-02T02:00:00Z", "end": "…", "seconds": 600},
     "figures": {"inferences": 1200, "errors": 3, "drift_psi": 0.41, …},
     "samples": {"count": 12, "export_url": "https://…/api/v1/samples/export?…",
                 "export_command": "edgefleet samples export --model m --group gateways …"},
     "at": "2026-12-02T02:10:00Z"}

``samples`` names the window's sampled inputs and outputs (the starting point of a
retraining run): the admin API URL streams them as Parquet (it needs an operator token),
the command does the same from a shell.
"""

from __future__ import annotations

import math
import shlex
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlencode

from fleet_server.alerts.rules import Figure, Rule, Transition

EXPORT_PATH = "/api/v1/samples/export"


def iso(ts: float, *, up: bool = False) -> str:
    """UNIX seconds as RFC 3339 UTC at second precision (rounded up if ``up``)."""
    whole = math.ceil(ts) if up else math.floor(ts)
    return datetime.fromtimestamp(whole, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def samples_location(
    public_url: str, group: str, model: str | None, since: float, until: float
) -> dict[str, str]:
    """The export URL and command for ``model``'s samples from ``group`` in the window."""
    lo, hi = iso(since), iso(until, up=True)
    params = {"group": group, "since": lo, "until": hi}
    if model is not None:
        params = {"model": model, **params}
    url = f"{public_url.rstrip('/')}{EXPORT_PATH}?{urlencode(params)}"
    stamp = lo.replace(":", "").replace("-", "")
    out = f"samples-{group}-{model or 'all'}-{stamp}.parquet"
    args = ["edgefleet", "samples", "export"]
    if model is not None:
        args += ["--model", model]
    args += ["--group", group, "--since", lo, "--until", hi, "--out", out]
    return {"export_url": url, "export_command": " ".join(shlex.quote(a) for a in args)}


def _clean(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def alert_payload(
    rule: Rule,
    transition: Transition,
    figure: Figure,
    now: float,
    *,
    public_url: str = "",
    samples: int = 0,
) -> dict[str, Any]:
    """The webhook body (without ``id``, which the database assigns)."""
    since = now - rule.window_seconds
    return {
        "alert": rule.name,
        "rule_id": rule.id,
        "kind": rule.kind.value,
        "status": transition.value,
        "group": rule.group,
        "model": rule.model,
        "figure": rule.kind.figure,
        "value": _clean(figure.value),
        "threshold": rule.threshold,
        "clear_threshold": rule.clear_threshold,
        "comparison": "below" if rule.kind.below else "above",
        "window": {"start": iso(since), "end": iso(now, up=True), "seconds": rule.window_seconds},
        "figures": {k: _clean(v) for k, v in figure.details.items()},
        "samples": {
            "count": samples,
            **samples_location(public_url, rule.group, rule.model, since, now),
        },
        "at": iso(now),
    }


__all__ = ["EXPORT_PATH", "alert_payload", "iso", "samples_location"]
