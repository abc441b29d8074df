"""The dashboard in a real headless Chromium, served by a real uvicorn process.

The browser is Debian's ``chromium``, driven over the Chrome DevTools Protocol
on ``--remote-debugging-pipe`` (file descriptors 3 and 4; no port, no extra
package). Screenshots land in ``test-artifacts/``.
"""

from __future__ import annotations

import base64
import json
import os
import selectors
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fleet_server.db.session import make_engine
from tests.fleet_server.report.test_fixtures import (
    BUNDLES_ENV,
    DB_ENV,
    Scenario,
    add_operator,
    populate,
)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[3] / "test-artifacts"
VIEWER = "eft_dashboard-viewer-" + "v" * 24
REVOKED = "eft_dashboard-revoked-" + "r" * 24


class Browser:
    """A headless Chromium and a minimal CDP client over its debugging pipe."""

    def __init__(self, profile: Path) -> None:
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()
        # the child must find the pipe on fds 3 (reads commands) and 4 (writes replies)
        os.set_inheritable(to_child_r, True)
        os.set_inheritable(from_child_w, True)
        args = [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            "--remote-debugging-pipe",
            f"--user-data-dir={profile}",
            "about:blank",
        ]

        def fds_3_4() -> None:  # runs in the child before exec
            os.dup2(to_child_r, 3)
            os.dup2(from_child_w, 4)

        self.log = open(profile.parent / "chromium.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            close_fds=False,
            preexec_fn=fds_3_4,
        )
        os.close(to_child_r)
        os.close(from_child_w)
        self._buf = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        os.close(self._to_child)
        os.close(self._from_child)
        self.log.close()

    def _read_message(self, deadline: float) -> dict[str, Any]:
        sel = selectors.DefaultSelector()
        sel.register(self._from_child, selectors.EVENT_READ)
        try:
            while b"\0" not in self._buf:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    raise TimeoutError("no message from Chromium in time")
                chunk = os.read(self._from_child, 1 << 20)
                if not chunk:
                    raise RuntimeError("Chromium closed its debugging pipe")
                self._buf += chunk
        finally:
            sel.close()
        raw, _, self._buf = self._buf.partition(b"\0")
        msg: dict[str, Any] = json.loads(raw)
        return msg

    def send(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        *,
        session: str | None = None,
        timeout: float = 30,
    ) -> dict[str, Any]:
        self._next_id += 1
        msg: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_child, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                result: dict[str, Any] = reply.get("result", {})
                return result
            self.events.append(reply)

    def wait_event(self, method: str, *, session: str, timeout: float = 30) -> dict[str, Any]:
        for i, ev in enumerate(self.events):
            if ev.get("method") == method and ev.get("sessionId") == session:
                return self.events.pop(i)
        deadline = time.monotonic() + timeout
        while True:
            ev = self._read_message(deadline)
            if ev.get("method") == method and ev.get("sessionId") == session:
                return ev
            self.events.append(ev)

    def new_page(self, width: int = 1280, height: int = 900) -> Page:
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        sid = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable", session=sid)
        self.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
            session=sid,
        )
        return Page(self, sid)


class Page:
    def __init__(self, browser: Browser, session: str) -> None:
        self.b = browser
        self.sid = session

    def goto(self, url: str, timeout: float = 30) -> None:
        """Navigate and wait until the new document has loaded."""
        self.b.events = [
            e
            for e in self.b.events
            if not (e.get("sessionId") == self.sid and e.get("method") == "Page.loadEventFired")
        ]
        loader = self.b.send("Page.navigate", {"url": url}, session=self.sid).get("loaderId")
        self.b.wait_event("Page.loadEventFired", session=self.sid, timeout=timeout)
        deadline = time.monotonic() + timeout
        while self.eval("document.readyState") != "complete" or not loader:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not finish loading")
            time.sleep(0.05)

    def eval(self, expression: str) -> Any:
        r = self.b.send(
            "Runtime.evaluate", {"expression": expression, "returnByValue": True}, session=self.sid
        )
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def console_errors(self) -> list[str]:
        """Console errors, uncaught exceptions and failed loads logged on this page so far."""
        self.eval("0")  # drain pending events into the queue
        out = []
        for ev in self.b.events:
            if ev.get("sessionId") != self.sid:
                continue
            m, p = ev.get("method"), ev.get("params", {})
            if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append(
                    " ".join(str(a.get("value", a.get("description"))) for a in p.get("args", []))
                )
            elif m == "Runtime.exceptionThrown":
                out.append(str(p.get("exceptionDetails", {}).get("text")))
            elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                out.append(f"{p['entry'].get('text')} ({p['entry'].get('url')})")
        return out

    def screenshot(self, path: Path, *, full_page: bool = True) -> bytes:
        if full_page:
            height = int(self.eval("document.documentElement.scrollHeight"))
            width = int(self.eval("document.documentElement.clientWidth"))
            self.b.send(
                "Emulation.setDeviceMetricsOverride",
                {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
                session=self.sid,
            )
        data = base64.b64decode(
            self.b.send("Page.captureScreenshot", {"format": "png"}, session=self.sid)["data"]
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return data


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Scenario]]:
    """The fixture fleet's database served by ``uvicorn`` (a separate process) on a free port."""
    tmp = tmp_path_factory.mktemp("dashboard")
    url = f"sqlite:///{tmp / 'server.db'}"
    engine = make_engine(url)
    scenario = populate(engine, tmp)
    add_operator(engine, "viewer-vera", "viewer", VIEWER)
    add_operator(engine, "gone-gus", "admin", REVOKED, revoked=True)
    engine.dispose()
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_SERVER_")}
    env.update({DB_ENV: url, BUNDLES_ENV: str(tmp / "bundles")})
    log = open(tmp / "uvicorn.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            "tests.fleet_server.report.test_fixtures:dashboard_app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=Path(__file__).resolve().parents[3],
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"uvicorn exited:\n{(tmp / 'uvicorn.log').read_text()}")
            try:
                httpx.get(f"{base}/dashboard/data.json", timeout=1)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield base, scenario
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    if not os.path.exists(CHROMIUM):
        pytest.fail("Debian's chromium is required: apt-get install -y chromium")
    b = Browser(tmp_path_factory.mktemp("chromium") / "profile")
    try:
        b.send("Browser.getVersion", timeout=60)
        yield b
    finally:
        b.close()


