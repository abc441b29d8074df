"""Models for the TFLite writer tests: one-operator ONNX graphs and torch CNNs.

:data:`OP_CASES` maps a case id to a builder returning ``(model, input batch)``:
each a tiny graph built with :mod:`onnx.helper` around one operator of the
supported subset (with a dynamic batch dimension ``N``), usually behind a
convolution when the operator must see an NHWC tensor inside the TFLite model.
:func:`torch_legacy_cnn` exports a CNN with the TorchScript exporter at opset
17 without constant folding, so the graph still holds BatchNormalization and the
``Shape -> Gather -> Unsqueeze -> Concat -> Reshape`` chain of
``x.view(x.size(0), -1)``. :func:`run_tflite` and :func:`run_onnx` run a model.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
Case = Callable[[], tuple[onnx.ModelProto, np.ndarray]]


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def make_model(
    nodes: list[onnx.NodeProto],
    input_shape: tuple[int, ...],
    inits: dict[str, np.ndarray] | None = None,
    opset: int = OPSET,
    output: str = "y",
    batch: str | int = "N",
) -> onnx.ModelProto:
    """A graph with input ``x`` of ``[batch, *input_shape[1:]]`` and output ``output``."""
    graph = helper.make_graph(
        nodes,
        "case",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, *input_shape[1:]])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(v, k) for k, v in (inits or {}).items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    model.graph.output[0].CopyFrom(inferred.graph.output[0])
    onnx.checker.check_model(model)
    return model


def _x(shape: tuple[int, ...], seed: int = 1) -> np.ndarray:
    return _rng(seed).normal(0, 1, size=shape).astype(np.float32)


def _w(*shape: int, seed: int = 2, scale: float = 0.5) -> np.ndarray:
    return _rng(seed).normal(0, scale, size=shape).astype(np.float32)


def conv_case(
    c_in: int = 3,
    c_out: int = 4,
    k: int = 3,
    hw: int = 9,
    bias: bool = True,
    **attrs: Any,
) -> tuple[onnx.ModelProto, np.ndarray]:
    """A single Conv; ``attrs`` are the ONNX attributes (group, pads, strides...)."""
    group = int(attrs.get("group", 1))
    inits = {"W": _w(c_out, c_in // group, k, k)}
    inputs = ["x", "W"]
    if bias:
        inits["B"] = _w(c_out, seed=3)
        inputs.append("B")
    node = helper.make_node("Conv", inputs, ["y"], name="conv", kernel_shape=[k, k], **attrs)
    shape = (3, c_in, hw, hw)
    return make_model([node], shape, inits), _x(shape)


def after_conv(
    op: str,
    inputs_extra: list[str] | None = None,
    inits: dict[str, np.ndarray] | None = None,
    c: int = 4,
    hw: int = 6,
    opset: int = OPSET,
    **attrs: Any,
) -> tuple[onnx.ModelProto, np.ndarray]:
    """``x -> Conv(3->c, 3x3, pad 1) -> op -> y``: ``op`` reads an NHWC tensor inside TFLite."""
    all_inits = {"W": _w(c, 3, 3, 3), "B": _w(c, seed=3), **(inits or {})}
    nodes = [
        helper.make_node(
            "Conv", ["x", "W", "B"], ["h"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1]
        ),
        helper.make_node(op, ["h", *(inputs_extra or [])], ["y"], name=f"node_{op}", **attrs),
    ]
    shape = (3, 3, hw, hw)
    return make_model(nodes, shape, all_inits, opset=opset), _x(shape)


def unary(
    op: str,
    shape: tuple[int, ...] = (3, 7),
    extra: list[str] | None = None,
    inits: dict[str, np.ndarray] | None = None,
    opset: int = OPSET,
    **attrs: Any,
) -> tuple[onnx.ModelProto, np.ndarray]:
    """``x -> op -> y`` on a plain (not NHWC) tensor."""
    node = helper.make_node(op, ["x", *(extra or [])], ["y"], name=f"node_{op}", **attrs)
    return make_model([node], shape, inits, opset=opset), _x(shape) * 3


def _scalar(v: float) -> np.ndarray:
    return np.asarray(v, dtype=np.float32)


def _binary(op: str, const_shape: tuple[int, ...] | None) -> tuple[onnx.ModelProto, np.ndarray]:
    shape = (3, 4, 5)
    if const_shape is None:  # activation (op) activation
        nodes = [
            helper.make_node("Sigmoid", ["x"], ["s"], name="sig"),
            helper.make_node(op, ["x", "s"], ["y"], name=f"node_{op}"),
        ]
        return make_model(nodes, shape), _x(shape)
    c = _rng(4).uniform(0.5, 2.0, size=const_shape).astype(np.float32)
    nodes = [helper.make_node(op, ["x", "C"], ["y"], name=f"node_{op}")]
    return make_model(nodes, shape, {"C": c}), _x(shape)


def _binary_nhwc(op: str) -> tuple[onnx.ModelProto, np.ndarray]:
    c = _rng(5).uniform(0.5, 2.0, size=(4, 1, 1)).astype(np.float32)
    return after_conv(op, ["C"], {"C": c})


def _two_branch_concat() -> tuple[onnx.ModelProto, np.ndarray]:
    inits = {"W1": _w(4, 3, 3, 3), "W2": _w(2, 3, 1, 1, seed=7)}
    nodes = [
        helper.make_node("Conv", ["x", "W1"], ["a"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["x", "W2"], ["b"], kernel_shape=[1, 1]),
        helper.make_node("Concat", ["a", "b"], ["y"], name="concat", axis=1),
    ]
    return make_model(nodes, (2, 3, 5, 5), inits), _x((2, 3, 5, 5))


def _conv_bn(standalone: bool) -> tuple[onnx.ModelProto, np.ndarray]:
    rng = _rng(8)
    stats = {
        "gamma": rng.uniform(0.5, 1.5, 4).astype(np.float32),
        "beta": rng.normal(0, 0.3, 4).astype(np.float32),
        "mean": rng.normal(0, 0.3, 4).astype(np.float32),
        "var": rng.uniform(0.5, 2.0, 4).astype(np.float32),
    }
    bn_in = "r" if standalone else "h"
    nodes = [
        helper.make_node("Conv", ["x", "W", "B"], ["h"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node(
            "BatchNormalization",
            [bn_in, "gamma", "beta", "mean", "var"],
            ["bn"],
            name="bn",
            epsilon=1e-3,
        ),
        helper.make_node("Relu" if standalone else "Identity", ["bn"], ["y"]),
    ]
    inits = {"W": _w(4, 3, 3, 3), "B": _w(4, seed=3), **stats}
    if not standalone:
        nodes.pop(1)
    return make_model(nodes, (2, 3, 6, 6), inits), _x((2, 3, 6, 6))


def _flatten_after_conv(op: str) -> tuple[onnx.ModelProto, np.ndarray]:
    """Conv -> Flatten/Reshape -> Gemm: the flattened order must be NCHW's."""
    inits = {
        "W": _w(4, 3, 3, 3),
        "FC": _w(5, 4 * 5 * 5, seed=9, scale=0.2),
        "shape": np.asarray([0, -1], dtype=np.int64),
    }
    flat = (
        helper.make_node("Flatten", ["h"], ["f"], axis=1)
        if op == "Flatten"
        else helper.make_node("Reshape", ["h", "shape"], ["f"])
    )
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["h"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        flat,
        helper.make_node("Gemm", ["f", "FC"], ["y"], transB=1),
    ]
    return make_model(nodes, (2, 3, 5, 5), inits), _x((2, 3, 5, 5))


