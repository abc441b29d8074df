"""Processes the demo starts and stops by their own PIDs: the fleet server."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx

from fleet_server.broker.mosquitto import free_port

SERVER_SNIPPET = """
import uvicorn
from fleet_server.app import create_app
from fleet_server.pki.serve import server_names, uvicorn_tls_options
from fleet_server.settings import ServerSettings
s = ServerSettings()
tls = {{}}
if s.ca_dir is not None:
    tls = uvicorn_tls_options(s.ca_dir, s.tls_dir, server_names("127.0.0.1", s.tls_names))
uvicorn.run(create_app(s), host="127.0.0.1", port={port}, log_level="warning", **tls)
"""


class ServerProcess:
    """``fleet_server`` in its own process, configured through EDGEFLEET_SERVER_* variables."""

    def __init__(self, workdir: Path, settings: dict[str, str], port: int | None = None) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.settings = settings
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "server.log"

    @property
    def url(self) -> str:
        """``https://`` when the settings name a fleet CA (``ca_dir``), else ``http://``."""
        scheme = "https" if self.settings.get("ca_dir") else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    @property
    def verify(self) -> ssl.SSLContext | bool:
        """What an HTTP client verifies the server with: the fleet CA, or True."""
        ca_dir = self.settings.get("ca_dir")
        return ssl.create_default_context(cafile=Path(ca_dir) / "ca.crt") if ca_dir else True

    def start(self, timeout: float = 60.0) -> ServerProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_SERVER_")}
        env.update({f"EDGEFLEET_SERVER_{k.upper()}": v for k, v in self.settings.items()})
        log = open(self.log, "ab")  # noqa: SIM115 - owned by the child process
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVER_SNIPPET.format(port=self.port)],
            env=env,
            cwd=self.workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"the server exited at start; see {self.log}:\n" + self.log.read_text()[-2000:]
                )
            try:
                r = httpx.get(f"{self.url}/healthz", timeout=1.0, verify=self.verify)
                if r.status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the server did not answer /healthz in {timeout}s; see {self.log}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None