@pytest.fixture(scope="module")
def dashboard(served: tuple[str, Scenario], browser: Browser) -> Page:
    """The dashboard opened the way a person opens it: once with ?token=, then by cookie."""
    base, _ = served
    page = browser.new_page()
    page.goto(f"{base}/dashboard?hours=24&token={VIEWER}")
    return page


def test_page_loads_and_shows_the_fleet(dashboard: Page, served: tuple[str, Scenario]) -> None:
    _, sc = served
    assert dashboard.eval("document.title") == "edgefleet telemetry review, last 24 h"
    rows = dashboard.eval(
        "[...document.querySelectorAll('#fleet-devices tbody tr')].map(r => r.cells[0].textContent)"
    )
    assert rows == sorted(d.id for d in sc.devices)
    size = dashboard.eval("document.querySelector('[data-key=fleet-size] .num').textContent")
    assert size == str(len(sc.devices))
    # the rows are on screen, not just in the DOM
    visible = dashboard.eval(
        "document.querySelector('#fleet-devices tbody tr').getBoundingClientRect().height"
    )
    assert visible > 10


def test_page_logs_no_console_errors(dashboard: Page) -> None:
    assert dashboard.console_errors() == []


def test_every_plot_is_laid_out_in_the_browser(dashboard: Page) -> None:
    sizes = dashboard.eval(
        "Object.fromEntries([...document.querySelectorAll('svg[data-plot]')].map(s => "
        "[s.dataset.plot, [s.getBoundingClientRect().width, s.getBoundingClientRect().height]]))"
    )
    assert set(sizes) == {"adoption", "timeline", "latency", "drift", "predictions"}
    for name, (w, h) in sizes.items():
        assert w > 300 and h > 150, (name, w, h)


def test_summary_names_the_gate_that_caught_the_bad_rollout(dashboard: Page) -> None:
    text = dashboard.eval("document.querySelector('#summary').innerText")
    assert "kws v3 to all" in text and "rolled back" in text
    assert "caught at stage 1 (10%) by gate error_rate" in text
    assert "kws v2 to all" in text and "succeeded after 3 stages" in text


def test_token_moves_into_an_httponly_cookie(dashboard: Page, served: tuple[str, Scenario]) -> None:
    base, _ = served
    assert dashboard.eval("location.href") == f"{base}/dashboard?hours=24"
    assert VIEWER not in dashboard.eval("document.cookie")  # HttpOnly: not readable by scripts
    # the cookie carries the next visit: another range without any token
    dashboard.goto(f"{base}/dashboard?hours=6")
    assert dashboard.eval("document.title") == "edgefleet telemetry review, last 6 h"
    assert dashboard.console_errors() == []
    dashboard.goto(f"{base}/dashboard?hours=24")


def test_screenshots_are_kept_as_artifacts(
    dashboard: Page, browser: Browser, served: tuple[str, Scenario]
) -> None:
    base, _ = served
    full = ARTIFACTS / "dashboard-full.png"
    png = dashboard.screenshot(full)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 50_000
    top = browser.new_page(1280, 900)
    top.goto(f"{base}/dashboard?hours=24")  # the cookie is shared by the browser profile
    shot = top.screenshot(ARTIFACTS / "dashboard-top.png", full_page=False)
    assert len(shot) > 20_000
    assert top.console_errors() == []


