"""Quantized variants: they really are quantized, pass their documented tolerances,
and a variant over its tolerance is refused with its parity report."""

from __future__ import annotations

import onnx
import pytest
from onnx import TensorProto

from converters.errors import ConverterError, ParityError, QuantizationError
from converters.parity import DEFAULT_TOLERANCES, Tolerance
from converters.pipeline import convert
from converters.quantize import quantize_static_int8
from converters.targets import Target
from tests import models


def _ops(data: bytes) -> set[str]:
    return {n.op_type for n in onnx.load_from_string(data).graph.node}


def _initializer_types(data: bytes) -> set[int]:
    return {int(t.data_type) for t in onnx.load_from_string(data).graph.initializer}


@pytest.mark.parametrize("name", ["cnn", "mlp", "onnx_mlp"])
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


@pytest.mark.parametrize("name", ["cnn", "onnx_mlp"])
def test_static_int8_is_qdq_calibrated_on_the_samples(name: str) -> None:
    source, x = models.zoo_source(name)
    artifact = convert(source, Target("onnx", "int8-static"), samples=x)
    ops = _ops(artifact.data)
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert artifact.parity.passed
    assert any("calibration samples" in n for n in artifact.notes)


@pytest.mark.parametrize("name", ["cnn", "mlp", "pipeline"])
def test_float16_weights_with_float32_interface(name: str) -> None:
    source, x = models.zoo_source(name)
    artifact = convert(source, Target("onnx", "float16"), samples=x)
    model = onnx.load_from_string(artifact.data)
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    if name != "pipeline":  # scikit-learn's ai.onnx.ml operators stay float32
        assert TensorProto.FLOAT16 in _initializer_types(artifact.data)
    tol = DEFAULT_TOLERANCES["float16"]
    assert artifact.parity.passed
    for out in artifact.parity.outputs:
        assert out.max_abs_error <= (tol.atol or 0) + (tol.rtol or 0) * 100


def test_regressor_int8_is_judged_by_documented_range_bound() -> None:
    source, x = models.zoo_source("forest_regressor")
    artifact = convert(source, Target("onnx", "int8-dynamic"), samples=x)
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
    assert artifact.parity.samples_origin == "generated from the input signature"
    assert artifact.parity.samples > 0


def test_float16_forest_breaks_default_tolerance_and_is_refused() -> None:
    # Tree ensembles stay float32, but float16 inputs are rounded before the
    # splits: samples near a threshold land in other leaves. Parity catches it.
    source, x = models.zoo_source("forest")
    with pytest.raises(ParityError) as info:
        convert(source, Target("onnx", "float16"), samples=x)
    report = info.value.report
    assert report.tolerance == DEFAULT_TOLERANCES["float16"]
    fail = report.failures()[0]
    assert fail.name == "probabilities" and fail.max_abs_error > 1e-2
