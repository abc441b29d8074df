"""``tflite:int8-full-io`` end to end: a trained model converted to full-integer int8 with
int8 inputs and outputs through the pipeline, parity judged on held-out samples the way a
device feeds it (quantize on feed, dequantize the outputs), packed with the I/O scale and
zero point in the manifest, installed on a real agent, and served from float inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from converters.pipeline import build_bundles
from converters.source import from_onnx
from converters.targets import parse_target
from device_agent.agent import Agent
from device_agent.bundle import TrustStore
from device_agent.config import AgentConfig
from tests.converters.tflite.test_int8_full import export
from tests.converters.zoo.trained import train
from tests.tflite_models import run_tflite


def test_int8_io_target_builds_installs_and_serves_float_callers(tmp_path: Path) -> None:
    from converters.tflite import onnx_to_tflite

    module, data = train("digits_cnn")
    model = export(module, data.train_x)
    key = Ed25519PrivateKey.generate()
    (result,) = build_bundles(
        from_onnx(model, task="classification"),
        [parse_target("tflite:int8-full-io")],
        tmp_path / "out",
        name="digits",
        version=1,
        signing_key=key,
        samples={"x": data.train_x[:400]},
    )
    assert result.error is None, result.error
    assert result.bundle is not None and result.artifact is not None
    parity = result.artifact.parity
    assert parity.passed, parity.summary()
    assert parity.calibration_samples == 200 and parity.batch_sizes[0] == 1

    trust = TrustStore()
    trust.add(key.public_key(), comment="test")
    agent = Agent(AgentConfig.from_dict({"device": {"state_dir": str(tmp_path / "dev")}}))
    try:
        installed = agent.install_file(result.bundle, trust, state_dir=tmp_path / "dev")
        (inp,), (out,) = installed.manifest.inputs, installed.manifest.outputs
        assert (inp.dtype, out.dtype) == ("int8", "int8")
        assert inp.quantization is not None and out.quantization is not None
        x = data.test_x[:200]
        got = np.concatenate([agent.predict(x[i : i + 1])[0] for i in range(len(x))])
        assert got.dtype == np.float32
        want = run_tflite(onnx_to_tflite(model), x)
        assert (got.argmax(1) == want.argmax(1)).mean() >= 0.98
    finally:
        agent.close()


def test_int8_io_target_without_calibration_samples_is_refused(tmp_path: Path) -> None:
    module, data = train("digits_cnn")
    (result,) = build_bundles(
        from_onnx(export(module, data.train_x), task="classification"),
        [parse_target("tflite:int8-full-io")],
        tmp_path,
        name="digits",
        version=1,
    )
    assert result.bundle is None and "int8-full-io" in str(result.error)
    assert "--samples" in str(result.error)