def test_page_without_a_token_explains_how_to_get_in(
    browser: Browser, served: tuple[str, Scenario]
) -> None:
    base, _ = served
    r = httpx.get(f"{base}/dashboard")
    assert r.status_code == 401
    assert "operator token" in r.text and "<svg" not in r.text


def test_wrong_and_revoked_tokens_are_refused(served: tuple[str, Scenario]) -> None:
    base, _ = served
    for token in ("eft_not-a-token", REVOKED):
        page = httpx.get(f"{base}/dashboard", params={"token": token})
        assert page.status_code == 401 and "devices in the fleet" not in page.text
        data = httpx.get(
            f"{base}/dashboard/data.json", headers={"Authorization": f"Bearer {token}"}
        )
        assert data.status_code == 401
        assert data.json()["error"]["code"] == "invalid_token"
        cookie = httpx.get(f"{base}/dashboard", cookies={"edgefleet_token": token})
        assert cookie.status_code == 401


def test_data_json_carries_the_numbers_of_the_page(served: tuple[str, Scenario]) -> None:
    base, sc = served
    r = httpx.get(
        f"{base}/dashboard/data.json",
        params={"hours": 24},
        headers={"Authorization": f"Bearer {VIEWER}"},
    )
    assert r.status_code == 200 and r.headers["cache-control"] == "no-store"
    data = r.json()
    assert data["format"] == "edgefleet-review/1"
    assert [d["id"] for d in data["fleet"]["devices"]] == sorted(d.id for d in sc.devices)
    assert {r["id"]: r["status"] for r in data["rollouts"]} == {
        "r-good": "succeeded",
        "r-bad": "rolled_back",
    }
    page = httpx.get(
        f"{base}/dashboard", params={"hours": 24}, headers={"Authorization": f"Bearer {VIEWER}"}
    )
    assert page.status_code == 200
    for cell in data["drift"]:
        assert f"{cell['psi']:.2f}" in page.text


def test_dashboard_is_read_only_and_validates_hours(served: tuple[str, Scenario]) -> None:
    base, _ = served
    auth = {"Authorization": f"Bearer {VIEWER}"}
    assert httpx.post(f"{base}/dashboard", headers=auth).status_code == 405
    assert httpx.delete(f"{base}/dashboard/data.json", headers=auth).status_code == 405
    assert httpx.get(f"{base}/dashboard", params={"hours": 0}, headers=auth).status_code == 422
    assert httpx.get(f"{base}/dashboard", params={"hours": "lots"}, headers=auth).status_code == 422


def test_the_server_app_serves_the_dashboard(tmp_path: Path) -> None:
    """``create_app`` mounts the router; the server's own tokens open it."""
    from fastapi.testclient import TestClient

    from fleet_server.app import create_app
    from fleet_server.settings import ServerSettings

    admin = "eft_dashboard-admin-" + "a" * 24
    app = create_app(
        ServerSettings(
            database_url=f"sqlite:///{tmp_path / 'server.db'}",
            bundle_dir=tmp_path / "bundles",
            admin_bootstrap_token=admin,
            run_scheduler=False,
        )
    )
    with TestClient(app) as client:
        data = client.get("/dashboard/data.json", headers={"Authorization": f"Bearer {admin}"})
        assert data.status_code == 200, data.text
        assert data.json()["fleet"]["devices"] == []
        page = client.get("/dashboard", params={"token": admin}, follow_redirects=False)
        assert page.status_code == 303 and page.headers["location"] == "/dashboard?hours=24"
        assert "httponly" in page.headers["set-cookie"].lower()
        assert client.get("/dashboard").status_code == 200  # the cookie now carries the token
        assert client.get("/dashboard/data.json").status_code == 200


def test_static_report_opens_from_a_file_with_every_plot(browser: Browser, tmp_path: Path) -> None:
    """The file `edgefleet report` writes needs no server: open it from disk."""
    from fleet_server.report.render import write_report
    from fleet_server.report.synthetic import synthetic_dataset

    out = tmp_path / "report.html"
    write_report(synthetic_dataset(devices=90), out)
    page = browser.new_page()
    page.goto(out.as_uri())
    plots = page.eval(
        "[...document.querySelectorAll('svg[data-plot]')]"
        ".filter(s => s.getBoundingClientRect().width > 300)"
        ".map(s => s.dataset.plot)"
    )
    assert sorted(plots) == ["adoption", "drift", "latency", "predictions", "timeline"]
    assert page.eval("document.querySelectorAll('#fleet-devices tbody tr').length") == 90
    assert page.console_errors() == []
    page.screenshot(ARTIFACTS / "report-file.png")
