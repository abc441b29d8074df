"""Lowerings of the operators transformers and their exporters use.

* ``LayerNormalization`` -> ``MEAN``, ``SUB``, ``MUL``, ``MEAN``, ``ADD`` (epsilon),
  ``RSQRT``, ``MUL`` and the affine ``MUL``/``ADD``, in ONNX layout over the trailing
  axes from ``axis``; its decomposed form (``ReduceMean``/``Sub``/``Pow``/``Sqrt``/
  ``Div``) lowers operator by operator.
* ``Erf`` -> Abramowitz-Stegun 7.1.26 (``|error| <= 1.5e-7``) from ``ABS``, ``MUL``,
  ``ADD``, ``DIV``, ``EXP`` and ``SIGN``. The exact GELU that torch writes at opset
  18 (``x * 0.5 * (1 + erf(x / sqrt(2)))``) is first fused into one ``Gelu`` node
  (:func:`fuse_erf_gelu`), which becomes TFLite's ``GELU``.
* ``Pow`` -> ``MUL`` (exponent 2), ``SQRT`` (exponent 0.5), else ``POW``;
  ``Sqrt`` -> ``SQRT``; ``Reciprocal`` -> ``DIV(1, x)``.
* ``Split`` -> ``SPLIT`` (equal parts) or ``SPLIT_V``; ``Slice`` -> ``STRIDED_SLICE``
  (constant starts/ends/axes/steps, any step sign); ``Gather`` of an activation at
  constant indices -> ``GATHER``; ``Expand`` -> ``BROADCAST_TO`` (static shapes) or
  ``ADD`` of zeros (a batch-dependent output).
* ``ReduceMin`` / ``ReduceProd`` join the reductions of :mod:`.ops` (any axes).

Every lowering reads the stored layout of its input (ONNX or the internal NHWC of a
4-D activation, see :mod:`.layout`) and maps axes into it, as ``Softmax`` does;
what it cannot express it refuses by name.
"""

from __future__ import annotations

import numpy as np
import onnx
import tflite
from onnx import helper

from converters.tflite.context import Context, Op, attrs
from converters.tflite.errors import UnsupportedAttributeError, UnsupportedShapeError
from converters.tflite.graph import OnnxGraph
from converters.tflite.layout import NHWC, ONNX, nhwc_axis, stored_shape
from converters.tflite.ops import Lowering, _shared_layout

T = tflite.TensorType

# Abramowitz & Stegun 7.1.26.
_ERF_P = 0.3275911
_ERF_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)

_NO_ACT = {"FusedActivationFunction": 0}


def _float_const(ctx: Context, name: str, layout: str | None) -> int:
    """A constant operand as float32 (integer exponents, float64 scales)."""
    arr = ctx.constant(name)
    if arr.dtype.kind not in "fiub":
        raise UnsupportedAttributeError("constant", name, f"dtype {arr.dtype}")
    key = (name, f"f32:{layout}")
    if key not in ctx._cache:
        from converters.tflite.layout import constant_for

        value = arr.astype(np.float32)
        ctx._cache[key] = ctx.const(name, constant_for(value, layout or ONNX))
    return ctx._cache[key]


def _operand(ctx: Context, name: str, layout: str) -> int:
    return _float_const(ctx, name, layout) if ctx.is_constant(name) else ctx.input(name, layout)


def _scalar(ctx: Context, tag: str, value: float) -> int:
    return ctx.const(tag, np.asarray([value], dtype=np.float32))


class _Chain:
    """Intermediate tensors of one lowered node, all shaped like one ONNX value."""

    def __init__(self, ctx: Context, out_name: str, like: str, layout: str) -> None:
        self.ctx, self.out_name, self.like, self.layout = ctx, out_name, like, layout
        self.count = 0

    def tensor(self, shape: tuple[int, ...] | None = None, dyn: tuple[bool, ...] | None = None):
        self.count += 1
        return self.ctx.new_tensor(
            f"{self.out_name}__t{self.count}", self.layout, like=self.like, shape=shape, dynamic=dyn
        )

    def op(self, code: int, ins: list[int], options=None, out: int | None = None, **kw) -> int:
        res = self.tensor(**kw) if out is None else out
        self.ctx.op(code, ins, [res], options)
        return res

    def const(self, value: float) -> int:
        self.count += 1
        return _scalar(self.ctx, f"{self.out_name}__c{self.count}", value)


# --- elementwise ------------------------------------------------------------------------


