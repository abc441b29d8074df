"""Fixtures for the server tests: a fresh database per test (SQLite file or a new
PostgreSQL database on 127.0.0.1:5432), an app with an admin token, helpers to
create operators, enroll devices and upload bundles, and a real uvicorn server.

Import the fixtures you use into the test module::

    from tests.server_fixtures import db_url, fleet  # noqa: F401
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from converters.keys import KeyStore
from fleet_server.app import create_app
from fleet_server.settings import ServerSettings
from tests.bundlesim import BundleSim
from tests.pg import fresh_database

ADMIN_TOKEN = "eft_test-admin-" + "x" * 24


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database, dropped afterwards."""
    with fresh_database() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The same test on a SQLite file and on a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'server.db'}"
    url: str = request.getfixturevalue("pg_url")
    return url


@pytest.fixture
def bundle_sim(tmp_path: Path) -> BundleSim:
    return BundleSim(tmp_path / "repo")


def make_settings(tmp_path: Path, db_url: str, **overrides: Any) -> ServerSettings:
    sim_trust = overrides.pop("trust_store", None)
    return ServerSettings(
        database_url=db_url,
        bundle_dir=tmp_path / "bundles",
        admin_bootstrap_token=ADMIN_TOKEN,
        trust_store=sim_trust,
        **overrides,
    )


@dataclass
class Fleet:
    """A TestClient on a fresh server plus helpers that go through the public API."""

    client: TestClient
    sim: BundleSim
    tmp: Path
    admin: dict[str, str] = field(default_factory=lambda: auth(ADMIN_TOKEN))
    #: device id -> Authorization header of every device enrolled through :meth:`enroll`
    enroll_headers: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def ctx(self) -> Any:
        return self.client.app.state.ctx  # type: ignore[attr-defined]

    @property
    def scheduler(self) -> Any:
        return self.client.app.state.scheduler  # type: ignore[attr-defined]

    def operator_token(self, role: str, name: str | None = None) -> str:
        name = name or f"{role}-{secrets.token_hex(3)}"
        r = self.client.post(
            "/api/v1/operators", headers=self.admin, json={"name": name, "role": role}
        )
        assert r.status_code == 201, r.text
        t = self.client.post(
            f"/api/v1/operators/{r.json()['id']}/tokens", headers=self.admin, json={}
        )
        assert t.status_code == 201, t.text
        return str(t.json()["token"])

    def enrollment_token(self, **body: Any) -> str:
        r = self.client.post("/api/v1/enrollment-tokens", headers=self.admin, json=body)
        assert r.status_code == 201, r.text
        return str(r.json()["token"])

    def enroll(
        self, device_id: str, device_class: str = "cam", labels: dict[str, str] | None = None
    ) -> dict[str, str]:
        """Enroll a device; returns its Authorization header."""
        r = self.client.post(
            "/device/v1/enroll",
            json={
                "enrollment_token": self.enrollment_token(),
                "device_id": device_id,
                "device_class": device_class,
                "labels": labels or {},
            },
        )
        assert r.status_code == 201, r.text
        self.enroll_headers[device_id] = auth(r.json()["credential"])
        return self.enroll_headers[device_id]

    def upload_bundle(self, version: int = 2, seed: int = 0, name: str = "tiny") -> dict[str, Any]:
        path = self.sim.publish(
            version=version, seed=seed, name=name, created=_now_minus_day(), valid_for=_days(30)
        )
        with open(path, "rb") as f:
            r = self.client.post(
                "/api/v1/bundles",
                headers=self.admin,
                files={"file": (path.name, f, "application/octet-stream")},
            )
        assert r.status_code == 201, r.text
        return dict(r.json())

    def assign(self, device_id: str, bundle_id: str | None) -> None:
        r = self.client.put(
            f"/api/v1/devices/{device_id}/assignment",
            headers=self.admin,
            json={"desired_bundle_id": bundle_id},
        )
        assert r.status_code == 200, r.text


def _now_minus_day() -> Any:
    from datetime import datetime, timedelta, timezone

    return datetime.now(timezone.utc).replace(microsecond=0) - timedelta(days=1)


