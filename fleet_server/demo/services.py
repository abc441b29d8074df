"""Processes the demo starts and stops by their own PIDs: the fleet server."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from fleet_server.broker.mosquitto import free_port

SERVER_SNIPPET = """
import uvicorn
from fleet_server.app import create_app
from fleet_server.settings import ServerSettings
uvicorn.run(create_app(ServerSettings()), host="127.0.0.1", port={port}, log_level="warning")
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
        return f"http://127.0.0.1:{self.port}"

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
                if httpx.get(f"{self.url}/healthz", timeout=1.0).status_code == 200:
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
