"""Lowerings of dense, convolution, pooling and normalization operators.

* ``Gemm``/``MatMul`` with constant weights -> ``FULLY_CONNECTED`` (alpha folded
  into the weights, beta*C into the bias); otherwise ``BATCH_MATMUL``.
* ``Conv`` (2-D only) -> ``CONV_2D`` (group 1), ``DEPTHWISE_CONV_2D`` (group ==
  input channels) or ``SPLIT`` + one ``CONV_2D`` per group + ``CONCATENATION``.
* Padding: none -> VALID; exactly TensorFlow's SAME split -> SAME; anything else
  -> an explicit ``PAD`` (``PADV2`` with the lowest float for max pooling) + VALID.
  The resulting output size is checked against ONNX shape inference, which
  catches ``ceil_mode`` and other cases TFLite cannot express.
* ``BatchNormalization`` not folded into a convolution -> ``MUL`` + ``ADD``.
"""

from __future__ import annotations

import numpy as np
import onnx

from converters.tflite.context import Context, Op, attrs
from converters.tflite.errors import UnsupportedAttributeError
from converters.tflite.layout import NHWC, ONNX
from converters.tflite.ops import Lowering

SAME, VALID = 0, 1
_LOWEST = float(np.finfo(np.float32).min)


def _fully_connected(
    ctx: Context,
    node: onnx.NodeProto,
    src: int,
    weights: np.ndarray,
    bias: np.ndarray | None,
    out: int,
    keep_dims: bool,
) -> None:
    name = node.output[0]
    w = ctx.const(f"{name}__weights", weights.astype(np.float32))
    b = ctx.const(f"{name}__bias", bias.astype(np.float32)) if bias is not None else -1
    ctx.op(
        Op.FULLY_CONNECTED,
        [src, w, b],
        [out],
        ("FullyConnectedOptions", {"FusedActivationFunction": 0, "KeepNumDims": keep_dims}),
        version=5 if keep_dims else 1,
    )


def gemm(ctx: Context, node: onnx.NodeProto) -> None:
    a = attrs(node)
    alpha, beta = float(a.get("alpha", 1.0)), float(a.get("beta", 1.0))
    trans_a, trans_b = int(a.get("transA", 0)), int(a.get("transB", 0))
    x, w_name, out_name = node.input[0], node.input[1], node.output[0]
    c_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
    src = ctx.input(x, ONNX)
    if trans_a:
        t = ctx.new_tensor(
            f"{out_name}__a", shape=ctx.shape(x)[::-1], dynamic=ctx.graph.dynamic[x][::-1]
        )
        ctx.op(Op.TRANSPOSE, [src, ctx.int32(f"{out_name}__perm", [1, 0])], [t])
        src = t
    if not ctx.is_constant(w_name):
        _batch_matmul(ctx, node, src, ctx.input(w_name, ONNX), trans_b, alpha, c_name, beta)
        return
    n = ctx.shape(out_name)[1]
    bias = None
    if c_name and ctx.is_constant(c_name):
        c = ctx.constant(c_name).astype(np.float64) * beta
        if c.size == 1 or c.shape in ((n,), (1, n)):
            bias, c_name = np.broadcast_to(c.reshape(-1), (n,)).copy(), None
    w = ctx.constant(w_name).astype(np.float64) * alpha
    out = ctx.new_tensor(out_name if c_name is None else f"{out_name}__mm", like=out_name)
    _fully_connected(ctx, node, src, w if trans_b else w.T, bias, out, keep_dims=False)
    ctx.output(out_name, _add_c(ctx, out_name, out, c_name, beta), ONNX)


def _add_c(ctx: Context, out_name: str, src: int, c_name: str | None, beta: float) -> int:
    if c_name is None:
        return src
    c = (
        ctx.input(c_name, ONNX)
        if not ctx.is_constant(c_name)
        else ctx.const(f"{out_name}__c", ctx.constant(c_name).astype(np.float32) * np.float32(beta))
    )
    if not ctx.is_constant(c_name) and beta != 1.0:
        scaled = ctx.new_tensor(f"{out_name}__bc", like=c_name)
        beta_t = ctx.const(f"{out_name}__beta", np.asarray([beta], dtype=np.float32))
        ctx.op(Op.MUL, [c, beta_t], [scaled], ("MulOptions", {"FusedActivationFunction": 0}))
        c = scaled
    out = ctx.new_tensor(out_name)
    ctx.op(Op.ADD, [src, c], [out], ("AddOptions", {"FusedActivationFunction": 0}))
    return out


