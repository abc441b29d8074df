"""converters.tflite.size_report: where a TFLite file's bytes go, read from the file."""

from __future__ import annotations

import numpy as np
import tflite
from onnx import helper

from converters.tflite import onnx_to_tflite
from converters.tflite.builder import ModelSpec, serialize
from converters.tflite.quantize_full import onnx_to_tflite_int8_full
from converters.tflite.size_report import size_breakdown
from tests.tflite_models import make_model


def _conv_model():
    rng = np.random.default_rng(0)
    inits = {
        "w": rng.normal(0, 0.5, size=(16, 3, 3, 3)).astype(np.float32),
        "b": rng.normal(0, 0.1, size=(16,)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[3, 3], pads=[1] * 4),
        helper.make_node("Relu", ["c"], ["y"]),
    ]
    return make_model(nodes, (1, 3, 8, 8), inits)


def test_float32_file_is_weights_biases_and_tables() -> None:
    size = size_breakdown(onnx_to_tflite(_conv_model()))
    assert size.weights == {"float32": 16 * 27 * 4}
    assert size.biases == {"float32": 16 * 4}
    assert size.quantization == {}
    assert 0 < size.rest < size.total
    assert "weights float32 1,728" in size.summary()


def test_int8_full_file_shows_the_per_channel_parameters() -> None:
    """16 output channels: 16 scales + 16 zero points for the weights and again for the
    int32 bias (12 bytes each), one scale and zero point per activation tensor."""
    x = np.random.default_rng(1).normal(size=(16, 3, 8, 8)).astype(np.float32)
    size = size_breakdown(onnx_to_tflite_int8_full(_conv_model(), x)[0])
    assert size.weights == {"int8": 16 * 27}
    assert size.biases == {"int32": 16 * 4}
    assert size.quantization["weights"] == 16 * 12
    assert size.quantization["biases"] == 16 * 12
    assert size.quantization["activations"] % 12 == 0 and size.quantization["activations"] > 0
    counted = sum(
        sum(d.values())
        for d in (size.weights, size.biases, size.other_constants, size.quantization)
    )
    assert counted + size.rest == size.total


def test_equal_constants_are_stored_once_and_counted_once() -> None:
    spec = ModelSpec()
    x = spec.add_tensor("x", (1, 4))
    a = spec.add_constant("a", np.arange(4, dtype=np.float32).reshape(1, 4))
    b = spec.add_constant("b", np.arange(4, dtype=np.float32).reshape(1, 4))
    mid, y = spec.add_tensor("mid", (1, 4)), spec.add_tensor("y", (1, 4))
    spec.add_operator(tflite.BuiltinOperator.ADD, [x, a], [mid])
    spec.add_operator(tflite.BuiltinOperator.ADD, [mid, b], [y])
    spec.inputs, spec.outputs = [x], [y]
    data = serialize(spec)
    m = tflite.Model.GetRootAsModel(data, 0)
    sg = m.Subgraphs(0)
    assert sg.Tensors(a).Buffer() == sg.Tensors(b).Buffer() != 0
    assert m.BuffersLength() == 2  # the empty sentinel and one shared buffer
    assert size_breakdown(data).other_constants == {"float32": 16}
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_content=data)
    interp.allocate_tensors()
    interp.set_tensor(interp.get_input_details()[0]["index"], np.ones((1, 4), np.float32))
    interp.invoke()
    out = interp.get_tensor(interp.get_output_details()[0]["index"])
    np.testing.assert_array_equal(out, [[1, 3, 5, 7]])
