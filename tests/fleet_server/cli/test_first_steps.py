"""The operator's first steps with the CLI against a real server process: from the
bootstrap admin token to a personal token, groups made, filled and emptied, tokens listed
and revoked; a missing token says where one comes from."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import httpx
from click.testing import CliRunner, Result

from fleet_server.cli import main
from tests.server_fixtures import ADMIN_TOKEN

if TYPE_CHECKING:
    from tests.server_fixtures import LiveServer


def _run(server: LiveServer, *args: str, token: str | None = ADMIN_TOKEN) -> Result:
    env = {"EDGEFLEET_URL": server.url, "EDGEFLEET_TOKEN": token or ""}
    return CliRunner().invoke(main, list(args), env=env)


def _enroll(server: LiveServer, token: str, device_id: str, labels: dict[str, str]) -> None:
    enroll_token = _run(server, "enroll-token", "create", "--class", "cam", token=token)
    assert enroll_token.exit_code == 0, enroll_token.output
    r = httpx.post(
        f"{server.url}/device/v1/enroll",
        json={
            "enrollment_token": enroll_token.output.splitlines()[0],
            "device_id": device_id,
            "device_class": "cam",
            "labels": labels,
        },
    )
    assert r.status_code == 201, r.text


def test_bootstrap_token_to_personal_token_to_groups(live_server: LiveServer) -> None:
    s = live_server
    created = _run(s, "operator", "create", "alice", "--role", "admin")
    assert created.exit_code == 0, created.output
    assert "alice" in created.output and "admin" in created.output
    issued = _run(s, "operator", "token", "create", "alice")
    assert issued.exit_code == 0, issued.output
    mine = issued.stdout.strip()
    assert mine.startswith("eft_") and "\n" not in mine

    who = _run(s, "whoami", "--json", token=mine)
    assert json.loads(who.output)["name"] == "alice"

    for device_id, labels in (("cam-1", {"site": "north"}), ("cam-2", {}), ("cam-3", {})):
        _enroll(s, mine, device_id, labels)
    made = _run(s, "group", "create", "gateways", "--class", "cam", "--json", token=mine)
    assert made.exit_code == 0, made.output
    assert json.loads(made.output)["selector"] == {"group": "gateways"}
    assert json.loads(made.output)["device_count"] == 0
    by_label = _run(s, "group", "create", "north", "--selector", "site=north", token=mine)
    assert by_label.exit_code == 0, by_label.output

    added = _run(s, "group", "add", "gateways", "cam-1", "cam-2", token=mine)
    assert added.exit_code == 0, added.output
    shown = json.loads(_run(s, "group", "show", "gateways", "--json", token=mine).output)
    assert shown["device_count"] == 2
    assert [d["id"] for d in shown["devices"]["items"]] == ["cam-1", "cam-2"]
    removed = _run(s, "group", "remove", "gateways", "cam-2", token=mine)
    assert removed.exit_code == 0, removed.output
    listed = _run(s, "group", "list", token=mine)
    assert listed.exit_code == 0, listed.output
    rows = {line.split()[1]: line for line in listed.output.splitlines()[1:]}
    assert rows["gateways"].split()[-1] == "1" and rows["north"].split()[-1] == "1"

    everyone = _run(s, "group", "create", "all-cams", "--all-devices", "--class", "cam")
    refused = _run(s, "group", "add", "all-cams", "cam-3", token=mine)
    assert everyone.exit_code == 0 and refused.exit_code == 1
    assert "cannot be added or removed by hand" in refused.output

    tokens = json.loads(_run(s, "operator", "token", "list", "alice", "--json").output)
    assert len(tokens["items"]) == 1 and tokens["items"][0]["revoked_at"] is None
    revoked = _run(s, "operator", "token", "revoke", "alice", tokens["items"][0]["id"])
    assert revoked.exit_code == 0, revoked.output
    after = _run(s, "whoami", token=mine)
    assert after.exit_code == 1 and "[invalid_token]" in after.output
    listed_ops = _run(s, "operator", "list")
    assert "alice" in listed_ops.output and "bootstrap-admin" in listed_ops.output


def test_a_viewer_cannot_create_operators(live_server: LiveServer) -> None:
    s = live_server
    assert _run(s, "operator", "create", "val", "--role", "viewer").exit_code == 0
    viewer = _run(s, "operator", "token", "create", "val").stdout.strip()
    refused = _run(s, "operator", "create", "mallory", "--role", "admin", token=viewer)
    assert refused.exit_code == 1 and "[permission_denied]" in refused.output


def test_missing_token_names_the_variable_and_the_bootstrap_token() -> None:
    r = CliRunner().invoke(
        main, ["group", "list", "--url", "http://127.0.0.1:9"], env={"EDGEFLEET_TOKEN": ""}
    )
    assert r.exit_code == 2
    assert "EDGEFLEET_TOKEN" in r.output and "bootstrap admin token" in r.output
    assert "edgefleet operator create" in r.output