def _unary(ctx: Context, node: onnx.NodeProto, code: int, options=None) -> None:
    name = node.input[0]
    layout = ctx.layout_of(name) or ONNX
    out = ctx.new_tensor(node.output[0], layout)
    ctx.op(code, [ctx.input(name, layout)], [out], options)
    ctx.output(node.output[0], out, layout)


def sqrt(ctx: Context, node: onnx.NodeProto) -> None:
    _unary(ctx, node, Op.SQRT)


def reciprocal(ctx: Context, node: onnx.NodeProto) -> None:
    name, out_name = node.input[0], node.output[0]
    layout = ctx.layout_of(name) or ONNX
    out = ctx.new_tensor(out_name, layout)
    one = _scalar(ctx, f"{out_name}__one", 1.0)
    ctx.op(Op.DIV, [one, ctx.input(name, layout)], [out], ("DivOptions", _NO_ACT))
    ctx.output(out_name, out, layout)


def power(ctx: Context, node: onnx.NodeProto) -> None:
    """Pow: MUL for a constant exponent 2, SQRT for 0.5, else POW (float32 exponent)."""
    base, exp, out_name = node.input[0], node.input[1], node.output[0]
    if ctx.is_constant(base):
        raise UnsupportedAttributeError("Pow", node.name, "a constant base")
    if ctx.is_constant(exp):
        e = ctx.constant(exp)
        if e.size == 1 and len(ctx.shape(out_name)) == len(ctx.shape(base)):
            value = float(e.reshape(-1)[0])
            layout = ctx.layout_of(base) or ONNX
            if value in (2.0, 0.5):
                src = ctx.input(base, layout)
                out = ctx.new_tensor(out_name, layout)
                if value == 2.0:
                    ctx.op(Op.MUL, [src, src], [out], ("MulOptions", _NO_ACT))
                else:
                    ctx.op(Op.SQRT, [src], [out])
                ctx.output(out_name, out, layout)
                return
    names = [base, exp]
    layout = _shared_layout(ctx, node, names)
    ins = [_operand(ctx, n, layout) for n in names]
    out = ctx.new_tensor(out_name, layout)
    ctx.op(Op.POW, ins, [out])
    ctx.output(out_name, out, layout)


def erf(ctx: Context, node: onnx.NodeProto) -> None:
    """erf(x) = sign(x) * (1 - t * poly(t) * exp(-x^2)), t = 1 / (1 + p|x|)."""
    name, out_name = node.input[0], node.output[0]
    layout = ctx.layout_of(name) or ONNX
    x = ctx.input(name, layout)
    c = _Chain(ctx, out_name, out_name, layout)
    mul, add = ("MulOptions", _NO_ACT), ("AddOptions", _NO_ACT)
    ax = c.op(Op.ABS, [x])
    px = c.op(Op.MUL, [ax, c.const(_ERF_P)], mul)
    den = c.op(Op.ADD, [px, c.const(1.0)], add)
    t = c.op(Op.DIV, [c.const(1.0), den], ("DivOptions", _NO_ACT))
    poly = c.op(Op.MUL, [t, c.const(_ERF_A[4])], mul)
    for a in reversed(_ERF_A[:4]):
        poly = c.op(Op.ADD, [poly, c.const(a)], add)
        poly = c.op(Op.MUL, [poly, t], mul)
    sq = c.op(Op.MUL, [x, x], mul)
    neg = c.op(Op.MUL, [sq, c.const(-1.0)], mul)
    ex = c.op(Op.EXP, [neg])
    tail = c.op(Op.MUL, [poly, ex], mul)
    mag = c.op(Op.SUB, [c.const(1.0), tail], ("SubOptions", _NO_ACT))
    sign = c.op(Op.SIGN, [x])
    out = ctx.new_tensor(out_name, layout)
    c.op(Op.MUL, [sign, mag], mul, out=out)
    ctx.output(out_name, out, layout)


# --- LayerNormalization -----------------------------------------------------------------


