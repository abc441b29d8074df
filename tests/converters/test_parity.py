"""The pure parity core and calibration-sample checks, without running any model."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from converters.errors import SampleError
from converters.parity import (
    DEFAULT_TOLERANCES,
    Tolerance,
    compare,
    compare_batches,
    compare_output,
    min_top1_samples,
)
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


def _flips(n: int, flips: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(n, 5))
    got = ref.copy()
    for i in range(flips):  # swap the top class with another one
        j = int(np.argmax(ref[i]))
        got[i, j], got[i, (j + 1) % 5] = ref[i, (j + 1) % 5], ref[i, j]
    return ref, got


def test_top1_gate_passes_one_flip_in_32_instead_of_failing_on_it() -> None:
    ref, got = _flips(32, 1)
    out = compare_output("p", "classification", ref, got, DEFAULT_TOLERANCES["int8-dynamic"])
    assert out.top1_agreement == pytest.approx(31 / 32)
    assert out.passed and out.judged_by == "top1"
    assert out.top1_interval is not None and out.top1_interval[1] > 0.97


def test_top1_gate_fails_when_the_wilson_interval_lies_below_the_threshold() -> None:
    ref, got = _flips(32, 4)
    out = compare_output("p", "classification", ref, got, DEFAULT_TOLERANCES["int8-dynamic"])
    assert not out.passed
    assert "28/32 = 0.8750" in out.detail and "Wilson interval" in out.detail


def test_top1_gate_refuses_to_judge_too_few_samples_and_says_how_many_are_needed() -> None:
    assert min_top1_samples(0.97) == 7
    ref, got = _flips(4, 0)
    out = compare_output("p", "classification", ref, got, Tolerance(atol=None, min_top1=0.97))
    assert not out.passed
    assert "too few samples" in out.detail and "4 given, at least 7 needed" in out.detail


def test_float32_bound_scales_with_the_output_magnitude() -> None:
    """A correct MobileNetV2 (logits near 12) was refused at 1.004e-4 against 1e-4 absolute."""
    rng = np.random.default_rng(0)
    ref = rng.normal(0, 4, size=(64, 1000))
    ref[0, 0] = 12.0
    got = ref.copy()
    got[5, 7] += 1.004e-4
    assert compare_output("y", "regression", ref, got, DEFAULT_TOLERANCES["float32"]).passed
    got[5, 7] = ref[5, 7] + 5e-3  # 40x the scaled bound: still refused
    assert not compare_output("y", "regression", ref, got, DEFAULT_TOLERANCES["float32"]).passed


def test_parity_messages_have_enough_digits_to_tell_error_from_bound() -> None:
    ref = np.zeros((4, 3))
    got = ref.copy()
    got[1, 1] = 1.004e-4
    out = compare_output("y", "regression", ref, got, DEFAULT_TOLERANCES["float32"])
    assert not out.passed
    assert "worst error 0.0001004 > bound 0.0001" in out.detail


def test_report_records_batch_sizes_and_calibration_samples() -> None:
    ref = [np.zeros((8, 2))]
    report = compare_batches(
        produced_by_batch={1: [np.zeros((8, 2))], 8: [np.full((8, 2), 1e-3)]},
        calibration_samples=8,
        variant="v",
        precision="float32",
        names=["y"],
        tasks={},
        reference=ref,
        tolerance=DEFAULT_TOLERANCES["float32"],
        reference_runtime="r",
        artifact_runtime="a",
        samples=8,
        samples_origin="operator; 8 of 16 samples held out for validation",
    )
    data = report.to_json()
    assert data["batch_sizes"] == [1, 8] and data["calibration_samples"] == 8
    assert data["outputs"][0]["batch"] == 8 and data["passed"] is False
    assert "held out" in data["samples_origin"]


def test_int8_regressor_bound_scales_with_output_range() -> None:
    tol = DEFAULT_TOLERANCES["int8-dynamic"]
    ref = np.linspace(0, 100, 50).reshape(-1, 1)
    assert compare_output("v", "regression", ref, ref + 4.9, tol).passed  # 5 % of 100
    assert not compare_output("v", "regression", ref, ref + 5.1, tol).passed


def test_float16_bound_scales_with_magnitude_and_has_a_relative_part() -> None:
    tol = DEFAULT_TOLERANCES["float16"]
    ref = np.array([[10.0, 0.0]])  # scale 10: 0.1 everywhere, plus 1e-2 * |ref|
    assert compare_output("y", "regression", ref, ref + [[0.19, 0.09]], tol).passed
    assert not compare_output("y", "regression", ref, ref + [[0.0, 0.11]], tol).passed


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