def _batch_matmul() -> tuple[onnx.ModelProto, np.ndarray]:
    nodes = [
        helper.make_node("Transpose", ["x"], ["t"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["x", "t"], ["y"], name="bmm"),
    ]
    return make_model(nodes, (3, 4, 5)), _x((3, 4, 5))


def _gemm(**attrs: Any) -> tuple[onnx.ModelProto, np.ndarray]:
    trans_b = attrs.get("transB", 0)
    w = _w(6, 5) if trans_b else _w(5, 6)
    c = _w(1, 6, seed=3) if attrs.pop("c_2d", False) else _w(6, seed=3)
    node = helper.make_node("Gemm", ["x", "W", "C"], ["y"], name="gemm", **attrs)
    return make_model([node], (3, 5), {"W": w, "C": c}), _x((3, 5))


def _gemm_trans_a() -> tuple[onnx.ModelProto, np.ndarray]:
    """transA contracts over the first axis, so the batch is fixed (5) here."""
    node = helper.make_node("Gemm", ["x", "W", "C"], ["y"], name="gemm", transA=1)
    inits = {"W": _w(5, 4), "C": _w(4, seed=3)}
    return make_model([node], (5, 6), inits, batch=5), _x((5, 6))


def _global_pool_squeeze() -> tuple[onnx.ModelProto, np.ndarray]:
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["h"], kernel_shape=[3, 3]),
        helper.make_node("GlobalAveragePool", ["h"], ["g"]),
        helper.make_node("Squeeze", ["g", "axes"], ["y"], name="squeeze"),
    ]
    inits = {"W": _w(4, 3, 3, 3), "axes": np.asarray([2, 3], dtype=np.int64)}
    return make_model(nodes, (2, 3, 6, 6), inits), _x((2, 3, 6, 6))


