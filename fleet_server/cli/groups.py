"""``edgefleet group``: groups of devices, chosen by labels and optionally a device class.

A group selects every device whose labels match all of its selector's pairs (and whose
class matches, if it names one). ``group add`` and ``group remove`` put devices in and
take them out by setting or dropping those labels; a group made without ``--selector``
selects ``group=<name>``, so devices join it only when added.
"""

from __future__ import annotations

import click

from fleet_server.cli.api import DEVICE_COLUMNS, ApiClient, api_options, out, paged, pairs

GROUP_COLUMNS = ("id", "name", "selector", "device_class", "device_count")


@click.group()
def group() -> None:
    """Groups of devices (label selectors) that rollouts target."""


@group.command("create")
@click.argument("name")
@click.option(
    "--selector",
    "selector",
    multiple=True,
    metavar="KEY=VALUE",
    help="Devices with this label belong; repeat to AND (default: group=NAME).",
)
@click.option("--class", "device_class", help="Only devices of this class.")
@click.option(
    "--all-devices",
    is_flag=True,
    help="No label selector: every device (of --class, if given).",
)
@click.option("--description", default="", help="A note for people.")
@api_options
def group_create(
    api: ApiClient,
    as_json: bool,
    name: str,
    selector: tuple[str, ...],
    device_class: str | None,
    all_devices: bool,
    description: str,
) -> None:
    """Create group NAME."""
    if all_devices and selector:
        raise click.UsageError("give --selector or --all-devices, not both")
    chosen = {} if all_devices else (pairs(selector, "--selector") or {"group": name})
    body = {
        "name": name,
        "selector": chosen,
        "device_class": device_class,
        "description": description,
    }
    data = api.request("POST", "/groups", json=body)
    data = api.request("GET", f"/groups/{data['id']}")
    out(data, as_json, GROUP_COLUMNS)


@group.command("list")
@paged
@api_options
def group_list(api: ApiClient, as_json: bool, limit: int, offset: int) -> None:
    """Every group with its selector and how many devices it holds."""
    data = api.request("GET", "/groups", params={"limit": limit, "offset": offset})
    for g in data["items"]:
        if g.get("device_count") is None:
            g["device_count"] = api.request("GET", f"/groups/{g['id']}")["device_count"]
    out(data, as_json, GROUP_COLUMNS)


@group.command("show")
@click.argument("name")
@paged
@api_options
def group_show(api: ApiClient, as_json: bool, name: str, limit: int, offset: int) -> None:
    """One group (id or name) and its devices."""
    g = api.request("GET", f"/groups/{name}")
    members = api.request(
        "GET", f"/groups/{name}/devices", params={"limit": limit, "offset": offset}
    )
    if as_json:
        out({**g, "devices": members}, True)
        return
    out(g, False, GROUP_COLUMNS)
    click.echo("")
    out(members, False, DEVICE_COLUMNS)


def _membership(api: ApiClient, name: str) -> dict[str, str]:
    g = api.request("GET", f"/groups/{name}")
    selector: dict[str, str] = g.get("selector") or {}
    if not selector:
        raise click.ClickException(
            f"group {name} has no label selector (it holds every device"
            + (f" of class {g['device_class']}" if g.get("device_class") else "")
            + "): devices cannot be added or removed by hand"
        )
    return selector


@group.command("add")
@click.argument("name")
@click.argument("device_ids", nargs=-1, required=True)
@api_options
def group_add(api: ApiClient, as_json: bool, name: str, device_ids: tuple[str, ...]) -> None:
    """Put devices into group NAME (sets the group's selector labels on each)."""
    selector = _membership(api, name)
    rows = [
        api.request("PATCH", f"/devices/{d}/labels", json={"set": selector, "remove": []})
        for d in device_ids
    ]
    out({"items": rows}, as_json, DEVICE_COLUMNS)


@group.command("remove")
@click.argument("name")
@click.argument("device_ids", nargs=-1, required=True)
@api_options
def group_remove(api: ApiClient, as_json: bool, name: str, device_ids: tuple[str, ...]) -> None:
    """Take devices out of group NAME (drops the group's selector labels from each)."""
    selector = _membership(api, name)
    rows = [
        api.request("PATCH", f"/devices/{d}/labels", json={"set": {}, "remove": list(selector)})
        for d in device_ids
    ]
    out({"items": rows}, as_json, DEVICE_COLUMNS)


@group.command("delete")
@click.argument("name")
@api_options
def group_delete(api: ApiClient, as_json: bool, name: str) -> None:
    """Delete group NAME (refused while a rollout uses it)."""
    api.request("DELETE", f"/groups/{name}")
    click.echo(f"deleted group {name}")
