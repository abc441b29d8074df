"""One simulated device: a real agent daemon with its own state directory,
device class, credentials and MQTT connection."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from device_agent.agent import Agent
from device_agent.config import AgentConfig
from device_agent.daemon import AgentDaemon
from device_agent.enroll import enroll
from fleet_server.simulator.streams import InputStream


def provision_files(image_dir: Path, root: Path, overrides: dict[str, dict[str, Any]]) -> Path:
    """Lay out one device from an image: ``etc/agent.toml``, ``etc/trust.json``, ``state/``.

    Does what the image's install.sh does with the configuration (the wheels are
    already installed in this process), then appends ``overrides`` sections.
    """
    etc, state = root / "etc", root / "state"
    etc.mkdir(parents=True, exist_ok=True)
    state.mkdir(parents=True, exist_ok=True)
    text = (image_dir / "agent.toml").read_text()
    text = text.replace("@CONFIG_DIR@", str(etc)).replace("@STATE_DIR@", str(state))
    text = text.replace("@PREFIX@", str(root))
    for section, values in overrides.items():
        for key, value in values.items():
            text = _set_toml(text, section, key, value)
    (etc / "agent.toml").write_text(text)
    shutil.copy(image_dir / "trust.json", etc / "trust.json")
    if (image_dir / "uptane").is_dir():
        shutil.copytree(image_dir / "uptane", etc / "uptane", dirs_exist_ok=True)
    return etc / "agent.toml"


def _toml_value(value: Any) -> str:
    import json

    if isinstance(value, dict):
        return (
            "{ "
            + ", ".join(f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in value.items())
            + " }"
        )
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)


def _set_toml(text: str, section: str, key: str, value: Any) -> str:
    """Set ``key`` in ``[section]`` of a flat TOML text (replace or append)."""
    rendered = f"{key} = {_toml_value(value)}"
    lines = text.splitlines()
    out, in_section, done = [], False, False
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("[") and stripped.endswith("]"):
            if in_section and not done:
                out.append(rendered)
                done = True
            in_section = stripped == f"[{section}]"
        elif in_section and stripped.split("=", 1)[0].strip() == key:
            out.append(rendered)
            done = True
            continue
        out.append(line)
    if in_section and not done:
        out.append(rendered)
        done = True
    if not done:
        out += ["", f"[{section}]", rendered]
    return "\n".join(out) + "\n"


@dataclass
class SimDevice:
    """A device of the simulated fleet."""

    device_id: str
    device_class: str
    root: Path
    stream: InputStream
    config_path: Path
    daemon: AgentDaemon | None = None
    online: bool = False
    clock: Callable[[], float] = time.time
    errors: int = 0
    predictions: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def enroll(self, token: str) -> None:
        cfg = AgentConfig.load(self.config_path, env={})
        enroll(cfg, token, requested_id=self.device_id)

    def credential(self) -> str:
        return (self.root / "etc" / "device-credential").read_text().strip()

    def config(self) -> AgentConfig:
        return AgentConfig.load(self.config_path, env={})

    def start(self) -> None:
        """Boot: a fresh daemon over the device's state directory (like a power-on)."""
        with self._lock:
            if self.online:
                return
            self.daemon = AgentDaemon(self.config(), clock=self.clock).start()
            self.online = True

    def stop(self) -> None:
        """Power off cleanly (an offline spell starts here)."""
        with self._lock:
            if self.daemon is not None:
                self.daemon.stop()
                self.daemon.join(10)
            self.daemon = None
            self.online = False

    def crash_during_install(self, state: str = "staging", timeout: float = 60.0) -> int:
        """Power-cut fault: the device's agent dies (SIGKILL) when its update reaches
        ``state``, in a real ``edgefleet-agent run`` process of its own.

        The device must be offline (stopped) and have a pending assignment change.
        Returns the process's exit status (-9 when the crash happened); call
        :meth:`start` afterwards to boot it again and let the update resume or roll back.
        """
        import os
        import subprocess
        import sys

        if self.online:
            raise RuntimeError("stop the device first; a state directory has one agent")
        env = {
            **os.environ,
            "EDGEFLEET_AGENT_CRASH_AT": state,
            "EDGEFLEET_AGENT_SERVER_POLL_SECONDS": "0.5",
        }
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from device_agent.cli import main; main()",
                "--config",
                str(self.config_path),
                "run",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
            raise RuntimeError(f"{self.device_id}: the update never reached {state!r}") from None

    @property
    def agent(self) -> Agent | None:
        return self.daemon.agent if self.daemon is not None else None

    def version(self) -> int | None:
        agent = self.agent
        model = agent.model if agent is not None else None
        return model.version if model is not None else None

    def predict_many(self, n: int) -> None:
        """Run ``n`` single-row predictions on the active model, as an app would."""
        agent = self.agent
        if agent is None or agent.model is None:
            return
        x = self.stream.next_batch(n)
        for i in range(n):
            try:
                agent.predict(x[i : i + 1])
                self.predictions += 1
            except Exception:  # noqa: BLE001 - the agent counts it; the app carries on
                self.errors += 1
