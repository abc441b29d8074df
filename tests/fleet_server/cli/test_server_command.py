"""The operator CLI against a real server process (`edgefleet server` on a free port)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import click
import httpx
import pytest
from click.testing import CliRunner

from fleet_server.cli import main
from tests.server_fixtures import ADMIN_TOKEN

if TYPE_CHECKING:
    from tests.bundlesim import BundleSim
    from tests.server_fixtures import LiveServer


OPS = ("rollout", "devices", "enroll-token", "models", "bundles", "server")


def _run(server: LiveServer, *args: str, token: str = ADMIN_TOKEN) -> Any:
    result = CliRunner().invoke(
        main, list(args), env={"EDGEFLEET_URL": server.url, "EDGEFLEET_TOKEN": token}
    )
    return result


def _walk(
    cmd: click.Command, path: tuple[str, ...] = ()
) -> list[tuple[tuple[str, ...], click.Command]]:
    out = [(path, cmd)]
    if isinstance(cmd, click.Group):
        for name, sub in cmd.commands.items():
            out += _walk(sub, (*path, name))
    return out


@pytest.mark.parametrize("group", OPS)
def test_every_server_command_has_help(group: str) -> None:
    for path, cmd in _walk(main.commands[group], (group,)):
        assert (cmd.help or "").strip(), f"`edgefleet {' '.join(path)}` has no help text"
        r = CliRunner().invoke(main, [*path, "--help"])
        assert r.exit_code == 0 and "Usage:" in r.output


def test_operator_workflow_over_http(live_server: LiveServer, bundle_sim: BundleSim) -> None:
    s = live_server
    token = _run(s, "enroll-token", "create", "--label", "site=north", "--ttl", "600")
    assert token.exit_code == 0, token.output
    enroll_token = token.output.splitlines()[0]
    enrolled = httpx.post(
        f"{s.url}/device/v1/enroll",
        json={"enrollment_token": enroll_token, "device_id": "cam-1", "device_class": "cam"},
    )
    assert enrolled.status_code == 201

    listed = _run(s, "devices", "list", "--label", "site=north")
    assert listed.exit_code == 0 and "cam-1" in listed.output and "site=north" in listed.output
    labelled = _run(s, "devices", "label", "cam-1", "floor=2", "--json")
    assert json.loads(labelled.output)["labels"] == {"site": "north", "floor": "2"}
    shown = json.loads(_run(s, "devices", "show", "cam-1").output)
    assert shown["id"] == "cam-1"

    v2 = bundle_sim.publish(version=2, seed=1, created=_recent())
    v3 = bundle_sim.publish(version=3, seed=2, created=_recent())
    b2 = json.loads(_run(s, "bundles", "upload", str(v2), "--json").output)
    b3 = json.loads(_run(s, "bundles", "upload", str(v3), "--json").output)
    assert (b2["version"], b3["version"]) == (2, 3)
    models = _run(s, "models", "list")
    assert "tiny" in models.output and "2,3" in models.output

    httpx.post(
        f"{s.url}/api/v1/groups",
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        json={"name": "north", "selector": {"site": "north"}},
    ).raise_for_status()
    created = _run(
        s,
        "rollout",
        "create",
        "--name",
        "v3",
        "--bundle",
        b3["id"],
        "--group",
        "north",
        "--stage",
        "50:1:0",
        "--stage",
        "100:1:0",
        "--gate",
        "install_failure_rate:0.1:1",
        "--start",
        "--json",
    )
    assert created.exit_code == 0, created.output
    rid = json.loads(created.output)["id"]
    for action, status in (
        ("pause", "paused"),
        ("resume", "running"),
        ("promote", "running"),
        ("abort", "aborted"),
    ):
        r = _run(s, "rollout", action, rid, "--reason", "cli test", "--json")
        assert r.exit_code == 0, r.output
        assert json.loads(r.output)["status"] == status
    status = _run(s, "rollout", "status", rid)
    assert status.exit_code == 0 and "aborted" in status.output and "cli test" in status.output


def test_cli_reports_api_errors_with_their_code(live_server: LiveServer) -> None:
    r = _run(live_server, "devices", "list", token="eft_wrong")
    assert r.exit_code == 1 and "[invalid_token]" in r.output
    r = _run(live_server, "rollout", "pause", "r-missing")
    assert r.exit_code == 1 and "[not_found]" in r.output


def test_cli_reports_unreachable_server() -> None:
    r = CliRunner().invoke(main, ["models", "list", "--url", "http://127.0.0.1:9", "--token", "x"])
    assert r.exit_code == 1 and "cannot reach the server" in r.output


def _recent() -> Any:
    from datetime import datetime, timedelta, timezone

    return datetime.now(timezone.utc).replace(microsecond=0) - timedelta(hours=1)
