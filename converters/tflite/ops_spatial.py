"""Lowerings of 1-D convolutions and pools, transposed convolutions and resizing.

* 1-D ``Conv`` / ``MaxPool`` / ``AveragePool`` / ``ConvTranspose``: the ``[N, C, L]``
  input is reshaped to ``[N, C, 1, L]`` and the 2-D lowering runs with a ``1 x k``
  kernel; the ``[N, M, 1, L']`` result is reshaped back.
* ``ConvTranspose`` (2-D, group 1, no dilation) -> ``TRANSPOSE_CONV`` with VALID
  padding, which yields the full ``(in - 1) * stride + kernel`` output; ONNX's pads
  (explicit, ``auto_pad`` or ``output_shape``) crop it with ``STRIDED_SLICE`` and
  ``output_padding`` beyond the crop is a zero ``PAD``; the bias is an ``ADD``.
* ``Resize`` / ``Upsample`` (4-D, spatial axes only) -> ``RESIZE_NEAREST_NEIGHBOR`` or
  ``RESIZE_BILINEAR`` for the coordinate / rounding combinations TFLite computes
  identically:

  ========================  =====================  ==================================
  ONNX mode                 coordinate transform   TFLite options
  ========================  =====================  ==================================
  nearest (floor)           asymmetric             none
  nearest (round_prefer_c.) half_pixel             HalfPixelCenters
  nearest (round_prefer_c.) align_corners          AlignCorners
  linear                    asymmetric             none
  linear                    half_pixel             HalfPixelCenters
  linear                    pytorch_half_pixel     HalfPixelCenters (outputs > 1)
  linear                    align_corners          AlignCorners
  ========================  =====================  ==================================

  When ``scales`` are given, each must equal ``output / input`` exactly (ONNX
  transforms coordinates with the given scale, TFLite with the size ratio). Other
  modes (cubic, antialias, crop-and-resize, ``axes``, aspect-ratio policies) are
  refused by name.
"""

from __future__ import annotations

import numpy as np
import onnx
import tflite
from onnx import helper

from converters.tflite.context import Context, Op, attrs
from converters.tflite.errors import UnsupportedAttributeError, UnsupportedShapeError
from converters.tflite.layout import NHWC, ONNX
from converters.tflite.ops import Lowering
from converters.tflite.ops_nn import average_pool, conv, max_pool

T = tflite.TensorType
_NO_ACT = {"FusedActivationFunction": 0}


# --- 1-D through 2-D --------------------------------------------------------------------


def _as_2d(ctx: Context, name: str, tag: str) -> str:
    """Register ``name`` ([N, C, L]) reshaped to [N, C, 1, L] as a new value; return it."""
    n, c, length = ctx.shape(name)
    dyn = ctx.graph.dynamic.get(name, (False,) * 3)
    new = f"{name}__{tag}2d"
    ctx.graph.shapes[new] = (n, c, 1, length)
    ctx.graph.dynamic[new] = (dyn[0], dyn[1], False, dyn[2])
    if new not in ctx.values:
        src = ctx.input(name, ONNX)
        out = ctx.reshape(
            src, new, ctx.graph.signature(new), (n, c, 1, length), ctx.graph.dynamic[new]
        )
        ctx.output(new, out, ONNX)
    return new


def _lift_attrs(node: onnx.NodeProto) -> dict:
    a = attrs(node)
    lifted: dict = {}
    for key, value in a.items():
        if key in ("kernel_shape", "strides", "dilations", "output_padding"):
            lifted[key] = [1 if key != "output_padding" else 0, *value]
        elif key == "pads":
            lifted[key] = [0, value[0], 0, value[1]]
        elif key == "output_shape":
            lifted[key] = [1, *value]
        else:
            lifted[key] = value
    return lifted


def _lifted(ctx: Context, node: onnx.NodeProto, lowering) -> None:
    """Run 2-D ``lowering`` on the 1-D ``node`` lifted to ``[N, C, 1, L]``."""
    x, out_name = node.input[0], node.output[0]
    x2 = _as_2d(ctx, x, "in")
    inputs = [x2]
    if node.op_type in ("Conv", "ConvTranspose"):
        w_name = node.input[1]
        w2 = f"{w_name}__2d"
        if w2 not in ctx.graph.constants:
            ctx.graph.constants[w2] = ctx.constant(w_name)[:, :, None, :]
        inputs.append(w2)
        inputs.extend(node.input[2:])
    n, m, length = ctx.shape(out_name)
    dyn = ctx.graph.dynamic.get(out_name, (False,) * 3)
    y2 = f"{out_name}__out2d"
    ctx.graph.shapes[y2] = (n, m, 1, length)
    ctx.graph.dynamic[y2] = (dyn[0], dyn[1], False, dyn[2])
    lifted = helper.make_node(node.op_type, inputs, [y2], name=node.name, **_lift_attrs(node))
    lowering(ctx, lifted)
    src = ctx.input(y2, ONNX)
    out = ctx.reshape(src, out_name, ctx.graph.signature(out_name), (n, m, length), dyn)
    ctx.output(out_name, out, ONNX)


