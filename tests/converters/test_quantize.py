"""Quantized variants: they really are quantized, pass their documented tolerances,
and a variant over its tolerance is refused with its parity report."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from converters.errors import (
    ConverterError,
    NothingQuantizedError,
    ParityError,
    QuantizationError,
)
from converters.parity import DEFAULT_TOLERANCES, Tolerance
from converters.pipeline import convert
from converters.quantize import quantize_static_int8
from converters.targets import Target
from tests import models


def _ops(data: bytes) -> set[str]:
    return {n.op_type for n in onnx.load_from_string(data).graph.node}


def _initializer_types(data: bytes) -> set[int]:
    return {int(t.data_type) for t in onnx.load_from_string(data).graph.initializer}


@pytest.mark.parametrize("name", ["cnn", "onnx_mlp"])
def test_dynamic_int8_quantizes_weights_and_keeps_top1(name: str) -> None:
    source, x = models.zoo_source(name)
    artifact = convert(source, Target("onnx", "int8-dynamic"), samples=x)
    assert {"MatMulInteger", "DynamicQuantizeLinear"} <= _ops(artifact.data)
    assert TensorProto.INT8 in _initializer_types(artifact.data)
    out = artifact.parity.outputs[0]
    assert out.judged_by == "top1"
    assert out.top1_agreement is not None and out.top1_agreement >= 0.97
    assert out.max_abs_error > 0  # it is not the float32 graph in disguise
    assert artifact.smoke.check == "top1"


def test_static_int8_is_qdq_calibrated_on_half_and_validated_on_the_other_half() -> None:
    source, x = models.zoo_source("cnn")
    artifact = convert(source, Target("onnx", "int8-static"), samples=x)
    assert {"QuantizeLinear", "DequantizeLinear"} <= _ops(artifact.data)
    assert artifact.parity.passed
    assert artifact.parity.calibration_samples == 32 and artifact.parity.samples == 32
    assert "32 of 64 samples held out for validation" in artifact.parity.samples_origin
    assert any("32 calibration samples" in n for n in artifact.notes)


def test_static_int8_parity_is_judged_on_held_out_samples_only() -> None:
    source, x = models.zoo_source("onnx_mlp")
    report = convert(
        source, Target("onnx", "int8-static"), samples=x, allow_parity_failure=True
    ).parity
    assert "64 of 128 samples held out for validation" in report.samples_origin
    assert report.calibration_samples == 64 and report.samples == 64
    assert report.to_json()["batch_sizes"] == [1]


@pytest.mark.parametrize("name", ["cnn", "mlp"])
def test_float16_weights_with_float32_interface(name: str) -> None:
    source, x = models.zoo_source(name)
    artifact = convert(source, Target("onnx", "float16"), samples=x)
    model = onnx.load_from_string(artifact.data)
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert TensorProto.FLOAT16 in _initializer_types(artifact.data)
    assert artifact.parity.passed


def test_regressor_int8_is_judged_by_documented_range_bound() -> None:
    from converters.source import from_onnx

    model, x = models.onnx_helper_mlp()
    source = from_onnx(model, task="regression")
    artifact = convert(source, Target("onnx", "int8-dynamic"), samples=x, allow_parity_failure=True)
    out = artifact.parity.outputs[0]
    assert out.judged_by == "elementwise" and out.top1_agreement is None
    assert artifact.smoke.check == "allclose"


def test_quantized_variant_over_tolerance_is_refused_with_its_report() -> None:
    source, x = models.zoo_source("cnn")
    strict = Tolerance(atol=1e-3)  # int8 cannot meet a float32-like bound
    with pytest.raises(ParityError) as info:
        convert(source, Target("onnx", "int8-static"), samples=x, tolerance=strict)
    err = info.value
    assert isinstance(err, ConverterError)
    report = err.report
    assert not report.passed and report.precision == "int8-static"
    fail = report.failures()[0]
    assert fail.max_abs_error > 1e-3 and "over the bound" in fail.detail
    assert report.to_json()["outputs"][0]["passed"] is False
    assert "not packed" in str(err)


def test_tflite_int8_variant_over_tolerance_is_refused_with_its_report() -> None:
    source, x = models.zoo_source("cnn")
    with pytest.raises(ParityError) as info:
        convert(source, Target("tflite", "int8-dynamic"), samples=x, tolerance=Tolerance(atol=1e-3))
    assert info.value.report.artifact_runtime.startswith("ai-edge-litert")
    assert not info.value.report.passed


def test_operator_can_override_the_gate_and_the_report_says_so() -> None:
    source, x = models.zoo_source("cnn")
    artifact = convert(
        source,
        Target("onnx", "int8-static"),
        samples=x,
        tolerance=Tolerance(atol=1e-3),
        allow_parity_failure=True,
    )
    assert not artifact.parity.passed and artifact.parity.overridden
    prov = artifact.provenance()["parity"]
    assert prov["overridden"] is True and prov["passed"] is False


@pytest.mark.parametrize("precision", ["float16", "int8-dynamic"])
def test_tflite_reduced_precision_variants_pass_defaults(precision: str) -> None:
    source, x = models.zoo_source("cnn")
    artifact = convert(source, Target("tflite", precision), samples=x)
    assert artifact.parity.passed
    assert artifact.parity.outputs[0].top1_agreement == 1.0


def test_static_quantization_without_samples_is_refused() -> None:
    source, _ = models.zoo_source("mlp")
    with pytest.raises(QuantizationError, match="calibration samples"):
        quantize_static_int8(source.onnx_model, {})


def test_generated_samples_are_used_when_none_are_given() -> None:
    source, _ = models.zoo_source("mlp")
    artifact = convert(source, Target("onnx", "float16"))
    assert artifact.parity.samples_origin.startswith("generated from the input signature")
    assert "validation samples generated apart from calibration" in (artifact.parity.samples_origin)
    assert artifact.parity.samples > 0


def test_float16_of_a_model_without_float_weights_is_refused() -> None:
    """Tree ensembles keep their thresholds in attributes: float16 only rounds the inputs."""
    source, x = models.zoo_source("forest")
    with pytest.raises(NothingQuantizedError, match="no float32 weights") as info:
        convert(source, Target("onnx", "float16"), samples=x)
    assert "--allow-unquantized" in str(info.value)
    assert info.value.summary.weights_quantized == 0  # type: ignore[attr-defined]


@pytest.mark.parametrize("precision", ["int8-dynamic", "int8-static", "float16"])
def test_quantizing_a_sklearn_pipeline_that_quantizes_nothing_is_refused(precision: str) -> None:
    source, x = models.zoo_source("pipeline")
    with pytest.raises(NothingQuantizedError, match="float32 model labelled"):
        convert(source, Target("onnx", precision), samples=x)


def test_allow_unquantized_packs_the_float32_model_labelled_unquantized() -> None:
    source, x = models.zoo_source("forest")
    artifact = convert(source, Target("onnx", "int8-dynamic"), samples=x, allow_unquantized=True)
    assert artifact.precision == "float32"
    assert artifact.labels() == {
        "precision": "float32",
        "requested_precision": "int8-dynamic",
        "quantized": "no",
    }
    q = artifact.provenance()["quantization"]
    assert q["quantized"] is False and q["packed_unquantized"] is True
    assert artifact.parity.tolerance == DEFAULT_TOLERANCES["float32"]
    assert artifact.parity.passed


@pytest.mark.parametrize(
    ("fmt", "precision"),
    [
        ("onnx", "int8-dynamic"),
        ("onnx", "int8-static"),
        ("onnx", "float16"),
        ("tflite", "int8-dynamic"),
        ("tflite", "float16"),
    ],
)
def test_quantized_variant_records_weights_operators_and_size_change(
    fmt: str, precision: str
) -> None:
    source, x = models.zoo_source("cnn")
    artifact = convert(source, Target(fmt, precision), samples=x)
    q = artifact.provenance()["quantization"]
    assert q["quantized"] is True and q["precision"] == precision
    assert q["weights_quantized"] >= 1 and q["operators_quantized"] >= 1
    assert q["bytes_after"] < q["bytes_before"] and q["size_ratio"] < 1
    assert any("operators quantized" in n for n in artifact.notes)


def _tiny_margin_mlp() -> tuple[onnx.ModelProto, np.ndarray]:
    """The onnx.helper MLP with its class columns nearly equal: logits differ by ~1e-3
    of their size, well inside int8's rounding."""
    from onnx import numpy_helper

    model, x = models.onnx_helper_mlp()
    w2 = next(t for t in model.graph.initializer if t.name == "W2")
    w = numpy_helper.to_array(w2)
    rng = np.random.default_rng(5)
    near = w[:, :1] + 1e-3 * rng.normal(size=w.shape).astype(np.float32)
    w2.CopyFrom(numpy_helper.from_array(near.astype(np.float32), "W2"))
    b2 = next(t for t in model.graph.initializer if t.name == "b2")
    b2.CopyFrom(numpy_helper.from_array(np.zeros(w.shape[1], np.float32), "b2"))
    return model, x


