"""``edgefleet rollout``: create rollouts, watch them live, and act on them."""

from __future__ import annotations

import time
from typing import Any

import click

from fleet_server.cli.api import ApiClient, api_options, out, paged
from fleet_server.cli.rollout_view import render_status

ROLLOUT_COLUMNS = (
    "id",
    "name",
    "status",
    "stage_number",
    "stages_total",
    "strategy",
    "bundle_id",
    "canary_devices",
    "control_devices",
)

TERMINAL = ("succeeded", "rolled_back", "aborted")


@click.group()
def rollout() -> None:
    """Create rollouts, watch them, and pause, resume, promote, abort or roll them back."""


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
    help="What a rollback returns to (default: the version most of the group's devices run).",
)
@click.option(
    "--force",
    is_flag=True,
    help="Accept a candidate older than what the group's devices run.",
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
    help="A health gate; repeat (default: every kind but accuracy, moderate thresholds).",
)
@click.option(
    "--failure-policy",
    type=click.Choice(["rollback", "pause"]),
    default="rollback",
    show_default=True,
    help="What a breached gate does: roll back, or pause.",
)
@click.option("--start", is_flag=True, help="Start it right away.")
@click.option("-q", "--quiet", is_flag=True, help="Print only the rollout id.")
@api_options
def rollout_create(
    api: ApiClient,
    as_json: bool,
    name: str,
    bundle_id: str,
    group: str,
    previous_bundle_id: str | None,
    force: bool,
    strategy: str,
    stages: tuple[str, ...],
    gates: tuple[str, ...],
    failure_policy: str,
    start: bool,
    quiet: bool,
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
        "force": force,
    }
    if stages:
        body["stages"] = [_stage(s) for s in stages]
    if gates:
        body["gates"] = [_gate(g) for g in gates]
    data = api.request("POST", "/rollouts", json=body)
    if quiet and not as_json:
        click.echo(data["id"])
        return
    out(data, as_json, ROLLOUT_COLUMNS)


@rollout.command("list")
@click.option("--status", "status_filter", help="Only rollouts with this status.")
@paged
@api_options
def rollout_list(
    api: ApiClient, as_json: bool, status_filter: str | None, limit: int, offset: int
) -> None:
    """Rollouts, newest first."""
    params: dict[str, Any] = {"limit": limit, "offset": offset}
    if status_filter:
        params["status"] = status_filter
    out(api.request("GET", "/rollouts", params=params), as_json, ROLLOUT_COLUMNS)


@rollout.command("status")
@click.argument("rollout_id", required=False)
@click.option("--watch", is_flag=True, help="Refresh until the rollout ends (Ctrl-C to stop).")
@click.option(
    "--interval",
    default=2.0,
    show_default=True,
    type=click.FloatRange(0.2, 3600),
    help="Seconds between refreshes with --watch.",
)
@click.option(
    "--until",
    "until",
    multiple=True,
    metavar="STATUS",
    help="With --watch: stop once the rollout reaches STATUS (e.g. paused); repeat.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(0),
    help="With --watch: give up after this many seconds (exit 1).",
)
@paged
@api_options
def rollout_status(
    api: ApiClient,
    as_json: bool,
    rollout_id: str | None,
    watch: bool,
    interval: float,
    until: tuple[str, ...],
    timeout: float | None,
    limit: int,
    offset: int,
) -> None:
    """The live picture of one rollout (or, without ROLLOUT_ID, the list).

    Stage and soak progress, each gate's value against its threshold with sample
    counts, the group's devices by state and version, why devices refused or failed the
    candidate, what holds the rollout, the commands that apply now, and its history.
    """
    if rollout_id is None:
        data = api.request("GET", "/rollouts", params={"limit": limit, "offset": offset})
        out(data, as_json, ROLLOUT_COLUMNS)
        return
    stop_at = set(until) | set(TERMINAL)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        data = api.request("GET", f"/rollouts/{rollout_id}/status")
        if as_json:
            out(data, True)
        else:
            if watch:
                click.echo(f"-- {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}")
            for line in render_status(data):
                click.echo(line)
        if not watch or data["status"] in stop_at:
            return
        if deadline is not None and time.monotonic() >= deadline:
            raise click.ClickException(
                f"rollout {rollout_id} is still {data['status']} after {timeout:g} s"
            )
        time.sleep(interval)


def _action_command(action: str, doc: str) -> click.Command:
    @click.argument("rollout_id")
    @click.option("--reason", default="", help="Why (recorded in the audit log).")
    @api_options
    def cmd(api: ApiClient, as_json: bool, rollout_id: str, reason: str, **extra: Any) -> None:
        body = {"reason": reason, **extra}
        out(
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