def _weights_rank(ctx: Context, node: onnx.NodeProto) -> int:
    if not ctx.is_constant(node.input[1]):
        raise UnsupportedAttributeError(node.op_type, node.name, "weights must be constants")
    return int(ctx.constant(node.input[1]).ndim)


def conv_any(ctx: Context, node: onnx.NodeProto) -> None:
    """Conv: 1-D through 2-D, 2-D as :func:`converters.tflite.ops_nn.conv`."""
    if _weights_rank(ctx, node) == 3:
        _lifted(ctx, node, conv)
    else:
        conv(ctx, node)


def _pool_any(ctx: Context, node: onnx.NodeProto, lowering) -> None:
    if len(attrs(node).get("kernel_shape", [])) == 1 and len(ctx.shape(node.input[0])) == 3:
        _lifted(ctx, node, lowering)
    else:
        lowering(ctx, node)


def max_pool_any(ctx: Context, node: onnx.NodeProto) -> None:
    _pool_any(ctx, node, max_pool)


def average_pool_any(ctx: Context, node: onnx.NodeProto) -> None:
    _pool_any(ctx, node, average_pool)


# --- ConvTranspose ----------------------------------------------------------------------


def _int_tensor(ctx: Context, name: str, shape: tuple[int, ...]) -> int:
    return ctx.spec.add_tensor(name, shape, dtype=T.INT32)