def layer_norm(ctx: Context, node: onnx.NodeProto) -> None:
    """LayerNormalization over axes ``axis..rank-1``, in ONNX layout."""
    a = attrs(node)
    x, out_name = node.input[0], node.output[0]
    shape = ctx.shape(x)
    rank = len(shape)
    axis = int(a.get("axis", -1))
    if not -rank <= axis < rank:
        raise UnsupportedAttributeError("LayerNormalization", node.name, f"axis {axis}")
    axis %= rank
    eps = float(a.get("epsilon", 1e-5))
    axes = list(range(axis, rank))
    dyn = ctx.graph.dynamic.get(x, (False,) * rank)
    if any(dyn[i] for i in axes):
        raise UnsupportedShapeError(
            f"LayerNormalization node {node.name!r} normalises over the batch axis; "
            "export with a fixed batch size"
        )
    red_shape = tuple(1 if i in axes else s for i, s in enumerate(shape))
    c = _Chain(ctx, out_name, x, ONNX)
    src = ctx.input(x, ONNX)
    axes_t = ctx.int32(f"{out_name}__axes", axes)
    keep = ("ReducerOptions", {"KeepDims": True})
    mul, add = ("MulOptions", _NO_ACT), ("AddOptions", _NO_ACT)
    mean = c.op(Op.MEAN, [src, axes_t], keep, shape=red_shape, dyn=dyn)
    d = c.op(Op.SUB, [src, mean], ("SubOptions", _NO_ACT))
    sq = c.op(Op.MUL, [d, d], mul)
    var = c.op(Op.MEAN, [sq, axes_t], keep, shape=red_shape, dyn=dyn)
    ve = c.op(Op.ADD, [var, c.const(eps)], add, shape=red_shape, dyn=dyn)
    extra = list(node.output[1:]) + ["", ""]
    mean_out = (
        ctx.new_tensor(extra[0], ONNX, like=x, shape=red_shape, dynamic=dyn) if extra[0] else None
    )
    if mean_out is not None:
        ctx.op(Op.MEAN, [src, axes_t], [mean_out], keep)
        ctx.output(extra[0], mean_out, ONNX)
    inv_out = (
        ctx.new_tensor(extra[1], ONNX, like=x, shape=red_shape, dynamic=dyn) if extra[1] else None
    )
    inv = c.op(Op.RSQRT, [ve], out=inv_out, shape=red_shape, dyn=dyn)
    if inv_out is not None:
        ctx.output(extra[1], inv_out, ONNX)
    has_bias = len(node.input) > 2 and bool(node.input[2])
    y = c.op(Op.MUL, [d, inv], mul)
    out = ctx.new_tensor(out_name, ONNX)
    scale = _operand(ctx, node.input[1], ONNX)
    y = c.op(Op.MUL, [y, scale], mul, out=None if has_bias else out)
    if has_bias:
        c.op(Op.ADD, [y, _operand(ctx, node.input[2], ONNX)], add, out=out)
    ctx.output(out_name, out, ONNX)


# --- shape operators --------------------------------------------------------------------


def _stored(ctx: Context, name: str) -> tuple[str, int]:
    """(layout, rank) in which activation ``name`` is read without a transpose."""
    rank = len(ctx.shape(name))
    layout = ctx.layout_of(name) or ONNX
    return (layout if rank == 4 else ONNX), rank


def _axis_in(layout: str, axis: int) -> int:
    return nhwc_axis(axis) if layout == NHWC else axis


def split(ctx: Context, node: onnx.NodeProto) -> None:
    """Split: part sizes from the inferred output shapes; SPLIT if equal, else SPLIT_V."""
    name = node.input[0]
    layout, rank = _stored(ctx, name)
    axis = int(attrs(node).get("axis", 0)) % rank
    if ctx.graph.dynamic.get(name, (False,) * rank)[axis]:
        raise UnsupportedShapeError(
            f"Split node {node.name!r} splits the batch axis; export with a fixed batch size"
        )
    outs = [o for o in node.output]
    if any(not o for o in outs):
        raise UnsupportedAttributeError("Split", node.name, "an unnamed output")
    sizes = [ctx.shape(o)[axis] for o in outs]
    where = _axis_in(layout, axis)
    tensors = [ctx.new_tensor(o, layout) for o in outs]
    src = ctx.input(name, layout)
    if len(set(sizes)) == 1:
        ctx.op(
            Op.SPLIT,
            [ctx.int32(f"{outs[0]}__axis", where), src],
            tensors,
            ("SplitOptions", {"NumSplits": len(outs)}),
        )
    else:
        ctx.op(
            Op.SPLIT_V,
            [src, ctx.int32(f"{outs[0]}__sizes", sizes), ctx.int32(f"{outs[0]}__axis", where)],
            tensors,
            ("SplitVOptions", {"NumSplits": len(outs)}),
        )
    for o, t in zip(outs, tensors, strict=True):
        ctx.output(o, t, layout)


