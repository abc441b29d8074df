"""Operator commands over the admin API (``--url``/``--token``, or EDGEFLEET_URL/EDGEFLEET_TOKEN).

They only parse arguments, call the API with httpx and print the answer; an
API error is printed as ``error [code]: message`` with exit status 1.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click

from fleet_server.client import AdminClient, ApiError

F = TypeVar("F", bound=Callable[..., Any])


class ApiClient(AdminClient):
    """The admin API client for CLI commands: API errors become :class:`click.ClickException`."""

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            return super().request(method, path, **kwargs)
        except ApiError as e:
            raise click.ClickException(e.message if e.code == "unreachable" else str(e)) from e


def api_options(f: F) -> F:
    f = click.option(
        "--token",
        envvar="EDGEFLEET_TOKEN",
        required=True,
        help="Operator token (env EDGEFLEET_TOKEN).",
    )(f)
    f = click.option(
        "--url",
        envvar="EDGEFLEET_URL",
        default="http://127.0.0.1:8000",
        show_default=True,
        help="Server URL (env EDGEFLEET_URL).",
    )(f)
    f = click.option("--json", "as_json", is_flag=True, help="Print the raw JSON answer.")(f)

    @functools.wraps(f)
    def wrapper(*args: Any, url: str, token: str, **kwargs: Any) -> Any:
        return f(*args, api=ApiClient(url, token), **kwargs)

    return wrapper  # type: ignore[return-value]


def _out(data: Any, as_json: bool, columns: Sequence[str] | None = None) -> None:
    if as_json or columns is None:
        click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))
        return
    items = data["items"] if isinstance(data, dict) and "items" in data else [data]
    rows = [[_cell(item, c) for c in columns] for item in items]
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(columns)]
    click.echo("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)))
    for r in rows:
        click.echo("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))
    if isinstance(data, dict) and data.get("next_offset") is not None:
        click.echo(f"... {data['total']} in all; next page with --offset {data['next_offset']}")


def _cell(item: dict[str, Any], column: str) -> str:
    value: Any = item
    for part in column.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in sorted(value.items()))
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return "-" if value is None else str(value)


def _pairs(items: Sequence[str], what: str) -> dict[str, str]:
    out = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint=what)
        out[k] = v
    return out


page_options = [
    click.option(
        "--limit",
        default=50,
        show_default=True,
        type=click.IntRange(1, 500),
        help="Items per page.",
    ),
    click.option(
        "--offset", default=0, show_default=True, type=click.IntRange(0), help="Items to skip."
    ),
]


def paged(f: F) -> F:
    for opt in reversed(page_options):
        f = opt(f)
    return f


# -- rollouts -------------------------------------------------------------------
ROLLOUT_COLUMNS = (
    "id",
    "name",
    "status",
    "stage",
    "strategy",
    "bundle_id",
    "canary_devices",
    "control_devices",
)


@click.group()
def rollout() -> None:
    """Create rollouts, follow them, and pause, resume, promote or abort them."""


def _stage(text: str) -> dict[str, Any]:
    parts = text.split(":")
    try:
        stage: dict[str, Any] = {"percent": float(parts[0])}
        if len(parts) > 1:
            stage["min_devices"] = int(parts[1])
        if len(parts) > 2:
            stage["soak_seconds"] = float(parts[2])
    except ValueError as e:
        raise click.BadParameter(f"{text!r} is not PERCENT[:MIN_DEVICES[:SOAK_SECONDS]]") from e
    return stage


def _gate(text: str) -> dict[str, Any]:
    parts = text.split(":")
    try:
        gate: dict[str, Any] = {"kind": parts[0], "threshold": float(parts[1])}
        if len(parts) > 2:
            gate["min_samples"] = int(parts[2])
    except (ValueError, IndexError) as e:
        raise click.BadParameter(f"{text!r} is not KIND:THRESHOLD[:MIN_SAMPLES]") from e
    return gate


@rollout.command("create")
@click.option("--name", required=True, help="A name for people.")
@click.option("--bundle", "bundle_id", required=True, help="Candidate bundle id.")
@click.option("--group", required=True, help="Target group (id or name).")
@click.option(
    "--previous",
    "previous_bundle_id",
    help="Bundle the group runs now (default: newest lower version of the model).",
)
@click.option(
    "--strategy",
    type=click.Choice(["staged_canary", "all_at_once", "shadow"]),
    default="staged_canary",
    show_default=True,
    help="Staged canary, everything at once, or shadow (run beside, serve nothing).",
)
@click.option(
    "--stage",
    "stages",
    multiple=True,
    metavar="PCT[:MIN_DEVICES[:SOAK_S]]",
    help="A stage; repeat in order (default 1,10,50,100 %).",
)
@click.option(
    "--gate",
    "gates",
    multiple=True,
    metavar="KIND:THRESHOLD[:MIN_SAMPLES]",
    help="A health gate; repeat (default: every kind, moderate thresholds).",
)
@click.option(
    "--failure-policy",
    type=click.Choice(["rollback", "pause"]),
    default="rollback",
    show_default=True,
    help="What a breached gate does: roll back, or pause.",
)
@click.option("--start", is_flag=True, help="Start it right away.")
@api_options
def rollout_create(
    api: ApiClient,
    as_json: bool,
    name: str,
    bundle_id: str,
    group: str,
    previous_bundle_id: str | None,
    strategy: str,
    stages: tuple[str, ...],
    gates: tuple[str, ...],
    failure_policy: str,
    start: bool,
) -> None:
    """Create a rollout of a bundle to a group."""
    body: dict[str, Any] = {
        "name": name,
        "bundle_id": bundle_id,
        "group": group,
        "strategy": strategy,
        "failure_policy": failure_policy,
        "start": start,
        "previous_bundle_id": previous_bundle_id,
    }
    if stages:
        body["stages"] = [_stage(s) for s in stages]
    if gates:
        body["gates"] = [_gate(g) for g in gates]
    _out(api.request("POST", "/rollouts", json=body), as_json, ROLLOUT_COLUMNS)


@rollout.command("status")
@click.argument("rollout_id", required=False)
@paged
@api_options
def rollout_status(
    api: ApiClient, as_json: bool, rollout_id: str | None, limit: int, offset: int
) -> None:
    """Show one rollout (with its history), or list rollouts."""
    if rollout_id is None:
        data = api.request("GET", "/rollouts", params={"limit": limit, "offset": offset})
        _out(data, as_json, ROLLOUT_COLUMNS)
        return
    data = api.request("GET", f"/rollouts/{rollout_id}")
    if as_json:
        _out(data, True)
        return
    _out(data, False, ROLLOUT_COLUMNS)
    for h in data["state"].get("history", []):
        click.echo(
            f"  {h['ts']:.0f}  {h['actor']:<24} {h['action']:<10} "
            f"{h['from_status']} -> {h['to_status']} stage {h['stage']}  {h['reason']}"
        )


def _action_command(action: str, doc: str) -> click.Command:
    @click.argument("rollout_id")
    @click.option("--reason", default="", help="Why (recorded in the audit log).")
    @api_options
    def cmd(api: ApiClient, as_json: bool, rollout_id: str, reason: str, **extra: Any) -> None:
        body = {"reason": reason, **extra}
        _out(
            api.request("POST", f"/rollouts/{rollout_id}/{action}", json=body),
            as_json,
            ROLLOUT_COLUMNS,
        )

    cmd.__doc__ = doc
    if action == "promote":
        cmd = click.option(
            "--to-end", is_flag=True, help="Finish the rollout instead of moving one stage."
        )(cmd)
    return click.command(action)(cmd)


for _action, _doc in (
    ("start", "Start a pending rollout."),
    ("pause", "Pause a running rollout; cohorts stay as they are."),
    ("resume", "Resume a paused rollout; the stage's soak time starts again."),
    ("promote", "Skip the gates: move to the next stage (or finish with --to-end)."),
    ("abort", "Stop a rollout where it stands."),
    ("rollback", "Send the whole group back to the previous model (re-published)."),
):
    rollout.add_command(_action_command(_action, _doc))


# -- devices -----------------------------------------------------------------------
DEVICE_COLUMNS = (
    "id",
    "device_class",
    "labels",
    "last_seen_at",
    "current_name",
    "current_version",
    "health",
)


@click.group()
def devices() -> None:
    """List devices, show one, change labels."""


@devices.command("list")
@click.option("--class", "device_class", help="Only this device class.")
@click.option(
    "--label",
    "labels",
    multiple=True,
    metavar="KEY=VALUE",
    help="Only devices with this label; repeat to AND.",
)
@paged
@api_options
def devices_list(
    api: ApiClient,
    as_json: bool,
    device_class: str | None,
    labels: tuple[str, ...],
    limit: int,
    offset: int,
) -> None:
    """Devices with last seen, labels, class, current bundle and health."""
    _pairs(labels, "--label")
    params: dict[str, Any] = {"limit": limit, "offset": offset, "label": list(labels)}
    if device_class:
        params["device_class"] = device_class
    _out(api.request("GET", "/devices", params=params), as_json, DEVICE_COLUMNS)


@devices.command("show")
@click.argument("device_id")
@api_options
def devices_show(api: ApiClient, as_json: bool, device_id: str) -> None:
    """One device with its current assignment."""
    _out(api.request("GET", f"/devices/{device_id}"), True)


@devices.command("label")
@click.argument("device_id")
@click.argument("labels", nargs=-1, metavar="[KEY=VALUE]...")
@click.option("--remove", multiple=True, metavar="KEY", help="Drop this label; repeat.")
@api_options
def devices_label(
    api: ApiClient, as_json: bool, device_id: str, labels: tuple[str, ...], remove: tuple[str, ...]
) -> None:
    """Add, replace or remove labels of a device."""
    body = {"set": _pairs(labels, "LABELS"), "remove": list(remove)}
    _out(api.request("PATCH", f"/devices/{device_id}/labels", json=body), as_json, DEVICE_COLUMNS)


# -- enrollment tokens ------------------------------------------------------------
@click.group("enroll-token")
def enroll_token() -> None:
    """Single-use, expiring tokens new devices enroll with."""


@enroll_token.command("create")
@click.option("--ttl", "ttl_seconds", type=click.IntRange(1), help="Seconds it stays valid.")
@click.option("--class", "device_class", help="Only a device of this class may use it.")
@click.option(
    "--label",
    "labels",
    multiple=True,
    metavar="KEY=VALUE",
    help="Label given to the device; repeat.",
)
@click.option("--note", default="", help="A note for people.")
@api_options
def enroll_token_create(
    api: ApiClient,
    as_json: bool,
    ttl_seconds: int | None,
    device_class: str | None,
    labels: tuple[str, ...],
    note: str,
) -> None:
    """Create an enrollment token (printed once)."""
    data = api.request(
        "POST",
        "/enrollment-tokens",
        json={
            "ttl_seconds": ttl_seconds,
            "device_class": device_class,
            "labels": _pairs(labels, "--label"),
            "note": note,
        },
    )
    if as_json:
        _out(data, True)
        return
    click.echo(data["token"])
    click.echo(
        f"expires {data['expires_at']}; single use. Give it to the device: "
        "edgefleet-agent enroll --token ...",
        err=True,
    )


# -- models and bundles -------------------------------------------------------------
@click.group()
def models() -> None:
    """Models and their versions."""


@models.command("list")
@paged
@api_options
def models_list(api: ApiClient, as_json: bool, limit: int, offset: int) -> None:
    """Models with their latest version."""
    data = api.request("GET", "/models", params={"limit": limit, "offset": offset})
    if not as_json:
        for m in data["items"]:
            m["versions"] = [v["version"] for v in m["versions"]]
    _out(data, as_json, ("name", "latest_version", "versions", "created_at"))


@click.group()
def bundles() -> None:
    """Bundles on the server."""


@bundles.command("upload")
@click.argument("path", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@api_options
def bundles_upload(api: ApiClient, as_json: bool, path: Path) -> None:
    """Upload a bundle signed offline; the server verifies it against its trust store."""
    with open(path, "rb") as f:
        data = api.request(
            "POST", "/bundles", files={"file": (path.name, f, "application/octet-stream")}
        )
    _out(data, as_json, ("id", "name", "version", "format", "size", "signed_by"))


@bundles.command("list")
@click.option("--name", help="Only this model.")
@paged
@api_options
def bundles_list(api: ApiClient, as_json: bool, name: str | None, limit: int, offset: int) -> None:
    """Bundles, newest version first."""
    params: dict[str, Any] = {"limit": limit, "offset": offset}
    if name:
        params["name"] = name
    _out(
        api.request("GET", "/bundles", params=params),
        as_json,
        ("id", "name", "version", "format", "device_classes", "source", "size"),
    )


COMMANDS = (rollout, devices, enroll_token, models, bundles)
