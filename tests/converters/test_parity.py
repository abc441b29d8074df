"""The pure parity core and calibration-sample checks, without running any model."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from converters.errors import SampleError
from converters.parity import DEFAULT_TOLERANCES, Tolerance, compare, compare_output
from converters.samples import check_samples, generate_samples
from device_agent.bundle.manifest import TensorSpec


def test_float32_default_is_1e4_absolute() -> None:
    ref = np.zeros((4, 3), dtype=np.float32)
    ok = compare_output("y", "regression", ref, ref + 9e-5, DEFAULT_TOLERANCES["float32"])
    bad = compare_output("y", "regression", ref, ref + 2e-4, DEFAULT_TOLERANCES["float32"])
    assert ok.passed and not bad.passed
    assert bad.max_abs_error == pytest.approx(2e-4, rel=1e-3)
    assert "over the bound" in bad.detail


def test_relative_error_is_reported_against_the_reference() -> None:
    ref = np.array([[1.0, 100.0]])
    got = np.array([[1.1, 100.0]])
    out = compare_output("y", "regression", ref, got, Tolerance(atol=1.0))
    assert out.max_rel_error == pytest.approx(0.1)
    assert out.max_abs_error == pytest.approx(0.1)


def test_classifier_judged_by_top1_when_tolerance_says_so() -> None:
    ref = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    got = ref.copy()
    got[2] = [0.4, 0.6]  # one of four flips
    tol = Tolerance(atol=None, min_top1=0.97)
    out = compare_output("p", "classification", ref, got, tol)
    assert out.top1_agreement == 0.75 and not out.passed and out.judged_by == "top1"
    assert compare_output("p", "classification", ref, ref + 0.05, tol).passed


def test_int8_regressor_bound_scales_with_output_range() -> None:
    tol = DEFAULT_TOLERANCES["int8-dynamic"]
    ref = np.linspace(0, 100, 50).reshape(-1, 1)
    assert compare_output("v", "regression", ref, ref + 4.9, tol).passed  # 5 % of 100
    assert not compare_output("v", "regression", ref, ref + 5.1, tol).passed


def test_float16_bound_has_absolute_and_relative_parts() -> None:
    tol = DEFAULT_TOLERANCES["float16"]
    ref = np.array([[10.0, 0.0]])
    assert compare_output("y", "regression", ref, ref + [[0.1, 0.0]], tol).passed
    assert not compare_output("y", "regression", ref, ref + [[0.0, 0.02]], tol).passed


def test_nan_output_never_passes() -> None:
    ref = np.ones((2, 2))
    got = ref.copy()
    got[0, 0] = np.nan
    for tol in DEFAULT_TOLERANCES.values():
        assert not compare_output("y", "classification", ref, got, tol).passed


def test_shape_mismatch_fails_with_detail() -> None:
    out = compare_output("y", "regression", np.zeros((4, 3)), np.zeros((4, 2)), Tolerance())
    assert not out.passed and "shape" in out.detail


def test_same_size_column_vector_is_compared_elementwise() -> None:
    out = compare_output(
        "y", "regression", np.arange(4.0), np.arange(4.0).reshape(4, 1), Tolerance()
    )
    assert out.passed and out.max_abs_error == 0.0


def test_missing_output_fails_the_report() -> None:
    report = compare(
        variant="v",
        precision="float32",
        names=["a", "b"],
        tasks={},
        reference=[np.zeros(2), np.zeros(2)],
        produced=[np.zeros(2)],
        tolerance=Tolerance(),
        reference_runtime="r",
        artifact_runtime="a",
        samples=2,
        samples_origin="operator",
    )
    assert not report.passed and report.failures()[0].name == "b"
    assert report.to_json()["passed"] is False


def test_generated_samples_follow_the_signature() -> None:
    specs = [TensorSpec("x", "float32", ("N", 3, 4)), TensorSpec("ids", "int64", (None, 2))]
    s = generate_samples(specs, n=5)
    assert s["x"].shape == (5, 3, 4) and s["x"].dtype == np.float32
    assert s["ids"].shape == (5, 2) and s["ids"].dtype == np.int64


def test_generating_samples_for_free_inner_dimension_is_refused() -> None:
    with pytest.raises(SampleError, match="free dimension at axis 1"):
        generate_samples([TensorSpec("x", "float32", ("N", "T"))])


def test_samples_are_checked_against_the_signature() -> None:
    specs = [TensorSpec("x", "float32", ("N", 4))]
    ok = check_samples(specs, np.zeros((3, 4), dtype=np.float64))
    assert ok["x"].dtype == np.float32
    with pytest.raises(SampleError, match="shape"):
        check_samples(specs, np.zeros((3, 5)))
    with pytest.raises(SampleError, match="missing"):
        check_samples(specs, {"y": np.zeros((3, 4))})
    with pytest.raises(SampleError, match="empty"):
        check_samples(specs, np.zeros((0, 4)))
    with pytest.raises(SampleError, match="takes float32"):
        check_samples(specs, np.array([["a"] * 4]))


def test_importing_converters_does_not_import_torch_or_onnx() -> None:
    code = (
        "import sys, converters, converters.pipeline, converters.source, fleet_server.cli;"
        "print(sorted(m for m in ('torch', 'onnx', 'onnxruntime', 'sklearn', 'skl2onnx')"
        " if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout.strip()
    assert out == "[]"