def _batch_matmul(
    ctx: Context,
    node: onnx.NodeProto,
    a: int,
    b: int,
    adj_y: int,
    alpha: float,
    c_name: str | None,
    beta: float,
) -> None:
    out_name = node.output[0]
    last = alpha == 1.0 and c_name is None
    out = ctx.new_tensor(out_name if last else f"{out_name}__bmm", like=out_name)
    ctx.op(
        Op.BATCH_MATMUL, [a, b], [out], ("BatchMatMulOptions", {"AdjX": False, "AdjY": bool(adj_y)})
    )
    if alpha != 1.0:
        scaled = ctx.new_tensor(out_name if c_name is None else f"{out_name}__alpha", like=out_name)
        alpha_t = ctx.const(f"{out_name}__alpha", np.asarray([alpha], dtype=np.float32))
        ctx.op(Op.MUL, [out, alpha_t], [scaled], ("MulOptions", {"FusedActivationFunction": 0}))
        out = scaled
    ctx.output(out_name, _add_c(ctx, out_name, out, c_name, beta), ONNX)


def matmul(ctx: Context, node: onnx.NodeProto) -> None:
    a, b, out_name = node.input[0], node.input[1], node.output[0]
    rank_a = len(ctx.shape(a))
    if rank_a < 2 or len(ctx.shape(b)) < 2:
        raise UnsupportedAttributeError("MatMul", node.name, "rank-1 operands")
    src = ctx.input(a, ONNX)
    if ctx.is_constant(b) and ctx.constant(b).ndim == 2:
        out = ctx.new_tensor(out_name)
        _fully_connected(ctx, node, src, ctx.constant(b).T, None, out, keep_dims=rank_a > 2)
        ctx.output(out_name, out, ONNX)
        return
    _batch_matmul(ctx, node, src, ctx.input(b, ONNX), 0, 1.0, None, 1.0)


def _explicit_pads(
    node: onnx.NodeProto, in_hw: tuple[int, int], k_eff: tuple[int, int], strides: tuple[int, int]
) -> list[int]:
    """ONNX pads ``[top, left, bottom, right]`` after resolving ``auto_pad``."""
    a = attrs(node)
    auto = a.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("NOTSET", ""):
        return [int(p) for p in a.get("pads", [0, 0, 0, 0])]
    if auto == "VALID":
        return [0, 0, 0, 0]
    before, after = [], []
    for size, k, s in zip(in_hw, k_eff, strides, strict=True):
        small, big = _same_split(size, k, s)
        before.append(small if auto == "SAME_UPPER" else big)
        after.append(big if auto == "SAME_UPPER" else small)
    return [*before, *after]


