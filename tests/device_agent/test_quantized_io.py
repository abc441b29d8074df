"""A model with int8 inputs and outputs, served as if its I/O were float.

A digits CNN trained in the test (tests/converters/zoo/trained.py) is converted to
full-integer int8 TFLite with int8 I/O (converters.tflite.quantize_full), packed into
a signed bundle whose manifest records each tensor's dtype, scale and zero point
(read from the file by converters.introspect), installed through the device's own
verify-unpack-smoke-test path, and run by a real ai-edge-litert interpreter.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from converters.bundle import BundleFile, build_manifest, pack_bundle, sign_bundle
from converters.introspect import tflite_signature
from converters.tflite import onnx_to_tflite
from converters.tflite.quantize_full import onnx_to_tflite_int8_full
from device_agent.agent import Agent, InstallError
from device_agent.bundle import Manifest, ManifestError, TrustStore, unpack_bundle
from device_agent.bundle.manifest import canonical_json
from device_agent.bundle.trust import Signature, encode_signatures, key_id
from device_agent.config import AgentConfig, ServingConfig
from device_agent.model import LoadedModel, load_model
from device_agent.payloads import DriftProfile, SmokeSamples
from device_agent.serving import ServingEndpoint
from device_agent.serving.client import ServingClient
from device_agent.telemetry import TelemetryOptions
from tests.agent_models import make_profile
from tests.bundlesim import read_members, replace_data, write_members
from tests.converters.tflite.test_int8_full import CALIBRATION, export
from tests.converters.tflite.test_int8_full import run as run_int8_reference
from tests.converters.zoo.trained import Dataset, train
from tests.device_agent.serving.kit import infer_request, raw_request, status_and_json
from tests.tflite_models import run_tflite


@dataclasses.dataclass
class Int8Kit:
    root: Path
    key: Ed25519PrivateKey
    trust: TrustStore
    data: Dataset
    q8: bytes  # int8-full, int8 input and output
    f32: bytes  # the same ONNX model as float32 TFLite
    smoke: SmokeSamples
    profile: DriftProfile
    n: int = 0

    def bundle(
        self,
        *,
        version: int = 1,
        quantization: bool = True,
        edit: Any = None,
    ) -> Path:
        """A signed bundle of the int8-I/O model; ``quantization=False`` writes the
        manifest as edgefleet did before it recorded quantization parameters; ``edit``
        changes the manifest JSON before it is signed."""
        self.n += 1
        src = self.root / f"src-{self.n}"
        src.mkdir()
        (src / "model.tflite").write_bytes(self.q8)
        (src / "smoke_samples.json").write_bytes(canonical_json(self.smoke.to_json()))
        (src / "drift_profile.json").write_bytes(canonical_json(self.profile.to_json()))
        files = [
            BundleFile(src / "model.tflite", "model.tflite", "model"),
            BundleFile(src / "drift_profile.json", "drift_profile.json", "drift_profile"),
            BundleFile(src / "smoke_samples.json", "smoke_samples.json", "smoke_samples"),
        ]
        inputs, outputs, runtime = tflite_signature(src / "model.tflite")
        if not quantization:
            inputs = [dataclasses.replace(t, quantization=None) for t in inputs]
            outputs = [dataclasses.replace(t, quantization=None) for t in outputs]
        manifest = build_manifest(
            name="digits",
            version=version,
            fmt="tflite",
            files=files,
            inputs=inputs,
            outputs=outputs,
            runtime=runtime,
            created_at=datetime.now(timezone.utc) - timedelta(hours=1),
            valid_for=timedelta(days=30),
        )
        out = self.root / f"digits-{self.n}.efb"
        pack_bundle(out, manifest, files)
        sign_bundle(out, self.key)
        if edit is not None:
            doc = manifest.to_json()
            edit(doc)
            mbytes = canonical_json(doc)
            sig = Signature(keyid=key_id(self.key.public_key()), sig=self.key.sign(mbytes))
            members = replace_data(read_members(out), "manifest.json", mbytes)
            write_members(out, replace_data(members, "manifest.sig", encode_signatures([sig])))
        return out

    def load(self, **kw: Any) -> LoadedModel:
        path = self.bundle(**kw)
        slot = self.root / f"slot-{self.n}"
        unpack_bundle(path, slot, self.trust)
        return load_model(slot, "a")


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> Int8Kit:
    module, data = train("digits_cnn")
    model = export(module, data.train_x)
    q8, report = onnx_to_tflite_int8_full(model, data.train_x[:CALIBRATION], int8_io=True)
    assert [t.dtype for t in (*report.inputs, *report.outputs)] == ["int8", "int8"]
    f32 = onnx_to_tflite(model)
    x = data.test_x[:16]
    smoke = SmokeSamples(
        inputs={"x": x},
        expected={"y": run_tflite(f32, x)},
        check="top1",
        min_top1_agreement=0.9,
    )
    preds = run_tflite(f32, data.train_x[:400])
    profile = make_profile(
        data.train_x[:400], preds, output_name="y", reduction="channel_mean", bins=8
    )
    key = Ed25519PrivateKey.generate()
    trust = TrustStore()
    trust.add(key.public_key(), comment="test")
    return Int8Kit(tmp_path_factory.mktemp("int8io"), key, trust, data, q8, f32, smoke, profile)


@pytest.fixture
def agents() -> Iterator[list[Agent]]:
    made: list[Agent] = []
    yield made
    for a in made:
        a.close()


def new_agent(agents: list[Agent], model: LoadedModel | None = None, **kw: Any) -> Agent:
    cfg = AgentConfig()
    cfg.telemetry.sample_rate = 0.0
    agent = Agent(cfg, None, model=model, start_worker=False, **kw)
    agents.append(agent)
    return agent


def quantize(x: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """The reference quantization: round half to even, clip to int8."""
    return np.clip(np.rint(x / np.float32(scale)) + zero_point, -128, 127).astype(np.int8)


# -- the manifest --------------------------------------------------------------------


def test_manifest_records_dtype_scale_and_zero_point_of_int8_io(kit: Int8Kit) -> None:
    from ai_edge_litert.interpreter import Interpreter

    model = kit.load()
    interp = Interpreter(model_content=kit.q8)
    for spec, d in (
        (model.manifest.inputs[0], interp.get_input_details()[0]),
        (model.manifest.outputs[0], interp.get_output_details()[0]),
    ):
        assert spec.dtype == "int8" and spec.quantization is not None
        assert spec.quantization.scale == pytest.approx(d["quantization"][0], rel=1e-7)
        assert spec.quantization.zero_point == d["quantization"][1]
    doc = model.manifest.to_json()
    assert set(doc["inputs"][0]["quantization"]) == {"scale", "zero_point"}
    # the app sees float32 tensors
    assert [str(t.dtype) for t in (*model.inputs, *model.outputs)] == ["float32", "float32"]
    assert [str(t.dtype) for t in (*model.backend.inputs, *model.backend.outputs)] == [
        "int8",
        "int8",
    ]


def test_per_axis_io_quantization_is_refused_with_a_clear_error(kit: Int8Kit) -> None:
    def per_axis(doc: dict[str, Any]) -> None:
        doc["inputs"][0]["quantization"] = {"scale": [0.1, 0.2, 0.3], "zero_point": [0, 0, 0]}
        doc["inputs"][0]["quantization"]["axis"] = 1

    path = kit.bundle(edit=per_axis)
    with pytest.raises(ManifestError, match="quantized per axis.*per tensor"):
        unpack_bundle(path, kit.root / "refused", kit.trust)
    # scales as a list without an axis are per-axis too
    obj = Manifest.from_bytes(kit.load().manifest.to_bytes()).to_json()
    obj["outputs"][0]["quantization"] = {"scale": [0.1], "zero_point": 3}
    with pytest.raises(ManifestError, match="per axis"):
        Manifest.from_json(obj)


def test_per_axis_io_bundle_is_not_installed_and_the_old_model_keeps_serving(
    kit: Int8Kit, agents: list[Agent], tmp_path: Path
) -> None:
    def per_axis(doc: dict[str, Any]) -> None:
        doc["outputs"][0]["quantization"] = {"scale": [0.1, 0.2], "zero_point": [0, 0], "axis": 1}

    agent = new_agent(agents)
    good = agent.install_file(kit.bundle(version=1), kit.trust, state_dir=tmp_path)
    with pytest.raises(InstallError, match="per axis"):
        agent.install_file(kit.bundle(version=2, edit=per_axis), kit.trust, state_dir=tmp_path)
    assert agent.model is good


@pytest.mark.parametrize(
    ("quant", "message"),
    [
        ({"scale": 0.0, "zero_point": 0}, "scale must be a positive"),
        ({"scale": 0.1, "zero_point": 300}, r"zero_point must be an integer in \[-128, 127\]"),
        ({"scale": 0.1, "zero_point": 0, "bits": 4}, "unknown quantization fields"),
    ],
)
def test_bad_io_quantization_parameters_are_refused(
    kit: Int8Kit, quant: dict[str, Any], message: str
) -> None:
    obj = kit.load().manifest.to_json()
    obj["inputs"][0]["quantization"] = quant
    with pytest.raises(ManifestError, match=message):
        Manifest.from_json(obj)


def test_manifest_disagreeing_with_the_model_file_is_refused_at_load(kit: Int8Kit) -> None:
    from device_agent.runtime import ModelLoadError

    def wrong_scale(doc: dict[str, Any]) -> None:
        doc["inputs"][0]["quantization"]["scale"] *= 2

    path = kit.bundle(edit=wrong_scale)
    unpack_bundle(path, kit.root / "wrong-scale", kit.trust)
    with pytest.raises(ModelLoadError, match="re-pack the bundle"):
        load_model(kit.root / "wrong-scale", "a")


def test_manifest_without_quantization_fields_still_loads_and_serves_as_before(
    kit: Int8Kit, agents: list[Agent]
) -> None:
    """A manifest written before quantization was recorded: the same bytes parse and
    re-encode, the model loads, and the agent serves its raw int8 tensors unchanged."""
    old = kit.load(quantization=False)
    assert "quantization" not in old.manifest.to_bytes().decode()
    assert Manifest.from_bytes(old.manifest.to_bytes()).to_bytes() == old.manifest.to_bytes()
    assert old.io is None
    agent = new_agent(agents, old)
    x8 = quantize(kit.data.test_x[:4], 1.0, 0)
    (y,) = agent.predict(x8)
    assert y.dtype == np.int8
    raw = old.backend.run({"x": x8})[0]
    np.testing.assert_array_equal(y, raw)


# -- serving ---------------------------------------------------------------------


def test_predict_with_float_inputs_matches_the_float_model_within_the_quantization_step(
    kit: Int8Kit, agents: list[Agent], tmp_path: Path
) -> None:
    agent = new_agent(agents)
    model = agent.install_file(kit.bundle(), kit.trust, state_dir=tmp_path)  # smoke test runs
    out_q = model.manifest.outputs[0].quantization
    assert out_q is not None
    x = kit.data.test_x[:200]
    got = np.concatenate([agent.predict(x[i : i + 1])[0] for i in range(len(x))])
    assert got.dtype == np.float32
    # exactly what the int8 model computes on the quantized input, dequantized: at most
    # one output step apart (a tie rounded differently by the reference's float64 division)
    reference = run_int8_reference(kit.q8, x)
    assert np.abs(got - reference).max() <= out_q.scale * 1.001
    # and the float model within a few quantization steps, with the same predictions
    want = run_tflite(kit.f32, x)
    err = np.abs(got - want).max()
    assert err <= 8 * out_q.scale, f"max error {err:.4f} = {err / out_q.scale:.1f} steps"
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.98
    # a batch goes through the same way
    np.testing.assert_array_equal(agent.predict(x[:8])[0], got[:8])


def test_int8_inputs_are_passed_directly_without_double_quantization(
    kit: Int8Kit, agents: list[Agent]
) -> None:
    model = kit.load()
    q = model.manifest.inputs[0].quantization
    assert q is not None
    agent = new_agent(agents, model)
    x = kit.data.test_x[:32]
    x8 = quantize(x, q.scale, q.zero_point)
    (from_float,) = agent.predict(x)
    (from_int8,) = agent.predict(x8)
    np.testing.assert_array_equal(from_int8, from_float)
    assert from_int8.dtype == np.float32
    # quantizing the int8 values again (as real values) would give another answer
    (twice,) = agent.predict(x8.astype(np.float32))
    assert not np.array_equal(twice, from_float)


def test_drift_is_measured_on_real_values_whether_inputs_come_as_float_or_int8(
    kit: Int8Kit, agents: list[Agent]
) -> None:
    q = kit.load().manifest.inputs[0].quantization
    assert q is not None
    x = kit.data.test_x[:120]
    summaries = {}
    for kind, batch in (("float", x), ("int8", quantize(x, q.scale, q.zero_point))):
        agent = new_agent(
            agents, kit.load(), copy_inputs=False, telemetry_options=TelemetryOptions(seed=1)
        )
        for i in range(len(batch)):
            agent.predict(batch[i : i + 1])
        agent.telemetry.close_all()
        summaries[kind] = {f["name"]: f for f in agent.telemetry.recent[-1]["drift"]["features"]}
    for name, f in summaries["float"].items():
        assert f["psi"] < 0.2, (name, f["psi"])
        other = summaries["int8"][name]
        # the int8 inputs' real values are the float ones up to half a step
        assert np.abs(np.subtract(other["counts"], f["counts"])).sum() <= 0.05 * len(x)
        assert other["psi"] < 0.2, (name, other["psi"])


def test_serving_endpoint_takes_and_returns_fp32_for_an_int8_io_model(
    kit: Int8Kit, agents: list[Agent], tmp_path: Path
) -> None:
    model = kit.load()
    agent = new_agent(agents, model)
    ep = ServingEndpoint(agent, ServingConfig(), tmp_path).start()
    try:
        x = kit.data.test_x[:3]
        with ServingClient(ep.socket_path) as client:
            meta = client.metadata()
            (via_socket,) = client.predict(x)
    finally:
        ep.stop()
    assert [t["datatype"] for t in (*meta["inputs"], *meta["outputs"])] == ["FP32", "FP32"]
    q = model.manifest.inputs[0].quantization
    assert q is not None
    assert meta["inputs"][0]["parameters"] == {
        "quantized_datatype": "INT8",
        "scale": pytest.approx(q.scale),
        "zero_point": q.zero_point,
    }
    np.testing.assert_array_equal(via_socket, agent.predict(x)[0])
    assert via_socket.dtype == np.float32
    # an app holding int8 data sends INT8 (binary and JSON alike); it is fed as is
    x8 = quantize(x, q.scale, q.zero_point)
    ep = ServingEndpoint(agent, ServingConfig(), tmp_path).start()
    try:
        with ServingClient(ep.socket_path) as client:
            (from_int8,) = client.predict(x8)
        doc = {
            "inputs": [
                {
                    "name": "x",
                    "datatype": "INT8",
                    "shape": list(x8.shape),
                    "data": x8.ravel().tolist(),
                }
            ]
        }
        status, body = status_and_json(
            raw_request(str(ep.socket_path), infer_request("/v2/models/digits/infer", doc))
        )
        bad = {
            "inputs": [
                {
                    "name": "x",
                    "datatype": "INT16",
                    "shape": list(x8.shape),
                    "data": x8.ravel().tolist(),
                }
            ]
        }
        refused, why = status_and_json(
            raw_request(str(ep.socket_path), infer_request("/v2/models/digits/infer", bad))
        )
    finally:
        ep.stop()
    np.testing.assert_array_equal(from_int8, via_socket)
    assert status == 200, body
    np.testing.assert_array_equal(
        np.asarray(body["outputs"][0]["data"], np.float32), via_socket.ravel()
    )
    assert refused == 400 and "FP32 (or INT8, already quantized)" in why["error"]


# -- ONNX: the file records no I/O quantization, the manifest does ---------------------


def int8_io_onnx(s_in: float, zp_in: int, s_out: float, zp_out: int) -> bytes:
    """``y = quantize(relu(dequantize(x)) * 2)`` over int8 ``[batch, 4]``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits = [
        numpy_helper.from_array(np.asarray(s_in, np.float32), "s_in"),
        numpy_helper.from_array(np.asarray(zp_in, np.int8), "zp_in"),
        numpy_helper.from_array(np.asarray(s_out, np.float32), "s_out"),
        numpy_helper.from_array(np.asarray(zp_out, np.int8), "zp_out"),
        numpy_helper.from_array(np.asarray(2.0, np.float32), "two"),
    ]
    graph = helper.make_graph(
        [
            helper.make_node("DequantizeLinear", ["x", "s_in", "zp_in"], ["xf"]),
            helper.make_node("Relu", ["xf"], ["r"]),
            helper.make_node("Mul", ["r", "two"], ["m"]),
            helper.make_node("QuantizeLinear", ["m", "s_out", "zp_out"], ["y"]),
        ],
        "int8io",
        [helper.make_tensor_value_info("x", TensorProto.INT8, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.INT8, ["batch", 4])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def test_onnx_model_with_int8_io_is_fed_and_read_through_the_manifest(
    kit: Int8Kit, agents: list[Agent]
) -> None:
    from converters.introspect import onnx_signature
    from device_agent.bundle import Quantization

    s_in, zp_in, s_out, zp_out = 0.05, -3, 0.1, -100
    src = kit.root / "onnx-src"
    src.mkdir()
    (src / "model.onnx").write_bytes(int8_io_onnx(s_in, zp_in, s_out, zp_out))
    inputs, outputs, runtime = onnx_signature(src / "model.onnx")
    inputs = [dataclasses.replace(inputs[0], quantization=Quantization(s_in, zp_in))]
    outputs = [dataclasses.replace(outputs[0], quantization=Quantization(s_out, zp_out))]
    files = [BundleFile(src / "model.onnx", "model.onnx", "model")]
    manifest = build_manifest(
        name="int8io",
        version=1,
        fmt="onnx",
        files=files,
        inputs=inputs,
        outputs=outputs,
        runtime=runtime,
        created_at=datetime.now(timezone.utc) - timedelta(hours=1),
    )
    path = pack_bundle(kit.root / "int8io.efb", manifest, files)
    sign_bundle(path, kit.key)
    unpack_bundle(path, kit.root / "onnx-slot", kit.trust)
    agent = new_agent(agents, load_model(kit.root / "onnx-slot", "a"))
    # ties (x / s_in = k + 0.5) round to even; out-of-range values clip to [-128, 127]
    x = np.asarray([[0.125, 0.175, -0.025, 100.0], [-100.0, 1.0, 0.075, 0.0]], dtype=np.float32)
    (y,) = agent.predict(x)
    q = np.clip(np.rint(x / np.float32(s_in)) + zp_in, -128, 127)
    assert q[0, :3].tolist() == [-1, 1, -3]  # 2.5 -> 2, 3.5 -> 4, -0.5 -> -0 (even)
    real_in = (q - zp_in) * np.float32(s_in)
    want = np.clip(np.rint(np.maximum(real_in, 0) * 2 / s_out) + zp_out, -128, 127) - zp_out
    np.testing.assert_allclose(y, want * np.float32(s_out), rtol=1e-6, atol=1e-7)
    assert y.dtype == np.float32
    (direct,) = agent.predict(q.astype(np.int8))
    np.testing.assert_array_equal(direct, y)


def test_mixed_float_and_int8_inputs_each_get_what_they_need(
    kit: Int8Kit, agents: list[Agent]
) -> None:
    """Two inputs, one int8 (quantized on feed), one float32 (fed as is): the generic
    runner, not the one-input one."""
    from onnx import TensorProto, helper, numpy_helper

    from converters.introspect import onnx_signature
    from device_agent.bundle import Quantization

    s, zp = 0.25, 10
    graph = helper.make_graph(
        [
            helper.make_node("DequantizeLinear", ["a", "s", "zp"], ["af"]),
            helper.make_node("Add", ["af", "b"], ["y"]),
        ],
        "mixed",
        [
            helper.make_tensor_value_info("a", TensorProto.INT8, ["batch", 3]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, ["batch", 3]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        [
            numpy_helper.from_array(np.asarray(s, np.float32), "s"),
            numpy_helper.from_array(np.asarray(zp, np.int8), "zp"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    src = kit.root / "mixed-src"
    src.mkdir()
    (src / "model.onnx").write_bytes(model.SerializeToString())
    inputs, outputs, runtime = onnx_signature(src / "model.onnx")
    inputs = [dataclasses.replace(inputs[0], quantization=Quantization(s, zp)), inputs[1]]
    files = [BundleFile(src / "model.onnx", "model.onnx", "model")]
    manifest = build_manifest(
        name="mixed",
        version=1,
        fmt="onnx",
        files=files,
        inputs=inputs,
        outputs=outputs,
        runtime=runtime,
    )
    path = pack_bundle(kit.root / "mixed.efb", manifest, files)
    sign_bundle(path, kit.key)
    unpack_bundle(path, kit.root / "mixed-slot", kit.trust)
    loaded = load_model(kit.root / "mixed-slot", "a")
    assert [str(t.dtype) for t in loaded.inputs] == ["float32", "float32"]
    agent = new_agent(agents, loaded)
    a = np.asarray([[1.0, -2.13, 40.0]], np.float32)  # 40 clips at 127: (127 - 10) * 0.25
    b = np.asarray([[0.5, 0.5, 0.5]], np.float32)
    (y,) = agent.predict({"a": a, "b": b})
    np.testing.assert_allclose(y, [[1.5, -1.75, 29.75]], rtol=1e-6)
    a8 = np.asarray([[14, 1, 127]], np.int8)
    np.testing.assert_array_equal(agent.predict({"a": a8, "b": b})[0], y)