_ARITH = ("Add", "Sub", "Mul", "Div")


def _chain(ops: list[str], shape: tuple[int, ...] = (3, 7)) -> tuple[onnx.ModelProto, np.ndarray]:
    names = ["x"] + [f"t{i}" for i in range(len(ops) - 1)] + ["y"]
    pairs = zip(ops, names[:-1], names[1:], strict=True)
    nodes = [helper.make_node(op, [a], [b]) for op, a, b in pairs]
    return make_model(nodes, shape), _x(shape) * 3


def _split_concat() -> tuple[onnx.ModelProto, np.ndarray]:
    nodes = [
        helper.make_node("Split", ["x", "s"], ["a", "b"], axis=1),
        helper.make_node("Concat", ["b", "a"], ["y"], axis=1),
    ]
    return make_model(nodes, (3, 6), {"s": np.asarray([2, 4], np.int64)}), _x((3, 6))


def _recurrent(op: str, **attrs: Any) -> tuple[onnx.ModelProto, np.ndarray]:
    """LSTM / GRU over [T=5, N=3, I=4] (T fixed: the writer unrolls it), hidden 6."""
    gates = 4 if op == "LSTM" else 3
    dirs = 2 if attrs.get("direction") == "bidirectional" else 1
    inits = {
        "W": _w(dirs, gates * 6, 4, seed=5),
        "R": _w(dirs, gates * 6, 6, seed=6),
        "B": _w(dirs, 2 * gates * 6, seed=7, scale=0.2),
    }
    node = helper.make_node(op, ["x", "W", "R", "B"], ["y"], hidden_size=6, **attrs)
    return make_model([node], (5, 3, 4), inits, batch=5), _x((5, 3, 4))


def _bounds(lo: float, hi: float) -> dict[str, np.ndarray]:
    return {"lo": _scalar(lo), "hi": _scalar(hi)}


