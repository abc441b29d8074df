"""Simulated devices that run their class's own runtime, each in a process of its own.

A :class:`~fleet_server.simulator.device.SimDevice` runs its agent inside the simulator's
process, so every TFLite device there runs ai-edge-litert on numpy 2, whatever its class.
A class whose runtime cannot share that environment (``aarch64-legacy``: tflite-runtime
2.14, built against numpy 1) gets:

* :func:`runtime_env`: a virtual environment with the agent's dependencies and the class's
  runtime extra from the edgefleet package metadata (for ``aarch64-legacy``:
  ``tflite-runtime==2.14.0`` and ``numpy<2``), built once and cached under ``cache_dir``
  keyed by the Python version and the requirements (a lock makes concurrent builds wait
  for one another; a build goes into a staging folder renamed into place when complete);
  it is probed after the build: the runtime imports, the agent's TFLite backend picks it
  there, and :class:`RuntimeEnv` records its version and numpy's;
* :class:`ProcessDevice`: the device's agent as ``edgefleet-agent run`` in a process on that
  environment's Python, with this simulator's code on ``PYTHONPATH`` (the same agent, not
  an installed copy). The simulator drives its predictions through the agent's local serving
  endpoint (a Unix socket), the way an application on the board calls it; the agent counts
  them in its telemetry as for any other device.

:func:`run_in_own_processes` turns a fleet's devices of one class into process devices
before they enroll and start.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import IO, Any

from fleet_server.simulator.device import SimDevice, _set_toml

Progress = Callable[[str], None]

#: the code this simulator runs (device_agent and its siblings), put on the child's path
CODE_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class ClassRuntime:
    """A class's runtime: the edgefleet extra that installs it and the module it imports."""

    extra: str
    module: str
    distribution: str


#: the classes whose runtime cannot run in the simulator's own environment
CLASS_RUNTIMES: dict[str, ClassRuntime] = {
    "aarch64-legacy": ClassRuntime("agent-tflite-legacy", "tflite_runtime", "tflite-runtime"),
}


class RuntimeEnvError(RuntimeError):
    """The class's runtime environment could not be built; the message says why."""


@dataclass(frozen=True)
class RuntimeEnv:
    """A built environment: its Python and what it runs."""

    device_class: str
    python: Path
    runtime: str  # "tflite-runtime 2.14.0"
    numpy: str  # "1.26.4"

    def describe(self) -> str:
        return f"{self.runtime} with numpy {self.numpy}"


def class_requirements(extra: str, distribution: str = "edgefleet") -> list[str]:
    """The agent's base requirements plus those of ``extra``, from the package metadata.

    A requirement of the extra loses its ``extra == ...`` marker; other markers
    (``python_version``) are kept for pip to evaluate.
    """
    try:
        declared = metadata.requires(distribution) or []
    except metadata.PackageNotFoundError as e:
        raise RuntimeEnvError(
            f"{distribution} is not installed in {sys.executable}: install it (pip install -e .)"
        ) from e
    out: list[str] = []
    found = False
    for req in declared:
        spec, _, marker = req.partition(";")
        marker = marker.strip()
        if not marker:
            out.append(spec.strip())
        elif "extra" in marker:
            if marker.replace("'", '"') == f'extra == "{extra}"':
                out.append(spec.strip())
                found = True
        else:
            out.append(req.strip())
    if not found:
        raise RuntimeEnvError(f"{distribution} declares no extra {extra!r}")
    return out


# what the agent's TFLite backend picks in the environment (device_agent.runtime.tflite)
_PROBE = """
import json
import numpy
import {module}
import device_agent.daemon
from device_agent.runtime.tflite import _tflite_interpreter_class
_, name, version = _tflite_interpreter_class()
print(json.dumps({{"backend": name, "runtime": version, "numpy": numpy.__version__}}))
"""


def _child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The child's environment: this one without agent overrides or a foreign PYTHONPATH."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("EDGEFLEET_AGENT_") and k not in ("PYTHONPATH", "PYTHONHOME")
    }
    env["PYTHONPATH"] = str(CODE_ROOT)
    env.update(extra or {})
    return env


def _probe(python: Path, rt: ClassRuntime) -> dict[str, str]:
    out = subprocess.run(
        [str(python), "-c", _PROBE.format(module=rt.module, distribution=rt.distribution)],
        capture_output=True,
        text=True,
        env=_child_env(),
        timeout=300,
    )
    if out.returncode != 0:
        raise RuntimeEnvError(
            f"{rt.module} does not import in {python}: {out.stderr.strip()[-800:]}"
        )
    probed: dict[str, str] = json.loads(out.stdout.strip().splitlines()[-1])
    if probed["backend"] != rt.distribution:
        raise RuntimeEnvError(
            f"the agent in {python} would run {probed['backend']}, not {rt.distribution}"
        )
    return probed