def _transpose_pads(node: onnx.NodeProto, full: list[int], final: list[int], out_pad: list[int]):
    """Pads at the start of each spatial axis (ONNX's rules for each way of giving them)."""
    a = attrs(node)
    auto = a.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if "output_shape" not in a and auto in ("NOTSET", ""):
        pads = [int(p) for p in a.get("pads", [0] * 4)]
        return pads[:2]
    if auto == "VALID":
        return [0, 0]
    begins = []
    for f, o, p in zip(full, final, out_pad, strict=True):
        total = f + p - o
        if total < 0:
            raise UnsupportedAttributeError(
                "ConvTranspose", node.name, "an output_shape larger than the full output"
            )
        begins.append(total // 2 if auto == "SAME_UPPER" else total - total // 2)
    return begins


def conv_transpose(ctx: Context, node: onnx.NodeProto) -> None:
    """ConvTranspose -> TRANSPOSE_CONV (VALID) + crop + ADD bias (see the module doc)."""
    rank = _weights_rank(ctx, node)
    if rank == 3:
        _lifted(ctx, node, conv_transpose)
        return
    if rank != 4:
        raise UnsupportedAttributeError("ConvTranspose", node.name, f"{rank - 2}-D")
    a = attrs(node)
    if int(a.get("group", 1)) != 1:
        raise UnsupportedAttributeError("ConvTranspose", node.name, "grouped (group > 1)")
    if any(int(d) != 1 for d in a.get("dilations", [1, 1])):
        raise UnsupportedAttributeError("ConvTranspose", node.name, "dilations")
    x, out_name = node.input[0], node.output[0]
    w = ctx.constant(node.input[1]).astype(np.float32)  # [C, M, kh, kw]
    c, m, kh, kw = w.shape
    n, _, h, wd = ctx.shape(x)
    _, m_out, oh, ow = ctx.shape(out_name)
    sh, sw = (int(s) for s in a.get("strides", [1, 1]))
    out_pad = [int(p) for p in a.get("output_padding", [0, 0])]
    full = [(h - 1) * sh + kh, (wd - 1) * sw + kw]
    begins = _transpose_pads(node, full, [oh, ow], out_pad)
    dyn = ctx.graph.dynamic.get(x, (False,) * 4)
    if any(dyn[1:]):
        raise UnsupportedShapeError(f"ConvTranspose node {node.name!r}: dynamic spatial size")
    src = ctx.input(x, NHWC)
    full_shape = (n, m, full[0], full[1])
    full_t = ctx.new_tensor(f"{out_name}__full", NHWC, like=out_name, shape=full_shape)
    rest = [full[0], full[1], m]
    if dyn[0]:
        shp = _int_tensor(ctx, f"{out_name}__inshape", (4,))
        ctx.op(Op.SHAPE, [src], [shp], ("ShapeOptions", {"OutType": T.INT32}))
        batch = _int_tensor(ctx, f"{out_name}__batch", (1,))
        ctx.op(
            Op.STRIDED_SLICE,
            [shp, ctx.int32(f"{out_name}__b0", [0]), ctx.int32(f"{out_name}__b1", [1]),
             ctx.int32(f"{out_name}__b2", [1])],
            [batch],
            ("StridedSliceOptions", {"BeginMask": 0, "EndMask": 0}),
        )  # fmt: skip
        out_shape = _int_tensor(ctx, f"{out_name}__outshape", (4,))
        ctx.op(
            Op.CONCATENATION,
            [batch, ctx.int32(f"{out_name}__rest", rest)],
            [out_shape],
            ("ConcatenationOptions", {"Axis": 0, "FusedActivationFunction": 0}),
        )
    else:
        out_shape = ctx.int32(f"{out_name}__outshape", [n, *rest])
    filt = ctx.const(f"{out_name}__filter", np.ascontiguousarray(w.transpose(1, 2, 3, 0)))
    ctx.op(
        Op.TRANSPOSE_CONV,
        [out_shape, filt, src],
        [full_t],
        ("TransposeConvOptions", {"Padding": 1, "StrideH": sh, "StrideW": sw}),
    )
    cur = full_t
    keep = [min(f - b, o) for f, b, o in zip(full, begins, (oh, ow), strict=True)]
    if begins != [0, 0] or keep != full:
        cropped = ctx.new_tensor(
            f"{out_name}__crop", NHWC, like=out_name, shape=(n, m, keep[0], keep[1])
        )
        ctx.op(
            Op.STRIDED_SLICE,
            [cur, ctx.int32(f"{out_name}__cb", [0, begins[0], begins[1], 0]),
             ctx.int32(f"{out_name}__ce", [0, begins[0] + keep[0], begins[1] + keep[1], 0]),
             ctx.int32(f"{out_name}__cs", [1, 1, 1, 1])],
            [cropped],
            ("StridedSliceOptions", {"BeginMask": 0b1001, "EndMask": 0b1001}),
        )  # fmt: skip
        cur = cropped
    if keep != [oh, ow]:
        padded = ctx.new_tensor(f"{out_name}__opad", NHWC, like=out_name)
        pads = [[0, 0], [0, oh - keep[0]], [0, ow - keep[1]], [0, 0]]
        ctx.op(Op.PAD, [cur, ctx.int32(f"{out_name}__pads", pads)], [padded])
        cur = padded
    if len(node.input) > 2 and node.input[2]:
        bias = ctx.constant(node.input[2]).astype(np.float32)
        out = ctx.new_tensor(out_name, NHWC)
        ctx.op(Op.ADD, [cur, ctx.const(f"{out_name}__bias", bias)], [out], ("AddOptions", _NO_ACT))
        cur = out
    del m_out
    ctx.output(out_name, cur, NHWC)


# --- Resize / Upsample ------------------------------------------------------------------


def _text(value, default: str) -> str:
    if value is None:
        return default
    return value.decode() if isinstance(value, bytes) else str(value)


def _resize_scales(ctx: Context, node: onnx.NodeProto) -> np.ndarray | None:
    """The ``scales`` the node gives (None when it gives ``sizes``)."""
    a = attrs(node)
    if node.op_type == "Upsample" and "scales" in a:
        return np.asarray(a["scales"], dtype=np.float64)
    pos = 1 if node.op_type == "Upsample" or ctx.graph.opset < 11 else 2
    if len(node.input) > pos and node.input[pos]:
        name = node.input[pos]
        if not ctx.is_constant(name):
            raise UnsupportedAttributeError(node.op_type, node.name, "scales must be constants")
        arr = ctx.constant(name)
        if arr.size:
            return arr.astype(np.float64).reshape(-1)
    if node.op_type == "Resize" and len(node.input) > 3 and node.input[3]:
        if not ctx.is_constant(node.input[3]):
            raise UnsupportedAttributeError(node.op_type, node.name, "sizes must be constants")
        return None
    raise UnsupportedAttributeError(node.op_type, node.name, "neither scales nor sizes given")


def _resize_options(ctx: Context, node: onnx.NodeProto, in_hw, out_hw) -> tuple[int, bool, bool]:
    """(TFLite op, AlignCorners, HalfPixelCenters) computing what ONNX computes, or refuse."""
    a = attrs(node)
    mode = _text(a.get("mode"), "nearest")
    resize11 = node.op_type == "Resize" and ctx.graph.opset >= 11
    ctm = _text(a.get("coordinate_transformation_mode"), "half_pixel" if resize11 else "asymmetric")
    nearest = _text(a.get("nearest_mode"), "round_prefer_floor" if resize11 else "floor")
    if node.op_type == "Upsample" or (node.op_type == "Resize" and ctx.graph.opset < 11):
        nearest = "floor"  # Upsample and Resize-10 pick floor(x / scale)

    def refuse(detail: str):
        return UnsupportedAttributeError(node.op_type, node.name, detail)

    if int(a.get("antialias", 0)):
        raise refuse("antialias")
    if "axes" in a:
        raise refuse("the axes attribute")
    if _text(a.get("keep_aspect_ratio_policy"), "stretch") != "stretch":
        raise refuse("keep_aspect_ratio_policy other than stretch")
    if ctm == "pytorch_half_pixel" and min(out_hw) > 1:
        ctm = "half_pixel"
    integer_up = all(o % i == 0 for i, o in zip(in_hw, out_hw, strict=True))
    if mode == "nearest" and ctm == "half_pixel" and nearest == "round_prefer_floor" and integer_up:
        nearest = "round_prefer_ceil"  # (2x + 1) / 2s is never a tie for an integer factor s
    if mode == "nearest":
        combos = {("asymmetric", "floor"): (False, False), ("half_pixel", "round_prefer_ceil"):
                  (False, True), ("align_corners", "round_prefer_ceil"): (True, False)}  # fmt: skip
        key = (ctm, nearest)
        code = Op.RESIZE_NEAREST_NEIGHBOR
    elif mode in ("linear", "bilinear"):
        combos = {("asymmetric", ""): (False, False), ("half_pixel", ""): (False, True),
                  ("align_corners", ""): (True, False)}  # fmt: skip
        key = (ctm, "")
        code = Op.RESIZE_BILINEAR
    else:
        raise refuse(f"mode {mode!r}")
    if key not in combos:
        raise refuse(f"mode {mode!r} with coordinate_transformation_mode {ctm!r}"
                     + (f" and nearest_mode {nearest!r}" if mode == "nearest" else ""))  # fmt: skip
    align, half = combos[key]
    if align and min(out_hw) <= 1:
        raise refuse("align_corners to a size-1 output")
    return code, align, half


def resize(ctx: Context, node: onnx.NodeProto) -> None:
    """Resize / Upsample over H and W of a 4-D tensor (see the module doc)."""
    x, out_name = node.input[0], node.output[0]
    in_shape, out_shape = ctx.shape(x), ctx.shape(out_name)
    if len(in_shape) != 4:
        raise UnsupportedAttributeError(node.op_type, node.name, f"a rank-{len(in_shape)} input")
    in_dyn = ctx.graph.dynamic.get(x, (False,) * 4)
    out_dyn = ctx.graph.dynamic.get(out_name, (False,) * 4)
    if tuple(in_shape[:2]) != tuple(out_shape[:2]) or in_dyn[:2] != out_dyn[:2]:
        raise UnsupportedAttributeError(
            node.op_type, node.name, "resizing the N or C axis (sizes fix the batch size)"
        )
    scales = _resize_scales(ctx, node)
    in_hw, out_hw = in_shape[2:], out_shape[2:]
    if scales is not None:
        if len(scales) != 4 or scales[0] != 1.0 or scales[1] != 1.0:
            raise UnsupportedAttributeError(node.op_type, node.name, f"scales {list(scales)}")
        for s, i, o in zip(scales[2:], in_hw, out_hw, strict=True):
            if abs(float(np.float32(s)) - o / i) > 1e-6 * max(1.0, o / i):
                raise UnsupportedAttributeError(
                    node.op_type,
                    node.name,
                    f"scale {s} differs from output/input {o}/{i} "
                    "(TFLite resizes by the size ratio)",
                )
    code, align, half = _resize_options(ctx, node, in_hw, out_hw)
    table = "ResizeNearestNeighborOptions" if code == Op.RESIZE_NEAREST_NEIGHBOR else (
        "ResizeBilinearOptions")  # fmt: skip
    out = ctx.new_tensor(out_name, NHWC)
    ctx.op(
        code,
        [ctx.input(x, NHWC), ctx.int32(f"{out_name}__size", [int(v) for v in out_hw])],
        [out],
        (table, {"AlignCorners": align, "HalfPixelCenters": half}),
        version=3 if half else (2 if align else 1),
    )
    ctx.output(out_name, out, NHWC)


SPATIAL_LOWERINGS: dict[str, Lowering] = {
    "Conv": conv_any, "MaxPool": max_pool_any, "AveragePool": average_pool_any,
    "ConvTranspose": conv_transpose, "Resize": resize, "Upsample": resize,
}  # fmt: skip
