"""TFLite weight modes: how float16 and int8 weights are stored, and that the
interpreter's kernels compute exactly what those stored weights mean."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import tflite
from onnx import helper, numpy_helper

from converters.tflite import onnx_to_tflite
from converters.tflite.quantize import quantize_int8
from tests.tflite_models import OP_CASES, conv_case, make_model, run_onnx, run_tflite

Op = tflite.BuiltinOperator


def _model(data: bytes) -> tflite.Model:
    return tflite.Model.GetRootAs(data, 0)


def _op_codes(data: bytes) -> list[int]:
    m = _model(data)
    sg = m.Subgraphs(0)
    return [m.OperatorCodes(sg.Operators(i).OpcodeIndex()).BuiltinCode()
            for i in range(sg.OperatorsLength())]  # fmt: skip


def _run_builtin(data: bytes, x: np.ndarray) -> np.ndarray:
    """Run with TFLite's own kernels only (no XNNPACK), whose hybrid arithmetic
    the simulations below reproduce."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    interp = Interpreter(
        model_content=data,
        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
    )
    d = interp.get_input_details()[0]
    interp.resize_tensor_input(d["index"], x.shape)
    interp.allocate_tensors()
    interp.set_tensor(d["index"], x)
    interp.invoke()
    return np.asarray(interp.get_tensor(interp.get_output_details()[0]["index"]))


def test_float16_weights_are_stored_half_size_with_dequantize() -> None:
    model, _ = conv_case(c_in=8, c_out=16, k=5)
    f32, f16 = onnx_to_tflite(model), onnx_to_tflite(model, weights="float16")
    assert Op.DEQUANTIZE in _op_codes(f16)
    sg = _model(f16).Subgraphs(0)
    types = {sg.Tensors(i).Type() for i in range(sg.TensorsLength())}
    assert tflite.TensorType.FLOAT16 in types
    assert len(f16) < 0.7 * len(f32)


def _filters(data: bytes) -> dict[int, tflite.Tensor]:
    """Weight tensor (input 1) of each conv / fully-connected op, by op code."""
    m = _model(data)
    sg = m.Subgraphs(0)
    out = {}
    for i in range(sg.OperatorsLength()):
        op = sg.Operators(i)
        code = m.OperatorCodes(op.OpcodeIndex()).BuiltinCode()
        if code in (Op.CONV_2D, Op.DEPTHWISE_CONV_2D, Op.FULLY_CONNECTED):
            out[code] = sg.Tensors(op.Inputs(1))
    return out


def test_int8_weights_are_per_channel_for_convs_and_per_tensor_for_dense() -> None:
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["h"], kernel_shape=[3, 3]),
        helper.make_node("Conv", ["h", "D"], ["d"], kernel_shape=[3, 3], group=4),
        helper.make_node("Flatten", ["d"], ["f"]),
        helper.make_node("Gemm", ["f", "FC"], ["y"], transB=1),
    ]
    rng = np.random.default_rng(0)
    inits = {
        "W": rng.normal(size=(4, 3, 3, 3)).astype(np.float32),
        "D": rng.normal(size=(4, 1, 3, 3)).astype(np.float32),
        "FC": rng.normal(size=(2, 4 * 3 * 3)).astype(np.float32),
    }
    filters = _filters(onnx_to_tflite(make_model(nodes, (1, 3, 7, 7), inits), weights="int8"))
    conv, dw, fc = (filters[c] for c in (Op.CONV_2D, Op.DEPTHWISE_CONV_2D, Op.FULLY_CONNECTED))
    for t, n_scales, dim in ((conv, 4, 0), (dw, 4, 3), (fc, 1, 0)):
        assert t.Type() == tflite.TensorType.INT8
        q = t.Quantization()
        assert q.ScaleLength() == n_scales and q.QuantizedDimension() == dim
        assert all(q.ZeroPoint(i) == 0 for i in range(q.ZeroPointLength()))


