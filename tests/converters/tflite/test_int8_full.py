"""Full-integer int8 TFLite (converters.tflite.quantize_full) on models trained in the test.

Each architecture is trained a few epochs (tests/converters/zoo/trained.py), exported
to ONNX, converted to float32 TFLite and to full-integer int8 calibrated on 200
training samples, and both run one held-out sample at a time on ai-edge-litert.
"""

from __future__ import annotations

import io
import json
import subprocess
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import tflite
import torch

from converters.tflite import onnx_to_tflite
from converters.tflite.quantize_full import onnx_to_tflite_int8_full
from tests.converters.zoo.trained import TRAINED, train

AGREEMENT = 0.98
CALIBRATION = 200


def export(module: torch.nn.Module, x: np.ndarray) -> onnx.ModelProto:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (torch.from_numpy(x[:2]),),
            buf,
            dynamo=False,
            opset_version=18,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
        )
    return onnx.load_from_string(buf.getvalue())


def run(data: bytes, x: np.ndarray) -> np.ndarray:
    """One sample at a time, quantizing / dequantizing int8 I/O by the file's parameters."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_content=data)
    interp.allocate_tensors()
    i, o = interp.get_input_details()[0], interp.get_output_details()[0]
    outs = []
    for k in range(len(x)):
        sample = x[k : k + 1]
        if i["dtype"] == np.int8:
            scale, zp = i["quantization"]
            sample = np.clip(np.round(sample / scale) + zp, -128, 127).astype(np.int8)
        interp.set_tensor(i["index"], sample)
        interp.invoke()
        out = interp.get_tensor(o["index"]).copy()
        if o["dtype"] == np.int8:
            scale, zp = o["quantization"]
            out = (out.astype(np.float32) - zp) * scale
        outs.append(out)
    return np.concatenate(outs)


@pytest.fixture(scope="module", params=sorted(TRAINED))
def converted(request: pytest.FixtureRequest):
    module, data = train(request.param)
    model = export(module, data.train_x)
    f32 = onnx_to_tflite(model)
    q, report = onnx_to_tflite_int8_full(model, data.train_x[:CALIBRATION])
    return request.param, data, model, f32, q, report


def test_int8_full_agrees_with_float32_on_held_out_data(converted) -> None:
    name, data, _, f32, q, _ = converted
    pf, pq = run(f32, data.test_x), run(q, data.test_x)
    accuracy = (pf.argmax(1) == data.test_y).mean()
    assert accuracy >= 0.8, f"{name} did not train ({accuracy:.3f}); agreement would mean little"
    agreement = (pf.argmax(1) == pq.argmax(1)).mean()
    assert agreement >= AGREEMENT, f"{name}: top-1 agreement {agreement:.4f}"


def test_int8_full_is_integer_throughout(converted) -> None:
    """Weights int8 (per channel for convolutions), biases int32, every inner
    activation int8; float only at the QUANTIZE / DEQUANTIZE of the float I/O."""
    name, _, _, _, q, report = converted
    m = tflite.Model.GetRootAsModel(q, 0)
    sg = m.Subgraphs(0)
    T = tflite.TensorType
    io_tensors = {sg.Inputs(i) for i in range(sg.InputsLength())}
    io_tensors |= {sg.Outputs(i) for i in range(sg.OutputsLength())}
    floats = [
        sg.Tensors(i).Name().decode()
        for i in range(sg.TensorsLength())
        if sg.Tensors(i).Type() == T.FLOAT32 and i not in io_tensors
    ]
    assert report.float_operators == [], (name, report.float_operators)
    assert floats == [], name
    types = {sg.Tensors(i).Type() for i in range(sg.TensorsLength())}
    assert {T.INT8, T.INT32} <= types
    assert report.weights_quantized > 0 and report.biases_quantized > 0
    per_channel = [
        sg.Tensors(i).Quantization().ScaleLength()
        for i in range(sg.TensorsLength())
        if sg.Tensors(i).Type() == T.INT8 and sg.Tensors(i).Quantization().ScaleLength() > 1
    ]
    assert per_channel, "convolution weights carry one scale per output channel"


def test_int8_full_is_about_a_quarter_of_float32(converted) -> None:
    name, _, _, f32, q, _ = converted
    ratio = len(q) / len(f32)
    # Widths here are tiny (50 to 700 KiB float32): tensor metadata and int32 biases
    # weigh more than on real models (per-channel scales and zero points cost 12 bytes a
    # channel against 9 weight bytes of a 3x3 depthwise); ResNet-18, the widest, gets
    # closest to 1/4.
    assert ratio <= (0.32 if name == "resnet18" else 0.65), f"{name}: {ratio:.3f}"


def test_int8_io_carries_its_parameters_and_matches_float_io(converted) -> None:
    name, data, model, _, q, report = converted
    q8, report8 = onnx_to_tflite_int8_full(model, data.train_x[:CALIBRATION], int8_io=True)
    assert [i.dtype for i in report8.inputs] == ["int8"]
    assert report8.inputs[0].scale == pytest.approx(report.inputs[0].scale)
    assert report8.to_json()["outputs"][0]["zero_point"] == report.outputs[0].zero_point
    from ai_edge_litert.interpreter import Interpreter

    d = Interpreter(model_content=q8).get_input_details()[0]
    assert d["dtype"] == np.int8
    assert d["quantization"][0] == pytest.approx(report8.inputs[0].scale)
    x = data.test_x[:50]
    assert (run(q8, x).argmax(1) == run(q, x).argmax(1)).mean() >= 0.98, name


def test_operator_without_int8_kernel_runs_in_float_and_is_named() -> None:
    """Div has no int8 kernel here: it runs between DEQUANTIZE and QUANTIZE, and the
    report says so instead of claiming full integer."""
    from onnx import helper

    from tests.tflite_models import make_model

    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.5, size=(8, 3, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Sigmoid", ["c"], ["s"]),
        helper.make_node("Add", ["s", "one"], ["d"]),
        helper.make_node("Div", ["c", "d"], ["y"]),
    ]
    model = make_model(nodes, (1, 3, 8, 8), {"w": w, "one": np.asarray(1.0, np.float32)})
    x = rng.normal(size=(64, 3, 8, 8)).astype(np.float32)
    q, report = onnx_to_tflite_int8_full(model, x[:32])
    assert report.float_operators == ["DIV"]
    want = run(onnx_to_tflite(model), x[32:])
    got = run(q, x[32:])
    assert np.abs(got - want).mean() <= 0.02 * np.abs(want).max()


def test_int8_full_runs_on_legacy_tflite_runtime(tmp_path: Path) -> None:
    from tests.converters.tflite.test_builder_legacy_runtime import _build_legacy_venv

    module, data = train("digits_cnn")
    model = export(module, data.train_x)
    q, _ = onnx_to_tflite_int8_full(model, data.train_x[:CALIBRATION])
    (tmp_path / "m.tflite").write_bytes(q)
    x = data.test_x[:100]
    np.save(tmp_path / "x.npy", x)
    script = (
        "import sys, json, numpy as np\n"
        "from tflite_runtime.interpreter import Interpreter\n"
        "it = Interpreter(model_path=sys.argv[1] + '/m.tflite'); it.allocate_tensors()\n"
        "i, o = it.get_input_details()[0]['index'], it.get_output_details()[0]['index']\n"
        "x = np.load(sys.argv[1] + '/x.npy'); outs = []\n"
        "for k in range(len(x)):\n"
        "    it.set_tensor(i, x[k:k+1]); it.invoke(); outs.append(it.get_tensor(o).copy())\n"
        "np.save(sys.argv[1] + '/y.npy', np.concatenate(outs))\n"
    )
    python = _build_legacy_venv()
    subprocess.run([str(python), "-c", script, str(tmp_path)], check=True, timeout=300)
    legacy = np.load(tmp_path / "y.npy")
    current = run(q, x)
    assert (legacy.argmax(1) == current.argmax(1)).mean() >= 0.99
    assert np.abs(legacy - current).max() <= 0.05 * max(1.0, float(np.abs(current).max()))
    json.dumps({"ok": True})


def test_pipeline_target_tflite_int8_full_packs_with_held_out_parity() -> None:
    """``tflite:int8-full`` through the pipeline: calibrated on part of the samples,
    judged on the held-out rest at batch 1; the notes carry the I/O quantization."""
    from converters.pipeline import convert
    from converters.source import from_onnx
    from converters.targets import parse_target

    module, data = train("digits_cnn")
    model = export(module, data.train_x)
    artifact = convert(
        from_onnx(model, task="classification"),
        parse_target("tflite:int8-full"),
        samples={"x": data.train_x[:400]},
    )
    assert artifact.parity.passed, artifact.parity.summary()
    assert artifact.parity.calibration_samples == 200
    assert artifact.parity.batch_sizes[0] == 1
    assert any("zero point" in n for n in artifact.notes)
    assert artifact.quantization is not None and artifact.quantization.size_ratio < 0.5