def _same_split(size: int, k_eff: int, stride: int) -> tuple[int, int]:
    """TensorFlow SAME padding (before, after): output ceil(size / stride), extra after."""
    total = max((-(-size // stride) - 1) * stride + k_eff - size, 0)
    return total // 2, total - total // 2


def _spatial(
    ctx: Context,
    node: onnx.NodeProto,
    kernel: tuple[int, int],
    fill: float | None,
    same_ok: bool = True,
) -> tuple[int, dict[str, int]]:
    """Input tensor (NHWC, padded if needed) and the Padding/StrideH/StrideW options.

    ``fill`` is the value explicit padding uses (``None``: explicit padding is
    not expressible); ``same_ok`` says whether TFLite's SAME padding computes
    the same thing as padding with ``fill`` (not for inclusive average pooling).
    """
    a = attrs(node)
    x = node.input[0]
    _, _, h, w = ctx.shape(x)
    strides = tuple(a.get("strides", [1, 1]))
    dil = tuple(a.get("dilations", [1, 1]))
    k_eff = tuple((k - 1) * d + 1 for k, d in zip(kernel, dil, strict=True))
    pads = _explicit_pads(node, (h, w), k_eff, strides)  # type: ignore[arg-type]
    same = [_same_split(size, k, s) for size, k, s in zip((h, w), k_eff, strides, strict=True)]
    src = ctx.input(x, NHWC)
    is_same = [(pads[0], pads[2]), (pads[1], pads[3])] == same
    if not any(pads):
        mode, padded_hw = VALID, (h, w)
    elif is_same and same_ok:
        mode, padded_hw = SAME, (h, w)
    elif fill is None:
        raise UnsupportedAttributeError(
            node.op_type,
            node.name,
            f"pads {pads} with count_include_pad=0 (TFLite only excludes SAME padding)",
        )
    else:
        padded_hw = (h + pads[0] + pads[2], w + pads[1] + pads[3])
        shape = (ctx.shape(x)[0], ctx.shape(x)[1], *padded_hw)
        padded = ctx.new_tensor(f"{node.output[0]}__padded", NHWC, like=x, shape=shape)
        paddings = ctx.int32(
            f"{node.output[0]}__pads", [[0, 0], [pads[0], pads[2]], [pads[1], pads[3]], [0, 0]]
        )
        if fill == 0.0:
            ctx.op(Op.PAD, [src, paddings], [padded])
        else:
            value = ctx.const(f"{node.output[0]}__fill", np.asarray([fill], np.float32))
            ctx.op(Op.PADV2, [src, paddings, value], [padded])
        src, mode = padded, VALID
    expected = ctx.shape(node.output[0])[2:]
    got = tuple(
        -(-size // s) if mode == SAME else (size - k) // s + 1
        for size, k, s in zip(padded_hw, k_eff, strides, strict=False)
    )
    if got != tuple(expected):
        raise UnsupportedAttributeError(
            node.op_type,
            node.name,
            f"output size {tuple(expected)} (ceil_mode or pads) differs from TFLite's {got}",
        )
    return src, {"Padding": mode, "StrideH": int(strides[0]), "StrideW": int(strides[1])}


def conv(ctx: Context, node: onnx.NodeProto) -> None:
    out_name = node.output[0]
    if not ctx.is_constant(node.input[1]):
        raise UnsupportedAttributeError("Conv", node.name, "weights must be constants")
    w = ctx.constant(node.input[1]).astype(np.float32)
    if w.ndim != 4:
        raise UnsupportedAttributeError("Conv", node.name, f"{w.ndim - 2}-D convolution")
    m, cg, kh, kw = w.shape
    c = ctx.shape(node.input[0])[1]
    group = int(attrs(node).get("group", 1))
    has_bias = len(node.input) > 2 and bool(node.input[2])
    bias = ctx.constant(node.input[2]).astype(np.float32) if has_bias else np.zeros(m, np.float32)
    src, opts = _spatial(ctx, node, (kh, kw), fill=0.0)
    dh, dw = (int(d) for d in attrs(node).get("dilations", [1, 1]))
    opts.update(DilationHFactor=dh, DilationWFactor=dw, FusedActivationFunction=0)
    out = ctx.new_tensor(out_name, NHWC)
    if group == 1:
        ctx.op(
            Op.CONV_2D,
            [
                src,
                ctx.const(f"{out_name}__filter", w.transpose(0, 2, 3, 1)),
                ctx.const(f"{out_name}__bias", bias),
            ],
            [out],
            ("Conv2DOptions", opts),
        )
    elif group == c and cg == 1:
        ctx.op(
            Op.DEPTHWISE_CONV_2D,
            [
                src,
                ctx.const(f"{out_name}__filter", w.transpose(1, 2, 3, 0)),
                ctx.const(f"{out_name}__bias", bias),
            ],
            [out],
            ("DepthwiseConv2DOptions", {**opts, "DepthMultiplier": m // c}),
            version=2 if (dh, dw) != (1, 1) else 1,
        )
    else:
        _grouped_conv(ctx, node, src, w, bias, group, opts, out)
    ctx.output(out_name, out, NHWC)


def _grouped_conv(
    ctx: Context,
    node: onnx.NodeProto,
    src: int,
    w: np.ndarray,
    bias: np.ndarray,
    group: int,
    opts: dict[str, int],
    out: int,
) -> None:
    x, name = node.input[0], node.output[0]
    n, c, h, wd = ctx.shape(x)
    parts = [
        ctx.new_tensor(f"{name}__in{g}", NHWC, like=x, shape=(n, c // group, h, wd))
        for g in range(group)
    ]
    ctx.op(
        Op.SPLIT,
        [ctx.int32(f"{name}__axis", 3), src],
        parts,
        ("SplitOptions", {"NumSplits": group}),
    )
    mg = w.shape[0] // group
    on, _, oh, ow = ctx.shape(name)
    results = []
    for g, part in enumerate(parts):
        res = ctx.new_tensor(f"{name}__g{g}", NHWC, like=name, shape=(on, mg, oh, ow))
        wg = w[g * mg : (g + 1) * mg].transpose(0, 2, 3, 1)
        ctx.op(
            Op.CONV_2D,
            [
                part,
                ctx.const(f"{name}__filter{g}", wg),
                ctx.const(f"{name}__bias{g}", bias[g * mg : (g + 1) * mg]),
            ],
            [res],
            ("Conv2DOptions", opts),
        )
        results.append(res)
    ctx.op(
        Op.CONCATENATION,
        results,
        [out],
        ("ConcatenationOptions", {"Axis": 3, "FusedActivationFunction": 0}),
    )


def _pool(ctx: Context, node: onnx.NodeProto, code: int) -> None:
    a = attrs(node)
    if len(node.output) > 1 and node.output[1]:
        raise UnsupportedAttributeError(node.op_type, node.name, "the Indices output is used")
    if len(a["kernel_shape"]) != 2:
        raise UnsupportedAttributeError(node.op_type, node.name, "only 2-D pooling")
    if tuple(a.get("dilations", [1, 1])) != (1, 1):
        raise UnsupportedAttributeError(node.op_type, node.name, "dilated pooling")
    kh, kw = a["kernel_shape"]
    if code == Op.MAX_POOL_2D:
        src, opts = _spatial(ctx, node, (kh, kw), fill=_LOWEST)
    else:
        inclusive = bool(a.get("count_include_pad", 0))
        src, opts = _spatial(
            ctx, node, (kh, kw), fill=0.0 if inclusive else None, same_ok=not inclusive
        )
    opts.update(FilterHeight=int(kh), FilterWidth=int(kw), FusedActivationFunction=0)
    out = ctx.new_tensor(node.output[0], NHWC)
    ctx.op(code, [src], [out], ("Pool2DOptions", opts))
    ctx.output(node.output[0], out, NHWC)


def max_pool(ctx: Context, node: onnx.NodeProto) -> None:
    _pool(ctx, node, Op.MAX_POOL_2D)


def average_pool(ctx: Context, node: onnx.NodeProto) -> None:
    _pool(ctx, node, Op.AVERAGE_POOL_2D)


def _global_pool(ctx: Context, node: onnx.NodeProto, code: int) -> None:
    if len(ctx.shape(node.input[0])) != 4:
        raise UnsupportedAttributeError(node.op_type, node.name, "only 4-D inputs")
    src = ctx.input(node.input[0], NHWC)
    out = ctx.new_tensor(node.output[0], NHWC)
    axes = ctx.int32(f"{node.output[0]}__axes", [1, 2])
    ctx.op(code, [src, axes], [out], ("ReducerOptions", {"KeepDims": True}))
    ctx.output(node.output[0], out, NHWC)


def global_average_pool(ctx: Context, node: onnx.NodeProto) -> None:
    _global_pool(ctx, node, Op.MEAN)


def global_max_pool(ctx: Context, node: onnx.NodeProto) -> None:
    _global_pool(ctx, node, Op.REDUCE_MAX)


def batch_norm(ctx: Context, node: onnx.NodeProto) -> None:
    """Inference batch norm as ``x * scale + shift`` over the channel axis."""
    if len(node.output) > 1 and any(node.output[1:]):
        raise UnsupportedAttributeError("BatchNormalization", node.name, "training mode")
    if not all(ctx.is_constant(i) for i in node.input[1:5]):
        raise UnsupportedAttributeError("BatchNormalization", node.name, "non-constant stats")
    eps = float(attrs(node).get("epsilon", 1e-5))
    gamma, beta, mean, var = (ctx.constant(i).astype(np.float64) for i in node.input[1:5])
    scale = gamma / np.sqrt(var + eps)
    shift = beta - mean * scale
    x, name = node.input[0], node.output[0]
    rank = len(ctx.shape(x))
    layout = NHWC if rank == 4 else ONNX
    bshape = (-1,) if rank <= 2 or layout == NHWC else (-1,) + (1,) * (rank - 2)
    scaled = ctx.new_tensor(f"{name}__scaled", layout, like=name)
    ctx.op(
        Op.MUL,
        [ctx.input(x, layout), ctx.const(f"{name}__scale", scale.reshape(bshape))],
        [scaled],
        ("MulOptions", {"FusedActivationFunction": 0}),
    )
    out = ctx.new_tensor(name, layout)
    ctx.op(
        Op.ADD,
        [scaled, ctx.const(f"{name}__shift", shift.reshape(bshape))],
        [out],
        ("AddOptions", {"FusedActivationFunction": 0}),
    )
    ctx.output(name, out, layout)


NN_LOWERINGS: dict[str, Lowering] = {
    "Gemm": gemm, "MatMul": matmul, "Conv": conv,
    "MaxPool": max_pool, "AveragePool": average_pool,
    "GlobalAveragePool": global_average_pool, "GlobalMaxPool": global_max_pool,
    "BatchNormalization": batch_norm,
}  # fmt: skip