def _days(n: int) -> Any:
    from datetime import timedelta

    return timedelta(days=n)


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def server_keys(tmp_path: Path, sim: BundleSim) -> tuple[Path, str, Path]:
    """A server signing key and a trust store holding it and the sim's release key."""
    keys_dir = tmp_path / "server-keys"
    info = KeyStore(keys_dir).generate("server")
    trust = sim.trust("release")
    trust.add(KeyStore(keys_dir).public_key(info.keyid), comment="server")
    trust_path = tmp_path / "trust.json"
    trust.save(trust_path)
    return keys_dir, info.keyid, trust_path


@pytest.fixture
def fleet(tmp_path: Path, db_url: str, bundle_sim: BundleSim) -> Iterator[Fleet]:
    """A fresh server (SQLite and PostgreSQL) trusting the sim's release key and its own key.

    The rollout scheduler does not run by itself; tests drive it with
    ``fleet.scheduler.run_once()``.
    """
    app = create_app(signed_settings(tmp_path, db_url, bundle_sim, run_scheduler=False))
    with TestClient(app) as client:
        yield Fleet(client=client, sim=bundle_sim, tmp=tmp_path)


def signed_settings(
    tmp_path: Path, db_url: str, bundle_sim: BundleSim, **overrides: Any
) -> ServerSettings:
    """Settings of a server that trusts the sim's release key and signs with its own."""
    keys_dir, kid, trust_path = server_keys(tmp_path, bundle_sim)
    return make_settings(
        tmp_path,
        db_url,
        trust_store=trust_path,
        signing_key_dir=keys_dir,
        signing_key=kid,
        **overrides,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LiveServer:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path


def start_server(env_settings: dict[str, str], log: Path, port: int | None = None) -> LiveServer:
    """Start ``edgefleet server`` (uvicorn, factory mode) on a free loopback port."""
    port = port or free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_SERVER_")}
    env.update({f"EDGEFLEET_SERVER_{k.upper()}": v for k, v in env_settings.items()})
    out = open(log, "wb")  # noqa: SIM115 - handed to the child, closed by the OS at exit
    proc = subprocess.Popen(  # `edgefleet server`: uvicorn in factory mode
        [
            sys.executable,
            "-c",
            "from fleet_server.cli import main; main()",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90  # generous: CI machines may be busy
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return LiveServer(url, proc, log)
        except httpx.HTTPError:
            time.sleep(0.05)
    stop_server(proc)
    raise RuntimeError(f"server did not come up in 90 s:\n{log.read_text()}")


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def live_server(tmp_path: Path, db_url: str, bundle_sim: BundleSim) -> Iterator[LiveServer]:
    """A real uvicorn server process on a free port, on the parametrized database."""
    keys_dir, kid, trust_path = server_keys(tmp_path, bundle_sim)
    server = start_server(
        {
            "database_url": db_url,
            "bundle_dir": str(tmp_path / "bundles"),
            "admin_bootstrap_token": ADMIN_TOKEN,
            "trust_store": str(trust_path),
            "signing_key_dir": str(keys_dir),
            "signing_key": kid,
        },
        tmp_path / "server.log",
    )
    try:
        yield server
    finally:
        stop_server(server.proc)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def module_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """One real server per test module and database (for schema-driven runs)."""
    tmp = tmp_path_factory.mktemp("server")
    sim = BundleSim(tmp / "repo")
    keys_dir, kid, trust_path = server_keys(tmp, sim)
    stack = contextlib.ExitStack()
    url = (
        f"sqlite:///{tmp / 'server.db'}"
        if request.param == "sqlite"
        else stack.enter_context(fresh_database())
    )
    server = start_server(
        {
            "database_url": url,
            "bundle_dir": str(tmp / "bundles"),
            "admin_bootstrap_token": ADMIN_TOKEN,
            "trust_store": str(trust_path),
            "signing_key_dir": str(keys_dir),
            "signing_key": kid,
        },
        tmp / "server.log",
    )
    try:
        yield server
    finally:
        stop_server(server.proc)
        stack.close()
