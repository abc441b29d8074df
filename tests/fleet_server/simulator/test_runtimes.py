"""A class's runtime of its own for simulated devices (fleet_server.simulator.runtimes).

The legacy class's environment is built for real (pip, cached under .venv-cache/ like the
demo's) and probed: its agent picks tflite-runtime 2.14 on numpy 1. The fleet demo's test
(tests/e2e/test_demo.py) runs the legacy devices' agents in it through three rollouts.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from fleet_server.simulator.device import SimDevice, provision_files
from fleet_server.simulator.runtimes import (
    CLASS_RUNTIMES,
    ProcessDevice,
    RuntimeEnvError,
    class_requirements,
    run_in_own_processes,
    runtime_env,
)
from fleet_server.simulator.streams import InputStream

CACHE = Path(__file__).resolve().parents[3] / ".venv-cache"


def test_legacy_requirements_are_the_agent_core_plus_its_extra() -> None:
    reqs = class_requirements(CLASS_RUNTIMES["aarch64-legacy"].extra)
    assert "tflite-runtime==2.14.0" in reqs and "numpy<2" in reqs
    assert any(r.startswith("paho-mqtt") for r in reqs)
    # no other runtime, no server or converter dependency
    assert not any(r.startswith(("ai-edge-litert", "onnxruntime", "fastapi")) for r in reqs)


def test_an_unknown_extra_and_a_class_without_a_runtime_of_its_own_are_refused() -> None:
    with pytest.raises(RuntimeEnvError, match="no extra"):
        class_requirements("agent-nonexistent")
    with pytest.raises(RuntimeEnvError, match="own environment"):
        runtime_env("x86_64-gateway", CACHE)


@pytest.mark.timeout(1500)  # the first build downloads numpy 1 and tflite-runtime
def test_legacy_environment_gives_the_agent_tflite_runtime_2_14_on_numpy_1(
    tmp_path: Path,
) -> None:
    env = runtime_env("aarch64-legacy", CACHE)
    assert env.runtime == "tflite-runtime 2.14.0" and env.numpy.startswith("1."), env
    out = subprocess.run(
        [
            str(env.python),
            "-c",
            "import importlib.util, numpy; print(numpy.__version__, "
            "importlib.util.find_spec('ai_edge_litert') is None)",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [env.numpy, "True"], out.stdout

    # a fleet's legacy devices become process devices with a short serving socket
    image = tmp_path / "image"
    image.mkdir()
    (image / "agent.toml").write_text('[device]\nstate_dir = "@STATE_DIR@"\n')
    (image / "trust.json").write_text("{}")
    devices = [
        SimDevice(name, cls, tmp_path / name, InputStream(0), cfg)
        for name, cls in (("legacy-0", "aarch64-legacy"), ("gw-0", "x86_64-gateway"))
        for cfg in [provision_files(image, tmp_path / name, {})]
    ]
    out_devices, socket_dir = run_in_own_processes(devices, "aarch64-legacy", env)
    shutil.rmtree(socket_dir)  # the devices never start here
    legacy, gateway = out_devices
    assert isinstance(legacy, ProcessDevice) and not isinstance(gateway, ProcessDevice)
    assert legacy.socket_path == socket_dir / "legacy-0.sock"
    assert len(str(legacy.socket_path)) < 100
    assert f'socket = "{legacy.socket_path}"' in legacy.config_path.read_text()
    assert legacy.version() is None and legacy.agent is None