def test_mlp_with_tiny_margins_fails_dynamic_int8_at_batch_1() -> None:
    """Its class scores differ by ~1e-3 of their size: per-row int8 activations flip
    some of them, and the gate says so at batch 1."""
    from converters.source import from_onnx

    model, x = _tiny_margin_mlp()
    source = from_onnx(model, task="classification")
    with pytest.raises(ParityError) as info:
        convert(source, Target("onnx", "int8-dynamic"), samples=x)
    fail = info.value.report.failures()[0]
    assert fail.batch == 1 and "Wilson interval" in fail.detail


def test_dynamic_int8_of_a_conv_only_network_is_refused_like_squeezenet() -> None:
    """SqueezeNet classifies with convolutions: ONNX dynamic int8 (MatMul/Gemm) changed
    nothing, yet the bundle was labelled int8-dynamic."""
    from converters.source import from_onnx
    from tests.tflite_models import conv_case

    model, x = conv_case(c_in=3, c_out=4, k=3, hw=9)
    source = from_onnx(model)
    with pytest.raises(NothingQuantizedError, match="MatMul/Gemm") as info:
        convert(source, Target("onnx", "int8-dynamic"), samples=x)
    summary = info.value.summary
    assert summary.weights_quantized == 0 and summary.float_weights_before >= 1  # type: ignore[attr-defined]
    artifact = convert(source, Target("tflite", "int8-dynamic"), samples=x)  # TFLite does convs
    assert artifact.quantization is not None and artifact.quantization.weights_quantized == 1