def _slice_params(ctx: Context, node: onnx.NodeProto, rank: int) -> list[tuple[int, int, int]]:
    """Per ONNX axis (start, end, step) with ONNX's (Python's) clamping."""
    a = attrs(node)
    if ctx.graph.opset < 10:
        starts, ends = list(a["starts"]), list(a["ends"])
        axes = list(a.get("axes", range(len(starts))))
        steps = [1] * len(starts)
    else:
        vals: list[list[int] | None] = []
        for pos in range(1, 5):
            if len(node.input) > pos and node.input[pos]:
                if not ctx.is_constant(node.input[pos]):
                    raise UnsupportedAttributeError(
                        "Slice", node.name, "starts/ends/axes/steps must be constants"
                    )
                vals.append([int(v) for v in ctx.constant(node.input[pos]).reshape(-1)])
            else:
                vals.append(None)
        starts, ends = vals[0] or [], vals[1] or []
        axes = vals[2] if vals[2] is not None else list(range(len(starts)))
        steps = vals[3] if vals[3] is not None else [1] * len(starts)
    full = [(0, 0, 1)] * rank
    touched = [False] * rank
    for s, e, ax, st in zip(starts, ends, axes, steps, strict=True):
        if st == 0:
            raise UnsupportedAttributeError("Slice", node.name, "step 0")
        full[ax % rank] = (s, e, st)
        touched[ax % rank] = True
    return [p if t else (0, 1 << 62, 1) for p, t in zip(full, touched, strict=True)]


def slice_(ctx: Context, node: onnx.NodeProto) -> None:
    """Slice with constant parameters -> STRIDED_SLICE (in the input's stored layout)."""
    name, out_name = node.input[0], node.output[0]
    layout, rank = _stored(ctx, name)
    shape = ctx.shape(name)
    dyn = ctx.graph.dynamic.get(name, (False,) * rank)
    begin, end, strides = [0] * rank, [0] * rank, [1] * rank
    begin_mask = end_mask = 0
    for ax, (s, e, st) in enumerate(_slice_params(ctx, node, rank)):
        picked = range(shape[ax])[slice(s, e, st)]
        where = _axis_in(layout, ax)
        if len(picked) == shape[ax] and st == 1:
            begin_mask |= 1 << where
            end_mask |= 1 << where
            continue
        if dyn[ax]:
            raise UnsupportedShapeError(
                f"Slice node {node.name!r} slices the batch axis; export with a fixed batch size"
            )
        begin[where], strides[where] = picked[0], st
        stop = picked[-1] + st
        if stop < 0:
            end_mask |= 1 << where
        else:
            end[where] = stop
    out = ctx.new_tensor(out_name, layout)
    ctx.op(
        Op.STRIDED_SLICE,
        [
            ctx.input(name, layout),
            ctx.int32(f"{out_name}__begin", begin),
            ctx.int32(f"{out_name}__end", end),
            ctx.int32(f"{out_name}__strides", strides),
        ],
        [out],
        (
            "StridedSliceOptions",
            {"BeginMask": begin_mask, "EndMask": end_mask, "ShrinkAxisMask": 0},
        ),
    )
    ctx.output(out_name, out, layout)


def gather(ctx: Context, node: onnx.NodeProto) -> None:
    """Gather of an activation at constant indices -> GATHER (ONNX layout)."""
    data, idx, out_name = node.input[0], node.input[1], node.output[0]
    if ctx.is_constant(data) or not ctx.is_constant(idx):
        raise UnsupportedAttributeError(
            "Gather", node.name, "only an activation gathered at constant indices"
        )
    shape = ctx.shape(data)
    rank = len(shape)
    axis = int(attrs(node).get("axis", 0)) % rank
    if ctx.graph.dynamic.get(data, (False,) * rank)[axis]:
        raise UnsupportedShapeError(
            f"Gather node {node.name!r} gathers along the batch axis; export with a fixed batch"
        )
    indices = ctx.constant(idx).astype(np.int64)
    if indices.size and ((indices < -shape[axis]).any() or (indices >= shape[axis]).any()):
        raise UnsupportedAttributeError("Gather", node.name, "indices out of range")
    indices = np.where(indices < 0, indices + shape[axis], indices).astype(np.int32)
    out = ctx.new_tensor(out_name, ONNX)
    ctx.op(
        Op.GATHER,
        [ctx.input(data, ONNX), ctx.spec.add_constant(f"{out_name}__indices", indices)],
        [out],
        ("GatherOptions", {"Axis": axis, "BatchDims": 0}),
    )
    ctx.output(out_name, out, ONNX)