def test_float16_weights_compute_like_onnx_with_float16_rounded_weights() -> None:
    model, x = OP_CASES["conv_depthwise_multiplier2_stride2"]()
    rounded = onnx.ModelProto()
    rounded.CopyFrom(model)
    for init in rounded.graph.initializer:
        values = numpy_helper.to_array(init).astype(np.float16).astype(np.float32)
        init.CopyFrom(numpy_helper.from_array(values, init.name))
    got = run_tflite(onnx_to_tflite(model, weights="float16"), x)
    assert np.abs(got - run_onnx(rounded, x)).max() <= 1e-5
    assert np.abs(got - run_onnx(model, x)).max() > 1e-5  # the weights really are float16


def test_int8_dense_weights_reproduce_the_hybrid_kernel_arithmetic() -> None:
    """Hybrid FULLY_CONNECTED: int8 weights * per-tensor scale; each input row is
    quantized symmetrically to int8 on the fly; int32 accumulation."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(6, 10)).astype(np.float32)
    b = rng.normal(size=6).astype(np.float32)
    model = make_model([helper.make_node("Gemm", ["x", "W", "b"], ["y"], transB=1)], (1, 10),
                       {"W": w, "b": b})  # fmt: skip
    x = rng.normal(size=(4, 10)).astype(np.float32)
    got = _run_builtin(onnx_to_tflite(model, weights="int8"), x)

    q, w_scale = quantize_int8(w, None)
    x_scale = np.abs(x).max(axis=1, keepdims=True) / 127
    expected = (np.round(x / x_scale) @ q.T.astype(np.float64)) * x_scale * w_scale + b
    assert np.abs(got - expected).max() <= 1e-5
    assert np.abs(got - run_onnx(model, x)).max() > 1e-3  # the weights really are int8


def _asymmetric_per_image(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """TFLite's AsymmetricQuantizeFloats per batch item: (q - zero_point, scale)."""
    flat = x.reshape(len(x), -1)
    lo = np.minimum(flat.min(axis=1), 0).reshape(-1, 1, 1, 1)
    hi = np.maximum(flat.max(axis=1), 0).reshape(-1, 1, 1, 1)
    scale = (hi - lo) / 255
    zero = np.round(-128 - lo / scale)
    q = np.clip(np.round(x / scale) + zero, -128, 127) - zero
    return q.astype(np.float32), scale


def test_int8_conv_and_depthwise_weights_reproduce_the_hybrid_kernel_arithmetic() -> None:
    """Hybrid per-channel CONV_2D / DEPTHWISE_CONV_2D: int8 weights with one scale
    per output channel; each input image quantized asymmetrically on the fly."""
    rng = np.random.default_rng(1)
    for group, c_in, c_out in ((1, 3, 5), (4, 4, 8)):
        w = rng.normal(size=(c_out, c_in // group, 3, 3)).astype(np.float32)
        b = rng.normal(size=c_out).astype(np.float32)
        attrs: dict[str, Any] = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "group": group}
        conv = helper.make_node("Conv", ["x", "W", "b"], ["y"], **attrs)
        model = make_model([conv], (1, c_in, 6, 6), {"W": w, "b": b})
        x = rng.normal(size=(3, c_in, 6, 6)).astype(np.float32)
        data = onnx_to_tflite(model, weights="int8")
        assert (Op.CONV_2D if group == 1 else Op.DEPTHWISE_CONV_2D) in _op_codes(data)
        got = _run_builtin(data, x)

        q, w_scale = quantize_int8(w, 0)
        xq, x_scale = _asymmetric_per_image(x)
        integer_conv = make_model([helper.make_node("Conv", ["x", "W"], ["y"], **attrs)],
                                  (1, c_in, 6, 6), {"W": q.astype(np.float32)})  # fmt: skip
        acc = run_onnx(integer_conv, xq)  # exact: small integers in float32
        expected = acc * x_scale * w_scale.reshape(1, -1, 1, 1) + b.reshape(1, -1, 1, 1)
        assert np.abs(got - expected).max() <= 1e-5