OP_CASES: dict[str, Case] = {
    "gemm_transB_alpha_beta": lambda: _gemm(transB=1, alpha=0.7, beta=1.3),
    "gemm_bias_1xN": lambda: _gemm(c_2d=True),
    "gemm_activation_weights": lambda: unary(
        "Gemm", (3, 5), ["x", "C"], {"C": _scalar(0.3)}, alpha=0.5, beta=2.0, transB=1),
    "gemm_transA_fixed_batch": _gemm_trans_a,
    "matmul_const": lambda: unary("MatMul", (3, 5), ["W"], {"W": _w(5, 7)}),
    "matmul_rank3_const": lambda: unary("MatMul", (3, 4, 5), ["W"], {"W": _w(5, 7)}),
    "matmul_two_activations": _batch_matmul,
    **{f"{op.lower()}_const": partial(_binary, op, (5,)) for op in _ARITH},
    **{f"{op.lower()}_activations": partial(_binary, op, None) for op in _ARITH},
    **{f"{op.lower()}_nhwc_channel_const": partial(_binary_nhwc, op) for op in _ARITH},
    "add_scalar_const": lambda: _binary("Add", ()),
    "relu": lambda: unary("Relu"),
    "relu_nhwc": lambda: after_conv("Relu"),
    "clip_relu6": lambda: unary("Clip", extra=["lo", "hi"], inits=_bounds(0, 6)),
    "clip_general": lambda: unary("Clip", extra=["lo", "hi"], inits=_bounds(-0.5, 0.7)),
    "clip_min_only": lambda: unary("Clip", extra=["lo"], inits={"lo": _scalar(0.2)}),
    "sigmoid": lambda: unary("Sigmoid"),
    "tanh": lambda: unary("Tanh"),
    "leaky_relu": lambda: unary("LeakyRelu", alpha=0.2),
    "hard_swish_nhwc": lambda: after_conv("HardSwish"),
    "hard_sigmoid_nhwc": lambda: after_conv("HardSigmoid", alpha=0.3, beta=0.4),
    "gelu_erf": lambda: unary("Gelu", opset=20),
    "gelu_tanh_nhwc": lambda: after_conv("Gelu", opset=20, approximate="tanh"),
    "softmax_last": lambda: unary("Softmax", (3, 4, 6), axis=-1),
    "softmax_channels_nhwc": lambda: after_conv("Softmax", axis=1),
    "softmax_opset11_coerced": lambda: unary("Softmax", (3, 4, 6), opset=11, axis=1),
    "conv_3x3_pad1": lambda: conv_case(pads=[1, 1, 1, 1]),
    "conv_stride2_pad1": lambda: conv_case(strides=[2, 2], pads=[1, 1, 1, 1]),
    "conv_stride2_same_upper": lambda: conv_case(hw=10, strides=[2, 2], auto_pad="SAME_UPPER"),
    "conv_asymmetric_pads": lambda: conv_case(pads=[0, 2, 1, 0]),
    "conv_dilation2": lambda: conv_case(hw=11, dilations=[2, 2], pads=[2, 2, 2, 2]),
    "conv_no_bias_valid": lambda: conv_case(bias=False),
    "conv_5x5_stride3": lambda: conv_case(k=5, hw=13, strides=[3, 3]),
    "conv_depthwise": lambda: conv_case(c_in=4, c_out=4, group=4, pads=[1, 1, 1, 1]),
    "conv_depthwise_multiplier2_stride2": lambda: conv_case(
        c_in=4, c_out=8, group=4, strides=[2, 2], pads=[1, 1, 1, 1]),
    "conv_depthwise_dilation2": lambda: conv_case(
        c_in=4, c_out=4, group=4, hw=11, dilations=[2, 2], pads=[2, 2, 2, 2]),
    "conv_grouped": lambda: conv_case(c_in=4, c_out=6, group=2, pads=[1, 1, 1, 1]),
    "maxpool_2x2": lambda: after_conv("MaxPool", kernel_shape=[2, 2], strides=[2, 2]),
    "maxpool_3x3_stride2_pad1": lambda: after_conv(
        "MaxPool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
    "avgpool_same_exclusive": lambda: after_conv(
        "AveragePool", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
    "avgpool_pad_inclusive": lambda: after_conv(
        "AveragePool", kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=1),
    "avgpool_2x2": lambda: after_conv("AveragePool", kernel_shape=[2, 2], strides=[2, 2]),
    "global_average_pool_squeeze": _global_pool_squeeze,
    "global_max_pool": lambda: after_conv("GlobalMaxPool"),
    "batchnorm_folded_into_conv": lambda: _conv_bn(standalone=False),
    "batchnorm_standalone": lambda: _conv_bn(standalone=True),
    "batchnorm_rank2": lambda: unary(
        "BatchNormalization", (3, 4), ["g", "b", "m", "v"],
        {"g": _w(4, seed=5), "b": _w(4, seed=6), "m": _w(4, seed=7),
         "v": np.abs(_w(4, seed=8)) + 0.5}),
    "flatten_after_conv": lambda: _flatten_after_conv("Flatten"),
    "reshape_after_conv": lambda: _flatten_after_conv("Reshape"),
    "transpose_after_conv": lambda: after_conv("Transpose", perm=[0, 3, 1, 2]),
    "transpose_rank3": lambda: unary("Transpose", (3, 4, 5), perm=[0, 2, 1]),
    "concat_channels_nhwc": _two_branch_concat,
    "concat_rank2": lambda: unary("Concat", (3, 4), ["x"], axis=1),
    "unsqueeze": lambda: unary("Unsqueeze", (3, 4), ["axes"], {"axes": np.asarray([1], np.int64)}),
    "squeeze": lambda: unary("Squeeze", (3, 1, 4), ["axes"], {"axes": np.asarray([1], np.int64)}),
    "reduce_mean_spatial_nhwc": lambda: after_conv("ReduceMean", axes=[2, 3], keepdims=0),
    "reduce_mean_keepdims_nhwc": lambda: after_conv("ReduceMean", axes=[1, 3]),
    "reduce_max_width_nhwc": lambda: after_conv("ReduceMax", axes=[3], keepdims=0),
    "reduce_sum_axes_input": lambda: unary("ReduceSum", (3, 4, 5), ["axes"],
                                           {"axes": np.asarray([-1], np.int64)}, keepdims=0),
    "reduce_mean_opset18_axes_input": lambda: after_conv(
        "ReduceMean", ["axes"], {"axes": np.asarray([2, 3], np.int64)}, opset=18),
    "pad_zero_nhwc": lambda: after_conv("Pad", ["pads"], {"pads": np.asarray(
        [0, 0, 1, 2, 0, 0, 2, 1], np.int64)}),
    "pad_value_rank2": lambda: unary("Pad", (3, 4), ["pads", "v"], {
        "pads": np.asarray([0, 1, 0, 2], np.int64), "v": _scalar(1.5)}),
    "pad_reflect_nhwc": lambda: after_conv("Pad", ["pads"], {"pads": np.asarray(
        [0, 0, 1, 1, 0, 0, 1, 1], np.int64)}, mode="reflect"),
    # [converters-reach]: transformer, sequence and upsampling operators.
    "layer_norm": lambda: unary("LayerNormalization", (3, 4, 6), ["g", "b"],
                                {"g": _w(6, seed=5), "b": _w(6, seed=6)}, opset=17, axis=-1),
    "erf": lambda: unary("Erf"),
    "pow_const_exponent": lambda: unary("Pow", (3, 4, 5), ["e"], {"e": _scalar(3.0)}),
    "sqrt_of_sigmoid": lambda: _chain(["Sigmoid", "Sqrt"]),
    "reciprocal": lambda: unary("Reciprocal"),
    "split_then_concat_swapped": _split_concat,
    "slice_steps": lambda: unary("Slice", (3, 8), ["st", "en", "ax", "sp"], {
        "st": np.asarray([7], np.int64), "en": np.asarray([0], np.int64),
        "ax": np.asarray([1], np.int64), "sp": np.asarray([-2], np.int64)}),
    "gather_columns": lambda: unary("Gather", (3, 6), ["i"],
                                    {"i": np.asarray([4, 0, -1], np.int64)}, axis=1),
    "expand_middle": lambda: unary("Expand", (3, 1, 4), ["s"],
                                   {"s": np.asarray([1, 5, 4], np.int64)}),
    "reduce_min_nhwc": lambda: after_conv("ReduceMin", axes=[1], keepdims=0),
    "reduce_prod": lambda: unary("ReduceProd", (3, 4, 2), axes=[2], keepdims=1, opset=13),
    "conv1d": lambda: unary("Conv", (3, 4, 12), ["W", "B"], {"W": _w(6, 4, 3), "B": _w(6, seed=3)},
                            kernel_shape=[3], pads=[1, 1], strides=[2]),
    "conv_transpose_s2": lambda: unary(
        "ConvTranspose", (3, 4, 5, 5), ["W", "B"], {"W": _w(4, 3, 3, 3), "B": _w(3, seed=3)},
        kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1]),
    "resize_bilinear_nhwc": lambda: after_conv("Resize", ["", "sc"], {"sc": np.asarray(
        [1, 1, 2, 2], np.float32)}, mode="linear", coordinate_transformation_mode="half_pixel"),
    "lstm_forward": lambda: _recurrent("LSTM"),
    "lstm_bidirectional": lambda: _recurrent("LSTM", direction="bidirectional"),
    "gru_linear_before_reset": lambda: _recurrent("GRU", linear_before_reset=1),
    "gru_reverse": lambda: _recurrent("GRU", direction="reverse"),
    "upsample_nearest": lambda: unary("Upsample", (3, 2, 3, 3), ["sc"], {
        "sc": np.asarray([1, 1, 2, 2], np.float32)}, opset=9, mode="nearest"),
}  # fmt: skip


def torch_legacy_cnn(seed: int = 0) -> tuple[onnx.ModelProto, np.ndarray]:
    """Conv+BN+ReLU, depthwise conv + HardSwish, grouped 1x1 conv, ``view(n, -1)``, Linear.

    Exported with the TorchScript exporter (opset 17, no constant folding), so
    the graph keeps BatchNormalization and the Shape/Gather/Concat chain.
    """
    import torch
    from torch import nn

    torch.manual_seed(seed)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1 = nn.Conv2d(3, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)
            self.dw = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8)
            self.g = nn.Conv2d(8, 12, 1, groups=2)
            self.fc = nn.Linear(12 * 8 * 8, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = torch.relu(self.bn(self.c1(x)))
            x = nn.functional.hardswish(self.dw(x))
            x = self.g(x)
            return torch.softmax(self.fc(x.view(x.size(0), -1)), dim=-1)

    net = Net()
    gen = torch.Generator().manual_seed(seed)
    assert net.bn.running_mean is not None and net.bn.running_var is not None
    with torch.no_grad():
        net.bn.running_mean.copy_(torch.randn(8, generator=gen) * 0.3)
        net.bn.running_var.copy_(torch.rand(8, generator=gen) + 0.5)
        net.bn.weight.copy_(torch.rand(8, generator=gen) + 0.5)
        net.bn.bias.copy_(torch.randn(8, generator=gen) * 0.2)
        net.fc.weight.mul_(8.0)  # spread the class probabilities
    net.eval()
    f = io.BytesIO()
    torch.onnx.export(
        net, (torch.randn(2, 3, 16, 16),), f,  # type: ignore[arg-type]  # file objects work
        dynamo=False, opset_version=17,
        input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "N"}, "y": {0: "N"}},
        do_constant_folding=False,
    )  # fmt: skip
    x = _rng(seed).normal(0, 1, size=(32, 3, 16, 16)).astype(np.float32)
    return onnx.load_from_string(f.getvalue()), x


