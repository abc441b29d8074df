"""``edgefleet alerts``: alert rules per group and model, the alerts raised, and the
rules as a Prometheus alerting-rules file.

The server evaluates the rules every ``alert_interval_seconds`` (30 s by default), fires
past the threshold and resolves past the clear threshold (hysteresis), writes every
alert to the audit log and POSTs it to the rule's webhooks (JSON, retried with backoff).
"""

from __future__ import annotations

from typing import Any

import click

from fleet_server.alerts.rules import DESCRIPTIONS, Kind
from fleet_server.cli.api import ApiClient, api_options, out, paged, readable_time
from fleet_server.client import ApiError

RULE_COLUMNS = (
    "name",
    "kind",
    "group",
    "model",
    "threshold",
    "clear_threshold",
    "window_seconds",
    "status",
    "value",
    "webhooks",
)
ALERT_COLUMNS = ("id", "at", "status", "rule", "group", "model", "value", "threshold", "delivery")

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def seconds(value: str) -> float:
    """``600``, ``90s``, ``10m``, ``2h`` or ``1d`` as seconds."""
    text = value.strip().lower()
    try:
        if text and text[-1] in _UNITS:
            return float(text[:-1]) * _UNITS[text[-1]]
        return float(text)
    except ValueError as e:
        raise click.BadParameter(f"{value!r} is not a duration like 600, 90s, 10m, 2h") from e


class Duration(click.ParamType):
    name = "duration"

    def convert(self, value: Any, param: Any, ctx: Any) -> float:
        return value if isinstance(value, float) else seconds(str(value))


KIND_HELP = "; ".join(f"{k.value}: {d}" for k, d in DESCRIPTIONS.items())


@click.group()
def alerts() -> None:
    """Alert rules on drift, errors, latency, accuracy, silent or stale devices and
    lost records; the alerts they raised; their Prometheus rules file."""


@alerts.group("rules")
def rules() -> None:
    """Alert rules (per group, and per model for model figures)."""


def _rule_options(f: Any) -> Any:
    f = click.option(
        "--webhook",
        "webhooks",
        multiple=True,
        metavar="URL",
        help="POST each alert here as JSON (repeat for several).",
    )(f)
    f = click.option(
        "--min-samples",
        type=click.IntRange(0),
        help="Inferences (labelled ones for accuracy) a window needs to be judged "
        "(default 100 for model figures, 0 otherwise).",
    )(f)
    f = click.option(
        "--for",
        "for_seconds",
        type=Duration(),
        help="Fire only after the breach lasted this long (default 0: at once).",
    )(f)
    f = click.option(
        "--window", type=Duration(), help="Window the figure covers, e.g. 10m (default 10m)."
    )(f)
    f = click.option(
        "--clear",
        "clear_threshold",
        type=float,
        help="Resolve only past this value (default: 80% of the threshold; for accuracy "
        "a fifth of the way to 1).",
    )(f)
    return f


@rules.command("create")
@click.argument("name")
@click.option(
    "--kind",
    required=True,
    type=click.Choice([k.value for k in Kind]),
    help=f"What to watch. {KIND_HELP}.",
)
@click.option("--group", required=True, help="Group name or id.")
@click.option("--model", help="Model name (needed for drift, error_rate, latency_p99, accuracy).")
@click.option(
    "--threshold",
    required=True,
    type=float,
    help="Fire past this value (PSI, a rate 0-1, ms, an accuracy 0-1, or a count).",
)
@_rule_options
@click.option("--disabled", is_flag=True, help="Create it without evaluating it yet.")
@api_options
def rules_create(
    api: ApiClient,
    as_json: bool,
    name: str,
    kind: str,
    group: str,
    model: str | None,
    threshold: float,
    clear_threshold: float | None,
    window: float | None,
    for_seconds: float | None,
    min_samples: int | None,
    webhooks: tuple[str, ...],
    disabled: bool,
) -> None:
    """Create alert rule NAME."""
    body: dict[str, Any] = {
        "name": name,
        "kind": kind,
        "group": group,
        "model": model,
        "threshold": threshold,
        "webhooks": list(webhooks),
        "enabled": not disabled,
    }
    optional = {
        "clear_threshold": clear_threshold,
        "window_seconds": window,
        "for_seconds": for_seconds,
        "min_samples": min_samples,
    }
    body.update({k: v for k, v in optional.items() if v is not None})
    out(api.request("POST", "/alerts/rules", json=body), as_json, RULE_COLUMNS)