def runtime_env(device_class: str, cache_dir: Path, progress: Progress | None = None) -> RuntimeEnv:
    """The class's runtime environment under ``cache_dir`` (built on first use)."""
    say = progress or (lambda _msg: None)
    try:
        rt = CLASS_RUNTIMES[device_class]
    except KeyError as e:
        raise RuntimeEnvError(
            f"class {device_class} runs in the simulator's own environment; classes with a "
            f"runtime of their own: {', '.join(sorted(CLASS_RUNTIMES))}"
        ) from e
    requirements = class_requirements(rt.extra)
    blob = json.dumps({"python": sys.version_info[:2], "requirements": requirements})
    key = hashlib.sha256(blob.encode()).hexdigest()[:12]
    cache_dir = Path(cache_dir).resolve()
    cache_dir.mkdir(parents=True, exist_ok=True)
    env_dir = cache_dir / f"runtime-{device_class}-{key}"
    marker = env_dir / ".edgefleet-runtime.json"
    with open(cache_dir / f"runtime-{device_class}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not marker.exists():
            staging = cache_dir / f".runtime-{device_class}-{key}.{os.getpid()}"
            shutil.rmtree(staging, ignore_errors=True)
            say(f"building the {device_class} runtime environment ({', '.join(requirements)})")
            try:
                subprocess.run(
                    [sys.executable, "-m", "venv", str(staging)],
                    check=True,
                    capture_output=True,
                    timeout=300,
                )
                pip = subprocess.run(
                    [
                        str(staging / "bin" / "python"),
                        "-m",
                        "pip",
                        "install",
                        "-q",
                        "--disable-pip-version-check",
                        *requirements,
                    ],
                    capture_output=True,
                    text=True,
                    timeout=1200,
                )
            except (OSError, subprocess.SubprocessError) as e:
                shutil.rmtree(staging, ignore_errors=True)
                raise RuntimeEnvError(f"creating the {device_class} environment: {e}") from e
            if pip.returncode != 0:
                shutil.rmtree(staging, ignore_errors=True)
                tail = "\n".join(pip.stderr.strip().splitlines()[-5:])
                raise RuntimeEnvError(
                    f"pip could not install {', '.join(requirements)} for {device_class} "
                    f"(a package index is needed the first time):\n{tail}"
                )
            try:
                probed = _probe(staging / "bin" / "python", rt)
            except RuntimeEnvError:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            (staging / marker.name).write_text(
                json.dumps({"requirements": requirements, **probed}, indent=2) + "\n"
            )
            shutil.rmtree(env_dir, ignore_errors=True)
            os.replace(staging, env_dir)
        record = json.loads(marker.read_text())
    return RuntimeEnv(
        device_class,
        env_dir / "bin" / "python",
        f"{rt.distribution} {record['runtime']}",
        record["numpy"],
    )


@dataclass
class ProcessDevice(SimDevice):
    """A simulated device whose agent is ``edgefleet-agent run`` in a process of its own,
    on its class's runtime environment; predictions go through its serving socket."""

    env: RuntimeEnv | None = None
    socket_path: Path | None = None
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _log: IO[bytes] | None = field(default=None, repr=False)
    _client: Any = field(default=None, repr=False)

    @classmethod
    def replacing(cls, device: SimDevice, env: RuntimeEnv, socket_dir: Path) -> ProcessDevice:
        """The same device (files, stream, clock) as a process device; its agent
        configuration gets a short serving socket path (Unix paths stop at 108 bytes)."""
        socket_path = Path(socket_dir) / f"{device.device_id}.sock"
        text = _set_toml(device.config_path.read_text(), "serving", "socket", str(socket_path))
        device.config_path.write_text(text)
        return cls(
            device.device_id,
            device.device_class,
            device.root,
            device.stream,
            device.config_path,
            clock=device.clock,
            env=env,
            socket_path=socket_path,
        )

    def start(self) -> None:
        """Boot: start the agent process over the device's state directory."""
        if self.env is None:
            raise RuntimeEnvError(f"{self.device_id}: no runtime environment")
        with self._lock:
            if self.online:
                return
            self._log = open(self.root / "agent.log", "ab")  # noqa: SIM115 - closed in stop()
            self._proc = subprocess.Popen(
                [
                    str(self.env.python),
                    "-c",
                    "from device_agent.cli import main; main()",
                    "--config",
                    str(self.config_path),
                    "run",
                ],
                env=_child_env(),
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
            )
            self.online = True

    def stop(self) -> None:
        """Power off cleanly: SIGTERM, then SIGKILL after 10 s."""
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None
            if self._proc is not None:
                self._proc.terminate()
                try:
                    self._proc.wait(10)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait(10)
            self._proc = None
            if self._log is not None:
                self._log.close()
                self._log = None
            self.online = False

    @property
    def agent(self) -> None:
        """No agent object here: it runs in another process."""
        return None

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def version(self) -> int | None:
        """The version ``active.json`` names (the agent's switch writes it atomically)."""
        from device_agent.update.slots import Slots

        active = Slots(self.root / "state").active()
        return active.version if active is not None else None

    def predict_many(self, n: int) -> None:
        """Run ``n`` single-row predictions on the device's serving endpoint."""
        from device_agent.agent import AgentError
        from device_agent.serving.client import ServingClient

        if not self.alive() or self.version() is None or self.socket_path is None:
            return
        if self._client is None:
            self._client = ServingClient(self.socket_path, timeout=30)
        x = self.stream.next_batch(n)
        for i in range(n):
            try:
                self._client.predict(x[i : i + 1])
                self.predictions += 1
            except (AgentError, OSError):  # refusals too (no model during a switch)
                self.errors += 1  # the agent counts its own failures


def run_in_own_processes(
    devices: list[SimDevice], device_class: str, env: RuntimeEnv
) -> tuple[list[SimDevice], Path]:
    """``devices`` with those of ``device_class`` replaced by :class:`ProcessDevice` s on
    ``env`` (before they enroll and start); returns them and the folder of their sockets
    (the caller removes it once the devices are stopped)."""
    socket_dir = Path(tempfile.mkdtemp(prefix="ef-sim-"))
    out: list[SimDevice] = [
        ProcessDevice.replacing(d, env, socket_dir) if d.device_class == device_class else d
        for d in devices
    ]
    return out, socket_dir
