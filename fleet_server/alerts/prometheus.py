"""The alert rules as a Prometheus alerting-rules file, over the server's own /metrics.

Each rule becomes one Prometheus alert on ``edgefleet_alert_figure`` (the figure the
server judged in its last round, labelled by figure, group, model and window), with the
same hysteresis as the server: it fires past ``threshold`` and, once firing, stays
firing until the figure comes back past ``clear_threshold``::

    edgefleet_alert_figure{…} > 0.2
      or (edgefleet_alert_figure{…} > 0.16
          and on (figure, group, model, window) ALERTS{alertname="…", alertstate="firing"})

Annotations carry the ``samples export`` command and the API URL (from the ``public_url``
setting) of the rule's last window. The series is absent while a window holds too little
data, so Prometheus resolves such an alert where the server keeps it firing until it sees
evidence.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Sequence
from urllib.parse import urlencode

from fleet_server.alerts.payload import EXPORT_PATH
from fleet_server.alerts.rules import Rule

_NOT_NAME = re.compile(r"[^A-Za-z0-9_]")


def alert_name(rule: Rule) -> str:
    """A valid Prometheus alert name for ``rule`` (letters, digits and ``_``)."""
    return "edgefleet_" + _NOT_NAME.sub("_", rule.name)


def window_label(seconds: float) -> str:
    return f"{round(seconds)}s"


def selector(rule: Rule) -> str:
    labels = {
        "figure": rule.kind.figure,
        "group": rule.group,
        "model": rule.model or "",
        "window": window_label(rule.window_seconds),
    }
    inner = ",".join(f"{k}={json.dumps(v)}" for k, v in labels.items())
    return f"edgefleet_alert_figure{{{inner}}}"


def _num(x: float) -> str:
    return repr(float(x))


def expression(rule: Rule) -> str:
    """The PromQL of ``rule``: a breach, or still not cleared while firing."""
    op = "<" if rule.kind.below else ">"
    clear_op = "<" if rule.kind.below else ">"
    sel = selector(rule)
    firing = f'ALERTS{{alertname="{alert_name(rule)}",alertstate="firing"}}'
    return (
        f"{sel} {op} {_num(rule.threshold)} or ({sel} {clear_op} {_num(rule.clear_threshold)} "
        f"and on (figure, group, model, window) {firing})"
    )


def _q(s: str) -> str:
    return json.dumps(s)  # a JSON string is a valid double-quoted YAML scalar


def prometheus_rules(rules: Sequence[Rule], *, public_url: str = "") -> str:
    """The YAML text of one rule group, ``edgefleet``, holding every rule."""
    lines = [
        "# edgefleet alert rules over the server's /metrics (edgefleet alerts prometheus-rules)"
    ]
    lines += ["groups:", "  - name: edgefleet", "    rules:"]
    if not rules:
        lines[-1] = "    rules: []"
    for r in rules:
        model = ["--model", r.model] if r.model else []
        args = ["edgefleet", "samples", "export", *model, "--group", r.group]
        args += ["--since", window_label(r.window_seconds), "--until", "now"]
        export = " ".join(shlex.quote(a) for a in [*args, "--out", "samples.parquet"])
        query = {"model": r.model} if r.model else {}
        query.update(group=r.group, since=window_label(r.window_seconds), until="now")
        url = f"{public_url.rstrip('/')}{EXPORT_PATH}?{urlencode(query)}"
        what = f"{r.kind.figure} of {r.model + ' in ' if r.model else ''}group {r.group}"
        comparison = "below" if r.kind.below else "above"
        lines += [
            f"      - alert: {alert_name(r)}",
            f"        expr: {_q(expression(r))}",
            f"        for: {round(r.for_seconds)}s",
            "        labels:",
            f"          edgefleet_rule: {_q(r.name)}",
            f"          kind: {_q(r.kind.value)}",
            "          severity: warning",
            "        annotations:",
            f"          summary: {_q(f'{what} is {comparison} {r.threshold}')}",
            "          description: "
            + _q(
                f"{what} over the last {window_label(r.window_seconds)} is {{{{ $value }}}} "
                f"({comparison} {r.threshold}; clears at {r.clear_threshold})"
            ),
            f"          samples: {_q(export)}",
            f"          samples_url: {_q(url)}",
        ]
    return "\n".join(lines) + "\n"


__all__ = ["alert_name", "expression", "prometheus_rules", "selector", "window_label"]
