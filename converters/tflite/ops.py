"""Lowerings of elementwise, activation and shape operators (ONNX node -> TFLite ops).

Each lowering reads its inputs through the :class:`~converters.tflite.context.Context`
and registers its output there. Convolution, pooling and dense layers live in
:mod:`converters.tflite.ops_nn`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import tflite

from converters.errors import TrainingModeError
from converters.graph_checks import dropout_training_problem, training_message
from converters.tflite.context import Context, Op, attrs
from converters.tflite.errors import UnsupportedAttributeError, UnsupportedShapeError
from converters.tflite.layout import (
    NHWC,
    ONNX,
    compose_from_nhwc,
    nhwc_axis,
    permute,
    stored_shape,
)

Lowering = Callable[[Context, onnx.NodeProto], None]
Act = tflite.ActivationFunctionType

_BINARY = {
    "Add": (Op.ADD, "AddOptions"),
    "Sub": (Op.SUB, "SubOptions"),
    "Mul": (Op.MUL, "MulOptions"),
    "Div": (Op.DIV, "DivOptions"),
}


def _shared_layout(ctx: Context, node: onnx.NodeProto, names: list[str]) -> str:
    """NHWC when every activation operand is a 4-D NHWC tensor, else ONNX."""
    if len(ctx.shape(node.output[0])) != 4:
        return ONNX
    acts = [n for n in names if not ctx.is_constant(n)]
    if acts and all(ctx.layout_of(n) == NHWC for n in acts):
        return NHWC
    return ONNX


def binary(ctx: Context, node: onnx.NodeProto) -> None:
    code, options = _BINARY[node.op_type]
    names = list(node.input[:2])
    layout = _shared_layout(ctx, node, names)
    ins = [ctx.input(n, layout) for n in names]
    out = ctx.new_tensor(node.output[0], layout)
    ctx.op(code, ins, [out], (options, {"FusedActivationFunction": 0}))
    ctx.output(node.output[0], out, layout)


def _unary(ctx: Context, node: onnx.NodeProto, code: int, options=None) -> None:
    name = node.input[0]
    layout = ctx.layout_of(name) or ONNX
    out = ctx.new_tensor(node.output[0], layout)
    ctx.op(code, [ctx.input(name, layout)], [out], options)
    ctx.output(node.output[0], out, layout)


def relu(ctx: Context, node: onnx.NodeProto) -> None:
    _unary(ctx, node, Op.RELU)


def sigmoid(ctx: Context, node: onnx.NodeProto) -> None:
    _unary(ctx, node, Op.LOGISTIC)


def tanh(ctx: Context, node: onnx.NodeProto) -> None:
    _unary(ctx, node, Op.TANH)


def hard_swish(ctx: Context, node: onnx.NodeProto) -> None:
    _unary(ctx, node, Op.HARD_SWISH)


def leaky_relu(ctx: Context, node: onnx.NodeProto) -> None:
    alpha = float(attrs(node).get("alpha", 0.01))
    _unary(ctx, node, Op.LEAKY_RELU, ("LeakyReluOptions", {"Alpha": alpha}))


def gelu(ctx: Context, node: onnx.NodeProto) -> None:
    """Gelu (opset 20) -> GELU, builtin code 150: stored past the old int8 code field."""
    approximate = attrs(node).get("approximate", b"none")
    approximate = approximate.decode() if isinstance(approximate, bytes) else approximate
    if approximate not in ("none", "tanh"):
        raise UnsupportedAttributeError("Gelu", node.name, f"approximate={approximate!r}")
    _unary(ctx, node, Op.GELU, ("GeluOptions", {"Approximate": approximate == "tanh"}))


def hard_sigmoid(ctx: Context, node: onnx.NodeProto) -> None:
    """HardSigmoid: ``min(relu(alpha * x + beta), 1)`` as MUL, ADD (fused RELU), MINIMUM."""
    a = attrs(node)
    alpha, beta = float(a.get("alpha", 0.2)), float(a.get("beta", 0.5))
    name, out_name = node.input[0], node.output[0]
    layout = ctx.layout_of(name) or ONNX
    scaled = ctx.new_tensor(f"{out_name}__scaled", layout, like=out_name)
    shifted = ctx.new_tensor(f"{out_name}__shifted", layout, like=out_name)
    out = ctx.new_tensor(out_name, layout)

    def scalar(tag: str, value: float) -> int:
        return ctx.const(f"{out_name}__{tag}", np.asarray([value], dtype=np.float32))

    ctx.op(Op.MUL, [ctx.input(name, layout), scalar("alpha", alpha)], [scaled],
           ("MulOptions", {"FusedActivationFunction": 0}))  # fmt: skip
    ctx.op(Op.ADD, [scaled, scalar("beta", beta)], [shifted],
           ("AddOptions", {"FusedActivationFunction": Act.RELU}))  # fmt: skip
    ctx.op(Op.MINIMUM, [shifted, scalar("one", 1.0)], [out])
    ctx.output(out_name, out, layout)


def _clip_bounds(ctx: Context, node: onnx.NodeProto) -> tuple[float, float]:
    a = attrs(node)
    lo, hi = float(a.get("min", -np.inf)), float(a.get("max", np.inf))
    for pos in (1, 2):
        if len(node.input) > pos and node.input[pos]:
            name = node.input[pos]
            if not ctx.is_constant(name):
                raise UnsupportedAttributeError("Clip", node.name, "min/max must be constants")
            value = float(ctx.constant(name).reshape(-1)[0])
            lo, hi = (value, hi) if pos == 1 else (lo, value)
    return lo, hi


def clip(ctx: Context, node: onnx.NodeProto) -> None:
    lo, hi = _clip_bounds(ctx, node)
    special = {(0.0, np.inf): Op.RELU, (0.0, 6.0): Op.RELU6, (-1.0, 1.0): Op.RELU_N1_TO_1}
    if (lo, hi) in special:
        _unary(ctx, node, special[(lo, hi)])
        return
    name = node.input[0]
    layout = ctx.layout_of(name) or ONNX
    current = ctx.input(name, layout)
    for code, bound, tag in ((Op.MAXIMUM, lo, "min"), (Op.MINIMUM, hi, "max")):
        if np.isinf(bound):
            continue
        out = ctx.new_tensor(
            node.output[0] if tag == "max" else f"{node.output[0]}__lo", layout, like=node.output[0]
        )
        bound_t = ctx.const(f"{node.output[0]}__{tag}", np.asarray([bound], dtype=np.float32))
        ctx.op(code, [current, bound_t], [out])
        current = out
    ctx.output(node.output[0], current, layout)


def softmax(ctx: Context, node: onnx.NodeProto) -> None:
    """Softmax at every axis and opset.

    From opset 13 it normalises over one axis; before, over the input coerced to
    2-D at ``axis`` (every axis from ``axis`` on), which equals the one-axis form
    when ``axis`` is the last. TFLite's SOFTMAX normalises over the last axis of the
    tensor it is given, so the axis is moved last (in whatever layout the input is
    stored) and back, or the input is reshaped to 2-D.
    """
    name = node.input[0]
    rank = len(ctx.shape(name))
    opset13 = ctx.graph.opset >= 13
    axis = int(attrs(node).get("axis", -1 if opset13 else 1))
    if not -rank <= axis < rank:
        raise UnsupportedAttributeError("Softmax", node.name, f"axis {axis} of a rank-{rank} input")
    axis %= rank
    if opset13 or axis == rank - 1:
        _softmax_one_axis(ctx, node, axis)
    else:
        _softmax_flattened(ctx, node, axis)


_SOFTMAX_OPTIONS = ("SoftmaxOptions", {"Beta": 1.0})


def _softmax_one_axis(ctx: Context, node: onnx.NodeProto, axis: int) -> None:
    name, out_name = node.input[0], node.output[0]
    shape = ctx.shape(name)
    rank = len(shape)
    layout = ctx.layout_of(name) or ONNX
    if layout == NHWC and rank != 4:
        layout = ONNX
    where = nhwc_axis(axis) if layout == NHWC else axis  # the axis in the stored tensor
    src = ctx.input(name, layout)
    out = ctx.new_tensor(out_name, layout)
    if where == rank - 1:
        ctx.op(Op.SOFTMAX, [src], [out], _SOFTMAX_OPTIONS)
        ctx.output(out_name, out, layout)
        return
    dyn = ctx.graph.dynamic.get(name, (False,) * rank)
    stored, stored_dyn = stored_shape(shape, layout), stored_shape(dyn, layout)
    perm = tuple(i for i in range(rank) if i != where) + (where,)
    back = tuple(int(i) for i in np.argsort(perm))
    moved_shape, moved_dyn = permute(stored, perm), permute(stored_dyn, perm)
    moved = ctx.new_tensor(f"{out_name}__moved", ONNX, shape=moved_shape, dynamic=moved_dyn)
    ctx.op(Op.TRANSPOSE, [src, ctx.int32(f"{out_name}__perm", perm)], [moved])
    normed = ctx.new_tensor(f"{out_name}__sm", ONNX, shape=moved_shape, dynamic=moved_dyn)
    ctx.op(Op.SOFTMAX, [moved], [normed], _SOFTMAX_OPTIONS)
    ctx.op(Op.TRANSPOSE, [normed, ctx.int32(f"{out_name}__back", back)], [out])
    ctx.output(out_name, out, layout)


def _softmax_flattened(ctx: Context, node: onnx.NodeProto, axis: int) -> None:
    """Opset < 13: SOFTMAX over the input reshaped to 2-D at ``axis`` (ONNX order)."""
    name, out_name = node.input[0], node.output[0]
    shape = ctx.shape(name)
    dyn = ctx.graph.dynamic.get(name, (False,) * len(shape))
    flat = (int(np.prod(shape[:axis])), int(np.prod(shape[axis:])))
    flat_dyn = (any(dyn[:axis]), any(dyn[axis:]))
    if all(flat_dyn):
        raise UnsupportedShapeError(
            f"Softmax node {node.name!r}: both halves of the input around axis {axis} "
            "follow the batch size; export with a fixed batch size"
        )
    src = ctx.input(name, ONNX)
    t2d = ctx.reshape(
        src,
        f"{out_name}__2d",
        tuple(-1 if d else s for s, d in zip(flat, flat_dyn, strict=True)),
        flat,
        flat_dyn,
    )
    sm = ctx.new_tensor(f"{out_name}__sm", ONNX, shape=flat, dynamic=flat_dyn)
    ctx.op(Op.SOFTMAX, [t2d], [sm], _SOFTMAX_OPTIONS)
    out = ctx.reshape(
        sm,
        out_name,
        ctx.graph.signature(out_name),
        ctx.shape(out_name),
        ctx.graph.dynamic[out_name],
    )
    ctx.output(out_name, out, ONNX)


def reshape_like_output(ctx: Context, node: onnx.NodeProto) -> None:
    """Flatten / Reshape / Squeeze / Unsqueeze: RESHAPE to the inferred output shape."""
    out_name = node.output[0]
    sig = ctx.graph.signature(out_name)
    if sig.count(-1) > 1:
        raise UnsupportedShapeError(
            f"node {node.name!r} ({node.op_type}) gives {out_name!r} more than one "
            f"batch-dependent dimension {sig}; export with a fixed batch size"
        )
    src = ctx.input(node.input[0], ONNX)
    out = ctx.reshape(src, out_name, sig, ctx.shape(out_name), ctx.graph.dynamic[out_name])
    ctx.output(out_name, out, ONNX)


def transpose(ctx: Context, node: onnx.NodeProto) -> None:
    name, out_name = node.input[0], node.output[0]
    rank = len(ctx.shape(name))
    perm = tuple(attrs(node).get("perm", list(reversed(range(rank)))))
    layout = ctx.layout_of(name) or ONNX
    effective = compose_from_nhwc(perm) if layout == NHWC else perm
    src = ctx.input(name, layout)
    out = ctx.new_tensor(out_name, ONNX)
    ctx.op(Op.TRANSPOSE, [src, ctx.int32(f"{out_name}__perm", effective)], [out])
    ctx.output(out_name, out, ONNX)


def concat(ctx: Context, node: onnx.NodeProto) -> None:
    names = [n for n in node.input if n]
    rank = len(ctx.shape(node.output[0]))
    axis = int(attrs(node)["axis"]) % rank
    layout = _shared_layout(ctx, node, names)
    out_axis = nhwc_axis(axis) if layout == NHWC else axis
    out = ctx.new_tensor(node.output[0], layout)
    ctx.op(
        Op.CONCATENATION,
        [ctx.input(n, layout) for n in names],
        [out],
        ("ConcatenationOptions", {"Axis": out_axis, "FusedActivationFunction": 0}),
    )
    ctx.output(node.output[0], out, layout)


def _onnx_pads(ctx: Context, node: onnx.NodeProto, rank: int) -> np.ndarray:
    a = attrs(node)
    if "pads" in a:
        pads = np.asarray(a["pads"], dtype=np.int64)
    elif len(node.input) > 1 and node.input[1] and ctx.is_constant(node.input[1]):
        pads = ctx.constant(node.input[1]).astype(np.int64)
    else:
        raise UnsupportedAttributeError("Pad", node.name, "pads must be a constant")
    if len(node.input) > 3 and node.input[3]:
        axes = [int(x) % rank for x in ctx.constant(node.input[3]).reshape(-1)]
        full = np.zeros(2 * rank, dtype=np.int64)
        for i, ax in enumerate(axes):
            full[ax], full[ax + rank] = pads[i], pads[i + len(axes)]
        pads = full
    if (pads < 0).any():
        raise UnsupportedAttributeError("Pad", node.name, "negative pads (cropping)")
    return pads.reshape(2, rank).T  # rows: (before, after) per axis


def pad(ctx: Context, node: onnx.NodeProto) -> None:
    name, out_name = node.input[0], node.output[0]
    rank = len(ctx.shape(name))
    a = attrs(node)
    mode = a.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    value = float(a.get("value", 0.0))
    if len(node.input) > 2 and node.input[2]:
        value = float(ctx.constant(node.input[2]).reshape(-1)[0])
    pads = _onnx_pads(ctx, node, rank)
    layout = ctx.layout_of(name) if rank == 4 else ONNX
    layout = layout or ONNX
    if layout == NHWC:
        pads = pads[[0, 2, 3, 1]]
    src = ctx.input(name, layout)
    pads_t = ctx.int32(f"{out_name}__pads", pads)
    out = ctx.new_tensor(out_name, layout)
    if mode == "constant" and value == 0.0:
        ctx.op(Op.PAD, [src, pads_t], [out])
    elif mode == "constant":
        value_t = ctx.const(f"{out_name}__value", np.asarray([value], dtype=np.float32))
        ctx.op(Op.PADV2, [src, pads_t, value_t], [out])
    elif mode == "reflect":
        ctx.op(Op.MIRROR_PAD, [src, pads_t], [out], ("MirrorPadOptions", {"Mode": 0}))
    else:
        raise UnsupportedAttributeError("Pad", node.name, f"mode {mode!r}")
    ctx.output(out_name, out, layout)


_REDUCE = {
    "ReduceMean": Op.MEAN, "ReduceMax": Op.REDUCE_MAX, "ReduceSum": Op.SUM,
    "ReduceMin": Op.REDUCE_MIN, "ReduceProd": Op.REDUCE_PROD,
}  # fmt: skip


def _reduce_axes(ctx: Context, node: onnx.NodeProto, rank: int) -> list[int]:
    a = attrs(node)
    if len(node.input) > 1 and node.input[1]:
        if not ctx.is_constant(node.input[1]):
            raise UnsupportedAttributeError(node.op_type, node.name, "axes must be constant")
        axes = [int(v) for v in ctx.constant(node.input[1]).reshape(-1)]
    else:
        axes = [int(v) for v in a.get("axes", [])]
    if not axes:
        if a.get("noop_with_empty_axes", 0):
            raise UnsupportedAttributeError(node.op_type, node.name, "noop_with_empty_axes")
        axes = list(range(rank))
    return sorted(v % rank for v in axes)


def reduce(ctx: Context, node: onnx.NodeProto) -> None:
    """ReduceMean / ReduceMax / ReduceSum over constant axes.

    An NHWC input is reduced in place when the result's axis order matches
    ONNX's (e.g. a spatial mean giving ``[N, C]``), else it is transposed first.
    """
    name, out_name = node.input[0], node.output[0]
    rank = len(ctx.shape(name))
    axes = _reduce_axes(ctx, node, rank)
    keep = bool(attrs(node).get("keepdims", 1))
    layout = ctx.layout_of(name) or ONNX
    if layout == NHWC and not keep:
        remaining = [a for a in (0, 2, 3, 1) if a not in axes]
        if remaining != sorted(remaining):
            layout = ONNX
    tfl_axes = [nhwc_axis(a) for a in axes] if layout == NHWC else axes
    out_layout = layout if keep else ONNX
    out = ctx.new_tensor(out_name, out_layout)
    ctx.op(
        _REDUCE[node.op_type],
        [ctx.input(name, layout), ctx.int32(f"{out_name}__axes", sorted(tfl_axes))],
        [out],
        ("ReducerOptions", {"KeepDims": keep}),
    )
    ctx.output(out_name, out, out_layout)


def identity(ctx: Context, node: onnx.NodeProto) -> None:
    """Identity, and Dropout at inference: the output is the input.

    A Dropout whose ``training_mode`` input is not a constant false is refused:
    in training mode it drops values at random, which is not an identity.
    """
    if len(node.output) > 1 and node.output[1]:
        raise UnsupportedAttributeError(node.op_type, node.name, "the mask output is used")
    if node.op_type == "Dropout":
        problem = dropout_training_problem(node, ctx.graph.constants)
        if problem:
            raise TrainingModeError(training_message(node, problem))
    if ctx.is_constant(node.input[0]):
        ctx.graph.constants[node.output[0]] = ctx.constant(node.input[0])
        return
    ctx.values[node.output[0]] = ctx.values[node.input[0]]


BASIC_LOWERINGS: dict[str, Lowering] = {
    "Add": binary, "Sub": binary, "Mul": binary, "Div": binary,
    "Relu": relu, "Sigmoid": sigmoid, "Tanh": tanh, "HardSwish": hard_swish,
    "LeakyRelu": leaky_relu, "Clip": clip, "Softmax": softmax,
    "Gelu": gelu, "HardSigmoid": hard_sigmoid,
    "Flatten": reshape_like_output, "Reshape": reshape_like_output,
    "Squeeze": reshape_like_output, "Unsqueeze": reshape_like_output,
    "Transpose": transpose, "Concat": concat, "Pad": pad,
    "Identity": identity, "Dropout": identity,
    "ReduceMean": reduce, "ReduceMax": reduce, "ReduceSum": reduce,
    "ReduceMin": reduce, "ReduceProd": reduce,
}  # fmt: skip
