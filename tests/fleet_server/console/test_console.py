"""The operator console in a real browser against a real server with a rollout in progress.

Playwright drives Debian's ``chromium`` (no browser download): real clicks on
``/console`` served by a real uvicorn process (``edgefleet server``) beside a real
Mosquitto. In the operator's test four real agents (the fleet simulator's
``AgentDaemon`` per device) run v1 and a staged rollout of v2 is evaluated by the server's
own scheduler; the operator pauses it and rolls it back by clicking, and the page shows the
devices returning to the previous model. In the viewer's test devices enroll and report over
the device API (as in ``tests/fleet_server/cli/test_rollout_live.py``); the viewer sees the
same pages and every action is refused by the API, with the refusal on the page. Any
console error or uncaught exception fails a test (the failed requests a test expects
aside). Screenshots are kept under the test's tmp dir and copied to
``test-artifacts/console/``.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, expect, sync_playwright

from fleet_server.broker.mosquitto import SERVER_USER, LocalMosquitto
from fleet_server.images.build import agent_config_text
from fleet_server.images.recipe import load_class
from fleet_server.simulator.fleet import ClassPlan, Fleet
from fleet_server.simulator.streams import N_FEATURES
from tests.bundlesim import BundleSim, tiny_onnx_model
from tests.server_fixtures import (
    ADMIN_TOKEN,
    _days,
    _now_minus_day,
    auth,
    server_keys,
    start_server,
    stop_server,
)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[3] / "test-artifacts" / "console"
STAGES = [
    {"percent": 50, "min_devices": 1, "soak_seconds": 3600},
    {"percent": 100, "min_devices": 1, "soak_seconds": 0},
]
# min_samples above what four devices can report: the gate waits and the rollout holds
GATES = [{"kind": "install_failure_rate", "threshold": 0.5, "min_samples": 10}]
CLASS = "x86_64-gateway"
WAIT_MS = 20_000

pytestmark = pytest.mark.slow


# -- the server and its fleet -----------------------------------------------------------
@dataclass
class Server:
    url: str
    admin: httpx.Client
    tmp: Path
    broker: LocalMosquitto
    bundles: dict[int, dict[str, Any]] = field(default_factory=dict)

    def post(self, path: str, **kw: Any) -> Any:
        r = self.admin.post(f"/api/v1{path}", **kw)
        assert r.status_code in (200, 201), r.text
        return r.json()

    def get(self, path: str, **kw: Any) -> Any:
        r = self.admin.get(f"/api/v1{path}", **kw)
        assert r.status_code == 200, r.text
        return r.json()

    def operator_token(self, name: str, role: str) -> str:
        op = self.post("/operators", json={"name": name, "role": role})
        return str(self.post(f"/operators/{op['id']}/tokens", json={})["token"])

    def device(self, device_id: str, labels: dict[str, str]) -> dict[str, str]:
        token = self.post("/enrollment-tokens", json={})["token"]
        r = httpx.post(
            f"{self.url}/device/v1/enroll",
            json={
                "enrollment_token": token,
                "device_id": device_id,
                "device_class": "cam",
                "labels": labels,
            },
        )
        assert r.status_code == 201, r.text
        return auth(r.json()["credential"])

    def report(self, headers: dict[str, str], **body: Any) -> None:
        r = self.admin.post(
            "/device/v1/reports",
            headers=headers,
            json={"reports": [{"type": "install", "ts": time.time(), **body}]},
        )
        assert r.status_code == 200, r.text


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """``edgefleet server`` on SQLite beside a Mosquitto, its scheduler evaluating rollouts
    every second; bundles v1 and v2 of ``tiny`` (an ONNX model of the simulator's inputs)."""
    tmp = tmp_path_factory.mktemp("console-server")
    sim = BundleSim(tmp / "repo")
    keys_dir, kid, trust_path = server_keys(tmp, sim)
    broker = LocalMosquitto(tmp / "broker")
    broker.add_user(SERVER_USER, "server-secret")
    broker.start()
    live = None
    try:
        live = start_server(
            {
                "database_url": f"sqlite:///{tmp / 'server.db'}",
                "bundle_dir": str(tmp / "bundles"),
                "admin_bootstrap_token": ADMIN_TOKEN,
                "trust_store": str(trust_path),
                "signing_key_dir": str(keys_dir),
                "signing_key": kid,
                "rollout_interval_seconds": "1",
                "assignment_cache_seconds": "0.5",
                "mqtt_host": "127.0.0.1",
                "mqtt_port": str(broker.port),
                "mqtt_username": SERVER_USER,
                "mqtt_password": "server-secret",
            },
            tmp / "server.log",
        )
        with httpx.Client(base_url=live.url, headers=auth(ADMIN_TOKEN), timeout=30) as admin:
            s = Server(live.url, admin, tmp, broker)
            for v in (1, 2):
                path = sim.publish(
                    version=v,
                    model_bytes=tiny_onnx_model(v, n_in=N_FEATURES),
                    created=_now_minus_day(),
                    valid_for=_days(30),
                )
                with open(path, "rb") as f:
                    s.bundles[v] = s.post(
                        "/bundles", files={"file": (path.name, f, "application/octet-stream")}
                    )
            (tmp / "image").mkdir()
            (tmp / "image" / "agent.toml").write_text(
                agent_config_text(load_class(CLASS), live.url, "127.0.0.1", broker.port)
            )
            (tmp / "image" / "trust.json").write_bytes(trust_path.read_bytes())
            yield s
    finally:
        if live is not None:
            stop_server(live.proc)
        broker.stop()


def staged_rollout(s: Server, group: str, devices: list[str]) -> tuple[str, list[str]]:
    """A staged rollout of v2 to ``group`` (50% then 100%, an hour's soak) and the devices
    its first stage selected."""
    # cohorts hash the (random) rollout id: a 50% stage of 4 devices selects none 1 time in
    # 16; start again until it selects some
    for _attempt in range(20):
        r = s.post(
            "/rollouts",
            json={
                "name": f"tiny v2 to {group}",
                "bundle_id": s.bundles[2]["id"],
                "group": group,
                "stages": STAGES,
                "gates": GATES,
                "failure_policy": "pause",
                "start": True,
            },
        )
        canaries = [
            d
            for d in devices
            if ((s.get(f"/devices/{d}").get("assignment") or {}).get("desired") or {}).get(
                "version"
            )
            == 2
        ]
        if canaries:
            return str(r["id"]), canaries
        s.post(f"/rollouts/{r['id']}/abort", json={"reason": "no canary selected"})
    raise AssertionError("twenty 50% stages of 4 devices each selected no canary")


@dataclass
class Agents:
    """Real agents of one group, predicting in the background (as apps would)."""

    fleet: Fleet
    stop: threading.Event
    thread: threading.Thread

    def wait(self, what: str, done: Any, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if done():
                return
            time.sleep(0.25)
        raise AssertionError(f"{what} within {timeout} s; versions {self.fleet.versions()}")


@pytest.fixture
def agents(server: Server, tmp_path: Path) -> Iterator[Agents]:
    """Four agents labelled ``site=dock`` in group ``dock``, all on v1 (an all-at-once
    rollout), checking in every 0.5 s and sending telemetry through Mosquitto."""
    s = server
    fleet = Fleet(
        tmp_path / "fleet",
        server_url=s.url,
        mqtt_host="127.0.0.1",
        mqtt_port=s.broker.port,
        window_seconds=1.0,
        poll_seconds=0.5,
    )
    fleet.overrides["update"] = {"probation_seconds": 1.0, "probation_min_predictions": 5}
    stop = threading.Event()
    thread = threading.Thread(
        target=lambda: fleet.drive(600, calls_per_second=4.0, on_tick=lambda _: stop.is_set()),
        daemon=True,
    )
    try:
        fleet.provision([ClassPlan(CLASS, 4, s.tmp / "image", labels={"site": "dock"})])
        fleet.enroll(lambda d: s.post("/enrollment-tokens", json={"device_class": CLASS})["token"])
        for d in fleet.devices:
            s.broker.add_user(d.device_id, d.credential())
        s.broker.reload()
        fleet.start()
        thread.start()
        s.post("/groups", json={"name": "dock", "selector": {"site": "dock"}})
        a = Agents(fleet, stop, thread)
        s.post(
            "/rollouts",
            json={
                "name": "tiny v1 to dock",
                "bundle_id": s.bundles[1]["id"],
                "group": "dock",
                "strategy": "all_at_once",
                "stages": [{"percent": 100, "soak_seconds": 0}],
                "gates": [],
                "start": True,
            },
        )
        a.wait("every agent on v1", lambda: fleet.versions() == {1: 4})
        yield a
    finally:
        stop.set()
        if thread.is_alive():
            thread.join(10)
        fleet.stop()


@dataclass
class Rollout:
    id: str
    group: str
    devices: dict[str, dict[str, str]]
    canaries: list[str]


def reported_rollout(s: Server, group: str) -> Rollout:
    """Four devices of ``group`` that reported v1 over the device API, a staged rollout of
    v2 running at its first stage (50%), and the first canary's refusal of v2."""
    devices = {}
    for i in range(4):
        d = f"{group}-{i}"
        devices[d] = s.device(d, {"site": group})
        s.report(devices[d], outcome="installed", name="tiny", version=1)
    s.post("/groups", json={"name": group, "selector": {"site": group}, "description": "test"})
    rid, canaries = staged_rollout(s, group, list(devices))
    s.report(
        devices[canaries[0]],
        outcome="refused",
        name="tiny",
        version=2,
        error_code="expired",
        message="bundle expired at 2020-01-01T00:00:00Z",
        rollout_id=rid,
    )
    assert s.get(f"/rollouts/{rid}")["status"] == "running"
    return Rollout(rid, group, devices, canaries)


# -- the browser --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not os.path.exists(CHROMIUM):
        pytest.fail("Debian's chromium is required: apt-get install -y chromium")
    args = ["--no-sandbox"] if os.geteuid() == 0 else []
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        try:
            yield b
        finally:
            b.close()


@dataclass
class Console:
    page: Page
    shots: Path
    errors: list[str] = field(default_factory=list)
    #: requests the browser saw fail, as (status, last path segment)
    failed: list[tuple[int, str]] = field(default_factory=list)

    def shot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, ARTIFACTS / path.name)
        return path

    def sign_in(self, url: str, token: str, who: str) -> None:
        self.page.goto(f"{url}/console")
        self.page.fill("#token", token)
        self.page.click("#login-submit")
        expect(self.page.locator("#whoami")).to_have_text(who)

    def open_rollout(self, rollout_id: str) -> None:
        self.page.click("nav a[data-nav=rollouts]")
        self.page.click(f"tr[data-rollout='{rollout_id}'] a")
        expect(self.page.locator("#r-sub")).to_contain_text(rollout_id)


@pytest.fixture
def console(browser: Browser, tmp_path: Path) -> Iterator[Console]:
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    ctx.set_default_timeout(WAIT_MS)
    page = ctx.new_page()
    c = Console(page, tmp_path / "screenshots")
    c.shots.mkdir()

    def on_console(m: ConsoleMessage) -> None:
        if m.type != "error":
            return
        where = m.location.get("url", "")
        failed = re.match(
            r"Failed to load resource: the server responded with a status of (\d+)", m.text
        )
        if failed:
            c.failed.append((int(failed[1]), where.rsplit("/", 1)[-1]))
        else:
            c.errors.append(f"{m.text} ({where})")

    page.on("console", on_console)
    page.on("pageerror", lambda e: c.errors.append(f"uncaught: {e}"))
    page.on("dialog", lambda d: d.accept())
    try:
        yield c
    finally:
        ctx.close()


def status_of(s: Server, rollout_id: str) -> dict[str, Any]:
    return dict(s.get(f"/rollouts/{rollout_id}/status"))


# -- the tests ----------------------------------------------------------------------------
def test_an_operator_pauses_and_rolls_back_a_rollout_from_the_console(
    server: Server, agents: Agents, console: Console
) -> None:
    devices = [d.device_id for d in agents.fleet.devices]
    rid, canaries = staged_rollout(server, "dock", devices)
    token = server.operator_token("alice", "operator")
    page = console.page
    console.sign_in(server.url, token, "alice (operator)")

    # the rollout list, then the live picture: the same figures as `rollout status`
    expect(page.locator(f"tr[data-rollout='{rid}'] .badge")).to_have_text("running")
    console.shot("0-rollouts")
    console.open_rollout(rid)
    expect(page.locator("#r-status")).to_have_attribute("data-status", "running")
    expect(page.locator("#r-sub")).to_contain_text("stage 1 of 2")
    # the canaries' agents download, verify, install and report v2; the page follows
    on_candidate = page.locator("#r-states tr[data-key='on candidate'] td")
    expect(on_candidate).to_have_text(str(len(canaries)), timeout=90_000)
    expect(page.locator("#r-versions tr[data-key='tiny v2'] td")).to_have_text(str(len(canaries)))
    gate = page.locator("#r-gates tr[data-gate=install_failure_rate]")
    expect(gate).to_contain_text("0.5")  # the threshold
    expect(gate).to_contain_text(f"{len(canaries)} of 10")  # installs against the minimum
    expect(gate.locator("td").nth(1)).to_have_text("WAIT")
    expect(page.locator("#r-soak")).to_contain_text("of 60.0 min")
    expect(page.locator("dd[data-fact=holding]")).to_contain_text("soaking")
    expect(page.locator("#r-refusals")).to_contain_text("No device refused")
    expect(page.locator("#r-actions button[data-action=pause]")).to_be_visible()
    expect(page.locator("#r-actions button[data-action=resume]")).to_be_hidden()
    console.shot("1-rollout-running")

    # pause from the page
    page.fill("#r-reason", "canary latency looks high")
    page.click("#r-actions button[data-action=pause]")
    expect(page.locator("#flash")).to_contain_text("pause: done")
    expect(page.locator("#r-status")).to_have_attribute("data-status", "paused")
    expect(page.locator("dd[data-fact='paused by']")).to_contain_text("operator:alice")
    expect(page.locator("#r-history tbody tr").first).to_contain_text("running -> paused")
    expect(page.locator("#r-actions button[data-action=resume]")).to_be_visible()
    expect(page.locator("#r-actions button[data-action=pause]")).to_be_hidden()
    console.shot("2-rollout-paused")
    st = status_of(server, rid)
    assert st["status"] == "paused"
    last = st["rollout"]["state"]["history"][-1]
    assert (last["actor"], last["action"], last["reason"]) == (
        "operator:alice",
        "pause",
        "canary latency looks high",
    )
    time.sleep(2.5)  # scheduler rounds run: a paused rollout stays paused
    assert status_of(server, rid)["status"] == "paused"
    # the canaries keep v2 while paused, the others v1
    assert agents.fleet.versions() == Counter({2: len(canaries), 1: 4 - len(canaries)})

    # roll back from the page (the page asks for confirmation; the test accepts), and
    # watch the agents return to the previous model (re-published above the candidate)
    page.click("#r-actions button[data-action=rollback]")
    expect(page.locator("#r-status")).to_have_attribute("data-status", "rolled_back")
    expect(page.locator("#flash")).to_contain_text("roll back: done")
    back = status_of(server, rid)["rollback_bundle"]
    assert back["name"] == "tiny" and back["version"] > 2, back
    expect(page.locator("dd[data-fact='rolled back to']")).to_contain_text(
        f"tiny v{back['version']} ({back['bundle_id']})"
    )
    expect(page.locator("#r-actions button:visible")).to_have_count(0)
    expect(page.locator("#r-no-actions")).to_have_text(
        "No operator action applies to a rolled back rollout."
    )
    expect(page.locator("#r-states tr[data-key='on rollback bundle'] td")).to_have_text(
        "4", timeout=90_000
    )
    expect(page.locator("#r-states tbody tr")).to_have_count(1)
    console.shot("3-rollout-rolled-back")
    assert agents.fleet.versions() == {back["version"]: 4}
    audit = server.get("/audit", params={"target_id": rid, "limit": 50})["items"]
    by_alice = {e["action"] for e in audit if e["actor"] == "operator:alice"}
    assert {"rollout.pause", "rollout.rollback"} <= by_alice, audit

    # browse devices with filters, and groups
    page.click("nav a[data-nav=devices]")
    expect(page.locator("#devices-count")).to_contain_text("device(s)")
    page.select_option("#device-filters select[name=group]", "dock")
    expect(page.locator("#devices-count")).to_have_text("4 of 4 device(s)")
    page.select_option("#device-filters select[name=version]", f"tiny v{back['version']}")
    expect(page.locator("#devices-table tbody tr")).to_have_count(4)
    page.select_option("#device-filters select[name=version]", "")
    page.fill("#device-filters input[name=q]", devices[2])
    expect(page.locator("#devices-table tbody tr")).to_have_count(1)
    expect(page.locator(f"tr[data-device='{devices[2]}']")).to_contain_text("site=dock")
    page.fill("#device-filters input[name=q]", "")
    page.select_option("#device-filters select[name=state]", "ok")
    expect(page.locator("#devices-count")).to_have_text("4 of 4 device(s)")
    console.shot("4-devices-filtered")
    page.click("nav a[data-nav=groups]")
    row = page.locator("#groups-table tr[data-group=dock]")
    expect(row).to_contain_text("site=dock")
    expect(row.locator("td").nth(3)).to_have_text("4")
    page.fill("#group-filters input[name=q]", "no-such-group")
    expect(page.locator("#groups-count")).to_have_text(f"0 of {_group_count(server)} group(s)")
    page.fill("#group-filters input[name=q]", "")
    console.shot("5-groups")

    # the review page, signed in through the console's link (a same-origin form post)
    page.click("#review-link")
    expect(page.locator("h1")).to_contain_text("edgefleet telemetry review")
    assert "token" not in page.url
    console.shot("7-review-from-console")
    assert console.errors == []
    assert console.failed == []


def _group_count(s: Server) -> int:
    return int(s.get("/groups")["total"])


def test_a_viewer_sees_the_console_and_every_action_is_refused(
    server: Server, console: Console
) -> None:
    ro = reported_rollout(server, "yard")
    token = server.operator_token("victor", "viewer")
    page = console.page
    console.sign_in(server.url, token, "victor (viewer)")
    console.open_rollout(ro.id)
    expect(page.locator("#r-status")).to_have_attribute("data-status", "running")
    expect(page.locator("#r-actions-hint")).to_contain_text("viewer")
    # why a device refused the candidate, with the count
    refusal = page.locator("#r-refusals tbody tr").first
    expect(refusal).to_contain_text("expired")
    expect(refusal).to_contain_text(f"1: {ro.canaries[0]}")
    expect(refusal).to_contain_text("bundle expired at 2020-01-01T00:00:00Z")
    expect(page.locator("#r-states tr[data-key='refused or failed'] td")).to_have_text("1")

    page.click("#r-actions button[data-action=pause]")
    flash = page.locator("#flash")
    expect(flash).to_contain_text("The server refused to pause the rollout: permission_denied")
    expect(flash).to_contain_text("victor is a viewer")
    expect(page.locator("#r-status")).to_have_attribute("data-status", "running")
    console.shot("6-viewer-refused")
    page.click("#r-actions button[data-action=rollback]")
    expect(flash).to_contain_text("The server refused to roll back the rollout: permission_denied")
    assert status_of(server, ro.id)["status"] == "running"
    audit = server.get("/audit", params={"target_id": ro.id, "limit": 50})["items"]
    assert not [e for e in audit if e["actor"] == "operator:victor"], audit

    # followed live: an operator pauses it elsewhere (the CLI's call); the open page shows
    # it within a poll, without a reload
    server.post(f"/rollouts/{ro.id}/pause", json={"reason": "paused from the CLI"})
    expect(page.locator("#r-status")).to_have_attribute("data-status", "paused")
    expect(page.locator("dd[data-fact='paused by']")).to_contain_text("paused from the CLI")
    expect(page.locator("#r-actions button[data-action=resume]")).to_be_visible()

    # the viewer browses devices and groups all the same
    page.click("nav a[data-nav=devices]")
    page.select_option("#device-filters select[name=group]", "yard")
    expect(page.locator("#devices-count")).to_have_text("4 of 4 device(s)")
    page.click("nav a[data-nav=groups]")
    expect(page.locator("#groups-table tr[data-group=yard]")).to_be_visible()

    assert console.errors == []
    # the two refusals are the only failed requests the browser saw
    assert console.failed == [(403, "pause"), (403, "rollback")]


def test_a_wrong_token_is_refused_at_sign_in(server: Server, console: Console) -> None:
    page = console.page
    page.goto(f"{server.url}/console")
    page.fill("#token", "eft_not-a-token")
    page.click("#login-submit")
    expect(page.locator("#flash")).to_contain_text("Sign-in refused: invalid_token")
    console.shot("8-sign-in-refused")
    expect(page.locator("#nav")).to_be_hidden()
    assert page.evaluate("sessionStorage.length") == 0
    assert console.errors == []
    assert console.failed == [(401, "whoami")]


def test_the_console_is_served_with_a_strict_policy_and_the_review_sign_in_is_same_origin(
    server: Server,
) -> None:
    r = httpx.get(f"{server.url}/console")
    assert r.status_code == 200 and "edgefleet console" in r.text
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "connect-src 'self'" in csp
    assert "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
    assert "<script>" not in r.text  # no inline script: the policy would block it anyway
    js = httpx.get(f"{server.url}/console/static/console.js")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    assert "innerHTML" not in js.text  # server data is written as text, never as markup
    assert httpx.get(f"{server.url}/console/static/..%2Fconsole.py").status_code == 404
    assert httpx.get(f"{server.url}/console/static/index.html").status_code == 404
    # the review's sign-in form accepts posts from this server's pages only
    viewer = server.operator_token("cross-site-check", "viewer")
    for headers in ({"Origin": "http://elsewhere.example"}, {"Sec-Fetch-Site": "cross-site"}):
        r = httpx.post(f"{server.url}/dashboard/login", data={"token": viewer}, headers=headers)
        assert r.status_code == 403 and "set-cookie" not in r.headers, r.text
    r = httpx.post(
        f"{server.url}/dashboard/login",
        data={"token": viewer},
        headers={"Origin": server.url, "Sec-Fetch-Site": "same-origin"},
    )
    assert r.status_code == 303 and "HttpOnly" in r.headers["set-cookie"], r.text
    bad = httpx.post(f"{server.url}/dashboard/login", data={"token": "eft_wrong"})
    assert bad.status_code == 401  # and a cookie it had is dropped
    assert "Max-Age=0" in bad.headers.get("set-cookie", "Max-Age=0")


def test_a_revoked_token_signs_the_console_out_at_its_next_request(
    server: Server, console: Console
) -> None:
    op = server.post("/operators", json={"name": "rita", "role": "operator"})
    issued = server.post(f"/operators/{op['id']}/tokens", json={})
    page = console.page
    console.sign_in(server.url, issued["token"], "rita (operator)")
    expect(page.locator("#rollouts-count")).to_contain_text("refreshes every")
    r = server.admin.delete(f"/api/v1/operators/{op['id']}/tokens/{issued['id']}")
    assert r.status_code == 204, r.text
    # the rollout list's next refresh meets the 401: back to the sign-in form
    expect(page.locator("#login-form")).to_be_visible()
    expect(page.locator("#flash")).to_contain_text("Sign in again: the operator token is")
    assert page.evaluate("sessionStorage.length") == 0
    assert console.errors == []
    assert console.failed and {status for status, _ in console.failed} == {401}
