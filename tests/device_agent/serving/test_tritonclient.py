"""The unmodified ``tritonclient[http]`` against a real ``edgefleet-agent run`` process.

The device is set up the documented way: a config file, a trust store, a bundle
installed with ``edgefleet-agent install``, then ``edgefleet-agent run`` with
``[serving] tcp_port`` set (tritonclient speaks TCP). The test reads the local
token the agent made, and calls the agent as any Triton user would: health,
metadata, inference with binary and JSON tensors, and refusals, which come back
as ``InferenceServerException`` with the agent's status and message. At the end
the process is stopped with SIGTERM and the telemetry it wrote counts exactly
the predictions served through the endpoint.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tests.agent_models import mlp_onnx
from tests.brokers import free_port
from tests.device_agent.serving.kit import Signer, raw_request, status_and_json

ROOT = Path(__file__).resolve().parents[3]


@dataclass
class Device:
    proc: subprocess.Popen[bytes]
    state: Path
    port: int
    token: str
    log: Path

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def _cli(config: Path, *args: str) -> list[str]:
    return [
        sys.executable,
        "-c",
        "from device_agent.cli import main; main()",
        "--config",
        str(config),
        *args,
    ]


@pytest.fixture(scope="module")
def device(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Device]:
    root = tmp_path_factory.mktemp("dev")
    signer = Signer(root)
    trust = root / "trust.json"
    signer.trust.save(trust)
    state = root / "state"
    port = free_port()
    config = root / "agent.toml"
    config.write_text(
        f'log_level = "INFO"\n[device]\nid = "dev-serving"\nstate_dir = "{state}"\n'
        f'trust_store = "{trust}"\n[serving]\ntcp_port = {port}\n'
        "[telemetry]\nwindow_seconds = 3600\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("EDGEFLEET_AGENT_CONFIG", None)
    bundle = signer.bundle(mlp_onnx(0), name="mlp", version=1)
    subprocess.run(
        _cli(config, "install", str(bundle)), check=True, env=env, timeout=120, capture_output=True
    )
    log = root / "agent.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(_cli(config, "run"), env=env, stdout=out, stderr=out)
    try:
        token_file = state / "serving.token"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            if token_file.exists() and token_file.read_text().strip():
                dev = Device(proc, state, port, token_file.read_text().strip(), log)
                probe = triton.InferenceServerClient(f"127.0.0.1:{port}")
                try:
                    if probe.is_server_ready(headers=dev.headers):
                        break
                except Exception:  # noqa: BLE001 - not listening yet
                    pass
                finally:
                    probe.close()
            time.sleep(0.1)
        else:
            raise AssertionError(f"the agent did not start serving:\n{log.read_text()}")
        yield dev
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def client(device: Device) -> Iterator[triton.InferenceServerClient]:
    c = triton.InferenceServerClient(f"127.0.0.1:{device.port}")
    yield c
    c.close()


def reference(x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(mlp_onnx(0), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]  # type: ignore[no-any-return]


SERVED = {"count": 0}  # predictions the tests made through the endpoint


def test_health_and_metadata(device: Device, client: triton.InferenceServerClient) -> None:
    h = device.headers
    assert client.is_server_live(headers=h)
    assert client.is_server_ready(headers=h)
    assert client.is_model_ready("mlp", headers=h)
    assert client.is_model_ready("mlp", "1", headers=h)
    assert not client.is_model_ready("resnet", headers=h)
    meta = client.get_model_metadata("mlp", headers=h)
    assert meta["name"] == "mlp" and meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 16]}]
    assert meta["outputs"] == [{"name": "probs", "datatype": "FP32", "shape": [-1, 4]}]
    assert client.get_server_metadata(headers=h)["name"] == "edgefleet-agent"


@pytest.mark.parametrize(
    ("binary_in", "binary_out"), [(True, True), (False, False), (True, False), (False, True)]
)
def test_infer_binary_and_json_tensors(
    device: Device, client: triton.InferenceServerClient, binary_in: bool, binary_out: bool
) -> None:
    x = np.random.default_rng(7).normal(size=(2, 16)).astype(np.float32)
    inp = triton.InferInput("x", [2, 16], "FP32")
    inp.set_data_from_numpy(x, binary_data=binary_in)
    out = triton.InferRequestedOutput("probs", binary_data=binary_out)
    result = client.infer("mlp", [inp], outputs=[out], request_id="req-1", headers=device.headers)
    SERVED["count"] += 1
    np.testing.assert_allclose(result.as_numpy("probs"), reference(x), rtol=1e-5, atol=1e-6)
    response = result.get_response()
    assert response["id"] == "req-1" and response["model_version"] == "1"
    assert response["parameters"]["prediction_id"].startswith("mlp-1-")  # for a later label


def test_infer_with_no_outputs_named_returns_all_in_binary(
    device: Device, client: triton.InferenceServerClient
) -> None:
    x = np.random.default_rng(8).normal(size=(1, 16)).astype(np.float32)
    inp = triton.InferInput("x", [1, 16], "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer("mlp", [inp], model_version="1", headers=device.headers)
    SERVED["count"] += 1
    np.testing.assert_allclose(result.as_numpy("probs"), reference(x), rtol=1e-5, atol=1e-6)


def test_refusals_come_back_as_inference_server_exceptions(
    device: Device, client: triton.InferenceServerClient
) -> None:
    x64 = np.zeros((1, 16), np.float64)
    inp = triton.InferInput("x", [1, 16], "FP64")
    inp.set_data_from_numpy(x64)
    with pytest.raises(InferenceServerException, match="expects FP32") as e:
        client.infer("mlp", [inp], headers=device.headers)
    assert e.value.status() == "400"
    bad = triton.InferInput("x", [1, 15], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 15), np.float32))
    with pytest.raises(InferenceServerException, match="shape") as e:
        client.infer("mlp", [bad], headers=device.headers)
    assert e.value.status() == "400"
    good = triton.InferInput("x", [1, 16], "FP32")
    good.set_data_from_numpy(np.zeros((1, 16), np.float32))
    with pytest.raises(InferenceServerException, match="unknown model") as e:
        client.infer("resnet", [good], headers=device.headers)
    assert e.value.status() == "404"
    with pytest.raises(InferenceServerException, match="token") as e:
        client.infer("mlp", [good])
    assert e.value.status() == "401"


def test_hostile_request_is_refused_and_the_daemon_keeps_serving(
    device: Device, client: triton.InferenceServerClient
) -> None:
    huge = (
        f"POST /v2/models/mlp/infer HTTP/1.1\r\nAuthorization: Bearer {device.token}\r\n"
        "Content-Length: 99999999999\r\n\r\n"
    ).encode()
    status, body = status_and_json(raw_request(("127.0.0.1", device.port), huge))
    assert status == 413 and "max_request_bytes" in body["error"]
    assert device.proc.poll() is None
    assert client.is_server_ready(headers=device.headers)


def test_telemetry_counts_every_prediction_served_through_the_endpoint(device: Device) -> None:
    """Last in the module: stops the agent and reads what its telemetry recorded."""
    device.proc.send_signal(signal.SIGTERM)
    assert device.proc.wait(30) == 0, device.log.read_text()
    db = sqlite3.connect(device.state / "telemetry.db")
    try:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        summary = next(t for t in tables if "summar" in t)
        bodies = [json.loads(r[0]) for r in db.execute(f"SELECT body FROM {summary}")]
    finally:
        db.close()
    served = [b for b in bodies if b.get("model") == "mlp" or b.get("name") == "mlp"]
    assert served, bodies
    assert sum(int(b["count"]) for b in served) == SERVED["count"]
    assert not (device.state / "serving.sock").exists()
