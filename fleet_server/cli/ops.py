"""Operator commands over the admin API: devices, enrollment tokens, models, bundles.

Groups, operators and rollouts have their own modules (``groups.py``, ``operators.py``,
``rollouts.py``); shared options and output live in ``api.py``. ``COMMANDS`` lists every
API-backed command group for the ``edgefleet`` entry point.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from fleet_server.cli.api import DEVICE_COLUMNS, ApiClient, api_options, paged
from fleet_server.cli.api import out as _out
from fleet_server.cli.api import pairs as _pairs

# -- devices -----------------------------------------------------------------------


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
@click.option("-q", "--quiet", is_flag=True, help="Print only the bundle id.")
@api_options
def bundles_upload(api: ApiClient, as_json: bool, path: Path, quiet: bool) -> None:
    """Upload a bundle signed offline; the server verifies it against its trust store."""
    with open(path, "rb") as f:
        data = api.request(
            "POST", "/bundles", files={"file": (path.name, f, "application/octet-stream")}
        )
    if quiet and not as_json:
        click.echo(data["id"])
        return
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


def _commands() -> tuple[click.Command, ...]:
    from fleet_server.cli.groups import group
    from fleet_server.cli.operators import operator, whoami
    from fleet_server.cli.rollouts import rollout

    return (rollout, group, operator, whoami, devices, enroll_token, models, bundles)


COMMANDS = _commands()
