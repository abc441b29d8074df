"""ONNX -> TFLite on real models: torch CNNs and MLP (both exporters) and an
onnx.helper MLP, in every weight mode, against onnxruntime on the source."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from converters.tflite import onnx_to_tflite
from tests.tflite_models import BUILDERS, FLOAT32_ABS, TOLERANCE, run_onnx, run_tflite


@pytest.fixture(scope="module")
def zoo() -> dict[str, tuple[onnx.ModelProto, np.ndarray, np.ndarray]]:
    """Each model, its sample batch and onnxruntime's output on it (built once)."""
    out = {}
    for name, build in BUILDERS.items():
        model, x = build()
        out[name] = (model, x, run_onnx(model, x))
    return out


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_float32_matches_onnxruntime(zoo: dict, name: str) -> None:
    model, x, ref = zoo[name]
    got = run_tflite(onnx_to_tflite(model), x)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= FLOAT32_ABS


@pytest.mark.parametrize("weights", sorted(TOLERANCE))
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_quantized_weights_within_tolerance(zoo: dict, name: str, weights: str) -> None:
    model, x, ref = zoo[name]
    got = run_tflite(onnx_to_tflite(model, weights=weights), x)
    rel, top1 = TOLERANCE[weights]
    assert np.abs(got - ref).max() <= rel * max(1.0, float(np.abs(ref).max()))
    assert (got.argmax(axis=-1) == ref.argmax(axis=-1)).mean() >= top1


def test_sample_batches_spread_over_classes(zoo: dict) -> None:
    """Top-1 agreement only means something if the models predict several classes."""
    for _, _, ref in zoo.values():
        assert len(np.unique(ref.argmax(axis=-1))) >= 3


def test_legacy_exporter_graph_needs_folding_and_batchnorm(zoo: dict) -> None:
    """The TorchScript export keeps what the converter must fold away itself."""
    ops = {n.op_type for n in zoo["torch_legacy_exporter_cnn"][0].graph.node}
    assert {"Shape", "Gather", "Concat", "BatchNormalization", "HardSwish"} <= ops
    groups = [
        a.i for n in zoo["torch_legacy_exporter_cnn"][0].graph.node for a in n.attribute
        if n.op_type == "Conv" and a.name == "group"
    ]  # fmt: skip
    assert sorted(groups) == [1, 2, 8]  # plain, grouped and depthwise


def test_quantized_files_are_smaller(zoo: dict) -> None:
    model = zoo["torch_cnn"][0]
    sizes = {w: len(onnx_to_tflite(model, weights=w)) for w in ("float32", "float16", "int8")}
    assert sizes["int8"] < sizes["float16"] < sizes["float32"]


def test_device_agent_tflite_backend_runs_converted_cnn(zoo: dict, tmp_path: Path) -> None:
    """The agent's runtime backend resizes the batch of a converted file as needed."""
    from device_agent.runtime import load_backend

    model, x, ref = zoo["torch_cnn"]
    path = tmp_path / "model.tflite"
    path.write_bytes(onnx_to_tflite(model))
    backend = load_backend(path, "tflite")
    assert backend.input_names == ["x"] and backend.output_names == ["y"]
    for batch in (x[:1], x[:5], x):
        out = backend.run({"x": batch})[0]
        assert np.abs(out - ref[: len(batch)]).max() <= FLOAT32_ABS