def torch_mobile_block(seed: int = 0) -> tuple[Any, np.ndarray]:
    """A MobileNetV3-style block (eval mode) and 32 image-like inputs ``[N, 3, 16, 16]``.

    Stem conv + BN + HardSwish, depthwise conv + BN + ReLU6, a squeeze-excite
    gate (AdaptiveAvgPool, 1x1 convs, HardSigmoid, broadcast Mul), a pointwise
    conv, ``mean((2, 3))`` and a linear head with softmax.
    """
    import torch
    from torch import nn

    from tests.models import image_batch

    torch.manual_seed(seed)

    class SqueezeExcite(nn.Module):
        def __init__(self, c: int) -> None:
            super().__init__()
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.reduce, self.expand = nn.Conv2d(c, 4, 1), nn.Conv2d(4, c, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            gate = self.expand(torch.relu(self.reduce(self.pool(x))))
            return x * nn.functional.hardsigmoid(gate)

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.Hardswish())
            self.dw = nn.Sequential(
                nn.Conv2d(16, 16, 3, 1, 1, groups=16), nn.BatchNorm2d(16), nn.ReLU6()
            )
            self.se = SqueezeExcite(16)
            self.pw = nn.Conv2d(16, 24, 1)
            self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(24, 6))

        def features(self, x: torch.Tensor) -> torch.Tensor:
            return self.pw(self.se(self.dw(self.stem(x)))).mean((2, 3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.softmax(self.head(self.features(x)), dim=-1)

    block, images = Block(), image_batch(32, seed)
    for layer in block.modules():
        if isinstance(layer, nn.BatchNorm2d):
            layer.momentum = None  # running statistics = this batch's, as after training
    with torch.no_grad():
        block.train()(torch.from_numpy(images))
    block.eval()
    linear = block.head[1]
    assert isinstance(linear, nn.Linear)
    with torch.no_grad():  # standardize the head's inputs so predictions spread out
        feats = block.features(torch.from_numpy(images))
        weight = linear.weight / (feats.std(0) + 1e-3) * 1.5
        linear.weight.copy_(weight)
        linear.bias.copy_(-(weight @ feats.mean(0)))
    return block, images


def run_onnx(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """First output of ``model`` on ``x`` with onnxruntime."""
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, {sess.get_inputs()[0].name: x})[0])


def run_tflite(data: bytes, x: np.ndarray) -> np.ndarray:
    """First output of a TFLite model on ``x`` with ai-edge-litert (resizing the batch)."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_content=data)
    d = interp.get_input_details()[0]
    interp.resize_tensor_input(d["index"], x.shape)
    interp.allocate_tensors()
    interp.set_tensor(d["index"], x)
    interp.invoke()
    return np.asarray(interp.get_tensor(interp.get_output_details()[0]["index"]))


# Tolerances the tests hold the weight modes to: float32 absolute; float16 and
# int8 as (max abs error relative to max(1, max |reference|), top-1 agreement).
FLOAT32_ABS = 1e-4
TOLERANCE = {"float16": (1e-2, 1.0), "int8": (5e-2, 0.95)}


def _torch(builder: Callable[[], tuple[Any, np.ndarray]]) -> tuple[onnx.ModelProto, np.ndarray]:
    from tests import models

    module, x = builder()
    return models.torch_to_onnx(module, x), x


def _zoo_builders() -> dict[str, Case]:
    from tests import models

    return {
        "torch_cnn": partial(_torch, models.torch_cnn),
        "torch_mlp": partial(_torch, models.torch_mlp),
        "torch_legacy_exporter_cnn": torch_legacy_cnn,
        "torch_mobile_block": partial(_torch, torch_mobile_block),
        "onnx_helper_mlp": models.onnx_helper_mlp,
    }


#: Whole models (from :mod:`tests.models` and above): name -> builder of (model, samples).
BUILDERS: dict[str, Case] = _zoo_builders()
