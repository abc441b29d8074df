"""Findings of the conformance run (issue 13), each as a test: Softmax on the writer's
internal NHWC layout at every axis and opset, Dropout in training mode, zero-size shapes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from converters.errors import TrainingModeError
from converters.tflite import UnsupportedShapeError, onnx_to_tflite
from tests.tflite_models import run_onnx, run_tflite


def _conv_softmax(opset: int, axis: int | None) -> onnx.ModelProto:
    """x -> 1x1 Conv (4 -> 3 channels) -> Softmax(axis): the softmax reads NHWC inside."""
    rng = np.random.default_rng(0)
    w = rng.normal(0, 1, size=(3, 4, 1, 1)).astype(np.float32)
    attrs = {} if axis is None else {"axis": axis}
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[1, 1]),
        helper.make_node("Softmax", ["c"], ["y"], **attrs),
    ]
    graph = helper.make_graph(
        nodes,
        "conv_softmax",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 5, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _x(batch: int = 2) -> np.ndarray:
    return np.random.default_rng(1).normal(0, 2, size=(batch, 4, 5, 6)).astype(np.float32)


@pytest.mark.parametrize("axis", [None, -1, 0, 1, 2, 3])
def test_softmax_after_conv_normalises_over_the_onnx_axis_at_opset13(axis: int | None) -> None:
    model = _conv_softmax(13, axis)
    for batch in (1, 2):
        x = _x(batch)
        got = run_tflite(onnx_to_tflite(model), x)
        np.testing.assert_allclose(got, run_onnx(model, x), atol=1e-5, rtol=1e-4)


def test_softmax_after_conv_last_axis_rows_sum_to_one() -> None:
    got = run_tflite(onnx_to_tflite(_conv_softmax(13, -1)), _x())
    np.testing.assert_allclose(got.sum(axis=-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("axis", [None, 1, 2, 3, -1])
def test_softmax_after_conv_at_opset11_normalises_everything_from_axis(axis: int | None) -> None:
    """Before opset 13, axis 1 means over C*H*W, not over the channels alone."""
    model = _conv_softmax(11, axis)
    x = _x()
    got = run_tflite(onnx_to_tflite(model), x)
    np.testing.assert_allclose(got, run_onnx(model, x), atol=1e-5, rtol=1e-4)
    if axis in (None, 1):
        np.testing.assert_allclose(got.reshape(2, -1).sum(axis=1), 1.0, atol=1e-5)


def _dropout(training: np.ndarray | None) -> onnx.ModelProto:
    inputs = ["x", "ratio"] + (["mode"] if training is not None else [])
    inits = [numpy_helper.from_array(np.asarray(0.5, np.float32), "ratio")]
    if training is not None:
        inits.append(numpy_helper.from_array(training, "mode"))
    graph = helper.make_graph(
        [helper.make_node("Dropout", inputs, ["y"])],
        "dropout",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def test_dropout_with_training_mode_true_is_refused_not_lowered_as_identity() -> None:
    with pytest.raises(TrainingModeError, match="training_mode=True.*model.eval"):
        onnx_to_tflite(_dropout(np.asarray(True)))


def test_dropout_with_training_mode_false_is_an_identity() -> None:
    x = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32)
    np.testing.assert_array_equal(run_tflite(onnx_to_tflite(_dropout(np.asarray(False))), x), x)
    np.testing.assert_array_equal(run_tflite(onnx_to_tflite(_dropout(None)), x), x)


def test_onnx_target_refuses_dropout_in_training_mode_too() -> None:
    from converters.produce import float32_onnx_for

    with pytest.raises(TrainingModeError, match="training_mode=True"):
        float32_onnx_for(_dropout(np.asarray(True)), 9, 17)


def test_zero_size_input_is_refused_as_zero_size_not_as_dynamic() -> None:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "empty",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 0, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 0, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    with pytest.raises(
        UnsupportedShapeError, match=r"zero-size dimension \(shape \[2, 0, 4\]\)"
    ) as info:
        onnx_to_tflite(model)
    assert "dynamic" not in str(info.value)
