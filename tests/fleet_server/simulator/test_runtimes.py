"""A class's runtime of its own for simulated devices (fleet_server.simulator.runtimes).

The legacy class's environment is built for real (pip, cached under .venv-cache/ like the
demo's) and probed: its agent picks tflite-runtime 2.14 on numpy 1. A process device of
the class installs a signed TFLite bundle with its own agent there and serves it on its
socket with the outputs ai-edge-litert gives here.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from converters.tflite import onnx_to_tflite
from device_agent.bundle import TrustStore
from device_agent.payloads import SmokeSamples
from device_agent.serving.client import ServingClient, ServingClientError
from fleet_server.simulator.device import SimDevice, provision_files
from fleet_server.simulator.runtimes import (
    CLASS_RUNTIMES,
    ProcessDevice,
    RuntimeEnvError,
    _child_env,
    class_requirements,
    run_in_own_processes,
    runtime_env,
)
from fleet_server.simulator.streams import InputStream
from tests.agent_models import make_bundle, mlp_onnx
from tests.tflite_models import run_tflite

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


@pytest.mark.timeout(1500)  # the first build downloads numpy 1 and tflite-runtime
def test_a_legacy_process_device_installs_and_serves_its_bundle_on_tflite_runtime(
    tmp_path: Path,
) -> None:
    """A process device of the legacy class: its agent (``edgefleet-agent`` on the class's
    environment) verifies, smoke-tests and installs a signed TFLite bundle, serves it on
    its socket, and the outputs match the same file run on ai-edge-litert here."""
    env = runtime_env("aarch64-legacy", CACHE)
    key = Ed25519PrivateKey.generate()
    trust = TrustStore()
    trust.add(key.public_key(), comment="release")
    root = tmp_path / "legacy-0"
    (root / "etc").mkdir(parents=True)
    trust.save(root / "etc" / "trust.json")
    # eight inputs, like the simulator's sensor stream that predict_many sends
    tfl = onnx_to_tflite(onnx.load_from_string(mlp_onnx(3, n_in=8)))
    x = np.random.default_rng(4).normal(size=(8, 8)).astype(np.float32)
    want = np.concatenate([run_tflite(tfl, x[i : i + 1]) for i in range(len(x))])
    smoke = SmokeSamples(inputs={"x": x[:2]}, expected={"probs": want[:2]})
    bundle = make_bundle(tmp_path, key, model_bytes=tfl, fmt="tflite", version=3, smoke=smoke)
    cfg = root / "agent.toml"
    cfg.write_text(
        f'[device]\nstate_dir = "{root / "state"}"\ntrust_store = "{root / "etc" / "trust.json"}"\n'
    )
    device = SimDevice("legacy-0", "aarch64-legacy", root, InputStream(0), cfg)
    (proc_device,), socket_dir = run_in_own_processes([device], "aarch64-legacy", env)
    assert isinstance(proc_device, ProcessDevice)

    # install the way a board without a server does: the agent's CLI, on its runtime
    installed = subprocess.run(
        [str(env.python), "-c", "from device_agent.cli import main; main()",
         "--config", str(cfg), "install", str(bundle)],
        capture_output=True, text=True, timeout=300, env=_child_env(),
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr[-2000:]
    assert "installed: m v3" in installed.stdout
    assert proc_device.version() == 3

    proc_device.start()
    try:
        client = ServingClient(proc_device.socket_path, timeout=30)
        deadline = time.monotonic() + 120
        while not _ready(client) and time.monotonic() < deadline:
            assert proc_device.alive(), (root / "agent.log").read_text()[-2000:]
            time.sleep(0.2)
        got = np.concatenate([client.predict(x[i : i + 1])[0] for i in range(len(x))])
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        # the simulator's own driving path counts what it sent
        proc_device.predict_many(5)
        assert proc_device.predictions == 5 and proc_device.errors == 0
        client.close()
        # what the serving process has loaded: tflite-runtime's interpreter, no other
        assert proc_device._proc is not None
        maps = Path(f"/proc/{proc_device._proc.pid}/maps").read_text()
        assert "/tflite_runtime/" in maps and "ai_edge_litert" not in maps
    finally:
        proc_device.stop()
        shutil.rmtree(socket_dir, ignore_errors=True)
    assert not proc_device.alive()


def _ready(client: ServingClient) -> bool:
    try:
        return client.ready()
    except (ServingClientError, OSError):
        return False