def expand(ctx: Context, node: onnx.NodeProto) -> None:
    """Expand -> BROADCAST_TO; ADD of zeros when the output follows the batch size."""
    name, out_name = node.input[0], node.output[0]
    shape = ctx.shape(out_name)
    dyn = ctx.graph.dynamic.get(out_name, (False,) * len(shape))
    src_rank = len(ctx.shape(name))
    layout = ctx.layout_of(name) or ONNX
    if not (layout == NHWC and src_rank == 4 and len(shape) == 4):
        layout = ONNX
    out = ctx.new_tensor(out_name, layout)
    src = ctx.input(name, layout)
    if not any(dyn):
        target = [int(v) for v in stored_shape(shape, layout)]
        ctx.op(Op.BROADCAST_TO, [src, ctx.int32(f"{out_name}__shape", target)], [out], version=2)
    else:
        zeros_shape = tuple(1 if d else s for s, d in zip(shape, dyn, strict=True))
        zeros = np.zeros(stored_shape(zeros_shape, layout), dtype=np.float32)
        ctx.op(
            Op.ADD,
            [src, ctx.const(f"{out_name}__zeros", zeros)],
            [out],
            ("AddOptions", _NO_ACT),
        )
    ctx.output(out_name, out, layout)


# --- graph rewrite: the Erf form of GELU -------------------------------------------------


def _const_value(graph: OnnxGraph, name: str) -> float | None:
    arr = graph.constants.get(name)
    if arr is None or arr.size != 1 or arr.dtype.kind != "f":
        return None
    return float(arr.reshape(-1)[0])


def _other(node: onnx.NodeProto, name: str) -> str | None:
    ins = list(node.input)
    if len(ins) != 2 or name not in ins:
        return None
    return ins[1] if ins[0] == name else ins[0]


def fuse_erf_gelu(graph: OnnxGraph) -> int:
    """Replace ``Mul(Mul(x, Add(Erf(Div(x, sqrt2)), 1)), 0.5)`` (and its orderings) by
    one ``Gelu`` node, in place. Returns how many were fused."""
    producers = {o: n for n in graph.nodes for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.nodes:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def only(name: str) -> onnx.NodeProto | None:
        users = consumers.get(name, [])
        return users[0] if len(users) == 1 and name not in graph.outputs else None

    removed: set[int] = set()
    replaced: dict[int, onnx.NodeProto] = {}
    fused = 0
    for e in graph.nodes:
        if e.op_type != "Erf" or id(e) in removed:
            continue
        scale = producers.get(e.input[0])
        if scale is None or scale.op_type not in ("Div", "Mul") or only(scale.output[0]) is not e:
            continue
        x = scale.input[0]
        k = _const_value(graph, scale.input[1])
        if k is None or x in graph.constants:
            continue
        ok = abs(k - np.sqrt(2.0)) < 1e-4 if scale.op_type == "Div" else abs(k - 0.5**0.5) < 1e-4
        add = only(e.output[0])
        if not ok or add is None or add.op_type != "Add":
            continue
        if _const_value(graph, _other(add, e.output[0]) or "") != 1.0:
            continue
        m1 = only(add.output[0])
        if m1 is None or m1.op_type != "Mul":
            continue
        other = _other(m1, add.output[0])
        half_first = None
        if other == x:
            m2 = only(m1.output[0])
            if m2 is None or m2.op_type != "Mul":
                continue
            if _const_value(graph, _other(m2, m1.output[0]) or "") != 0.5:
                continue
            last = m2
        else:  # (x * 0.5) * (1 + erf)
            half_first = producers.get(other or "")
            if (
                half_first is None
                or half_first.op_type != "Mul"
                or only(half_first.output[0]) is not m1
                or _other(half_first, x) is None
                or _const_value(graph, _other(half_first, x) or "") != 0.5
            ):
                continue
            last = m1
        gelu = helper.make_node("Gelu", [x], [last.output[0]], name=f"{e.name or 'erf'}__gelu")
        chain = [scale, e, add, m1] + ([half_first] if half_first is not None else [last])
        for n in chain:
            removed.add(id(n))
        removed.discard(id(last))
        replaced[id(last)] = gelu
        fused += 1
    graph.nodes = [replaced.get(id(n), n) for n in graph.nodes if id(n) not in removed]
    return fused


TRANSFORMER_LOWERINGS: dict[str, Lowering] = {
    "LayerNormalization": layer_norm, "Erf": erf, "Pow": power, "Sqrt": sqrt,
    "Reciprocal": reciprocal, "Split": split, "Slice": slice_, "Gather": gather,
    "Expand": expand,
}  # fmt: skip