@rules.command("update")
@click.argument("name")
@click.option("--threshold", type=float, help="New threshold (moves --clear to its default).")
@_rule_options
@click.option("--no-webhooks", is_flag=True, help="Deliver to no webhook.")
@click.option("--enable/--disable", "enabled", default=None, help="Evaluate it or not.")
@api_options
def rules_update(
    api: ApiClient,
    as_json: bool,
    name: str,
    threshold: float | None,
    clear_threshold: float | None,
    window: float | None,
    for_seconds: float | None,
    min_samples: int | None,
    webhooks: tuple[str, ...],
    no_webhooks: bool,
    enabled: bool | None,
) -> None:
    """Change alert rule NAME (only the options given)."""
    body: dict[str, Any] = {
        "threshold": threshold,
        "clear_threshold": clear_threshold,
        "window_seconds": window,
        "for_seconds": for_seconds,
        "min_samples": min_samples,
        "enabled": enabled,
    }
    if webhooks or no_webhooks:
        body["webhooks"] = list(webhooks)
    body = {k: v for k, v in body.items() if v is not None}
    if not body:
        raise click.UsageError("nothing to change: give at least one option")
    out(api.request("PATCH", f"/alerts/rules/{name}", json=body), as_json, RULE_COLUMNS)


@rules.command("list")
@paged
@api_options
def rules_list(api: ApiClient, as_json: bool, limit: int, offset: int) -> None:
    """Every rule with the status and value of its last evaluation."""
    out(
        api.request("GET", "/alerts/rules", params={"limit": limit, "offset": offset}),
        as_json,
        RULE_COLUMNS,
    )


@rules.command("show")
@click.argument("name")
@api_options
def rules_show(api: ApiClient, as_json: bool, name: str) -> None:
    """One rule (name or id), its settings and its last evaluation."""
    r = api.request("GET", f"/alerts/rules/{name}")
    if as_json:
        out(r, True)
        return
    for k in (*RULE_COLUMNS, "for_seconds", "min_samples", "enabled", "no_data"):
        click.echo(f"{k:>16}: {r.get(k) if r.get(k) not in (None, []) else '-'}")
    click.echo(f"{'evaluated_at':>16}: {readable_time(r.get('evaluated_at'))}")


@rules.command("delete")
@click.argument("name")
@api_options
def rules_delete(api: ApiClient, as_json: bool, name: str) -> None:
    """Delete rule NAME (its alerts stay in the history and the audit log)."""
    api.request("DELETE", f"/alerts/rules/{name}")
    click.echo(f"deleted alert rule {name}")


@alerts.command("list")
@click.option("--rule", help="Only this rule's alerts (name or id).")
@click.option("--group", help="Only this group's alerts.")
@click.option("--status", type=click.Choice(["firing", "resolved"]), help="Only these.")
@paged
@api_options
def alerts_list(
    api: ApiClient,
    as_json: bool,
    rule: str | None,
    group: str | None,
    status: str | None,
    limit: int,
    offset: int,
) -> None:
    """Alerts raised and resolved, newest first, with their webhook delivery."""
    params: dict[str, Any] = {"limit": limit, "offset": offset}
    params.update({k: v for k, v in {"rule": rule, "group": group, "status": status}.items() if v})
    data = api.request("GET", "/alerts", params=params)
    for a in data["items"]:
        a["at"] = readable_time(a["ts"])
    out(data, as_json, ALERT_COLUMNS)
    if not as_json:
        for a in data["items"]:
            if a["status"] == "firing":
                cmd = (a.get("payload") or {}).get("samples", {}).get("export_command")
                if cmd:
                    click.echo(f"alert {a['id']}: samples of its window: {cmd}")


@alerts.command("evaluate")
@api_options
def alerts_evaluate(api: ApiClient, as_json: bool) -> None:
    """Evaluate every rule now (the server also does every alert_interval_seconds)."""
    raised = api.request("POST", "/alerts/evaluate")
    if as_json:
        out(raised, True)
        return
    if not raised:
        click.echo("no rule changed status")
    for a in raised:
        click.echo(
            f"{a['status']}: {a['alert']} ({a['figure']} = {a['value']}, "
            f"threshold {a['threshold']})"
        )


@alerts.command("prometheus-rules")
@api_options
def alerts_prometheus_rules(api: ApiClient, as_json: bool) -> None:
    """Print the enabled rules as a Prometheus alerting-rules file
    (``edgefleet alerts prometheus-rules > rules.yml``; check it with
    ``promtool check rules rules.yml``)."""
    try:
        text = api.get_text("/alerts/prometheus-rules")
    except ApiError as e:
        raise click.ClickException(str(e)) from e
    click.echo(text, nl=False)
