"""``LSTM`` and ``GRU``, unrolled over time into TFLite builtins.

Each time step is ``FULLY_CONNECTED`` of the input and of the hidden state (weights
as ONNX stores them, ``[gates * H, I]``), ``SPLIT`` into gates, ``LOGISTIC`` /
``TANH``, and the cell arithmetic in ``MUL`` / ``ADD`` / ``SUB``; the input sequence is
``SPLIT`` into steps first and the per-step outputs are ``CONCATENATION``-ed into ``Y``.
Directions ``forward``, ``reverse`` and ``bidirectional``; ``layout`` 0 (``[T, N, I]``,
what torch exports, also for ``batch_first`` modules); the batch may be dynamic.

Length limit: a sequence is unrolled step by step, so ``T`` must be static and at most
:data:`MAX_STEPS` (the file grows by about 15 operators per step and direction).
Refused by name: longer or dynamic sequences, ``sequence_lens`` other than all ``T``,
non-default activations, ``clip``, ``input_forget``, peepholes, non-zero or
non-constant initial states.

GRU follows ONNX's ``linear_before_reset``: 1 (torch's export) applies the reset gate
to ``R_h h + Rb_h``; 0 to ``h`` before ``R_h``.
"""

from __future__ import annotations

import numpy as np
import onnx

from converters.tflite.context import Context, Op, attrs
from converters.tflite.errors import UnsupportedAttributeError, UnsupportedShapeError
from converters.tflite.layout import ONNX
from converters.tflite.ops import Lowering

#: Longest sequence unrolled.
MAX_STEPS = 128

_NO_ACT = {"FusedActivationFunction": 0}


class _Cell:
    """Tensor factory for one recurrent node (shapes at batch 1, batch flagged)."""

    def __init__(self, ctx: Context, node: onnx.NodeProto, batch_dynamic: bool) -> None:
        self.ctx, self.node, self.dyn = ctx, node, batch_dynamic
        self.count = 0
        self.consts: dict[str, int] = {}

    def t(self, shape: tuple[int, ...], batch_axis: int | None = 0) -> int:
        self.count += 1
        dyn = tuple(self.dyn and i == batch_axis for i in range(len(shape)))
        return self.ctx.new_tensor(
            f"{self.node.output[0] or self.node.name}__r{self.count}",
            ONNX,
            like=self.node.input[0],
            shape=shape,
            dynamic=dyn,
        )

    def op(self, code: int, ins: list[int], shape, options=None, batch_axis: int | None = 0) -> int:
        out = self.t(shape, batch_axis)
        self.ctx.op(code, ins, [out], options)
        return out

    def const(self, tag: str, value: np.ndarray) -> int:
        """A float32 constant, one per ``tag`` (weights are shared by every step)."""
        if tag not in self.consts:
            name = f"{self.node.output[0] or self.node.name}__{tag}"
            self.consts[tag] = self.ctx.const(name, np.ascontiguousarray(value, dtype=np.float32))
        return self.consts[tag]

    def fc(self, x: int, w: np.ndarray, b: np.ndarray | None, tag: str, n: int) -> int:
        bias = self.const(f"{tag}_b", b) if b is not None else -1
        out = self.t((n, w.shape[0]))
        self.ctx.op(
            Op.FULLY_CONNECTED,
            [x, self.const(f"{tag}_w", w), bias],
            [out],
            ("FullyConnectedOptions", {"FusedActivationFunction": 0, "KeepNumDims": False}),
        )
        return out

    def split(self, x: int, parts: int, h: int, n: int) -> list[int]:
        outs = [self.t((n, h)) for _ in range(parts)]
        self.count += 1
        axis = self.ctx.int32(f"{self.node.output[0] or self.node.name}__ax{self.count}", 1)
        self.ctx.op(Op.SPLIT, [axis, x], outs, ("SplitOptions", {"NumSplits": parts}))
        return outs

    def binary(self, code: int, a: int, b: int, n: int, h: int) -> int:
        options = {Op.ADD: "AddOptions", Op.MUL: "MulOptions", Op.SUB: "SubOptions"}[code]
        return self.op(code, [a, b], (n, h), (options, _NO_ACT))


def _check(ctx: Context, node: onnx.NodeProto, gates: int) -> tuple[int, int, int, int, bool]:
    """(T, N, I, directions, batch dynamic) after refusing what is not unrolled."""
    a = attrs(node)
    op = node.op_type

    def refuse(detail: str) -> UnsupportedAttributeError:
        return UnsupportedAttributeError(op, node.name, detail)

    if int(a.get("layout", 0)) != 0:
        raise refuse("layout 1 (batch-major input)")
    if "clip" in a:
        raise refuse("clip")
    if int(a.get("input_forget", 0)):
        raise refuse("input_forget")
    if "activations" in a:
        acts = [s.decode() if isinstance(s, bytes) else s for s in a["activations"]]
        default = ["Sigmoid", "Tanh", "Tanh"] if op == "LSTM" else ["Sigmoid", "Tanh"]
        if [x.lower() for x in acts] != [x.lower() for x in default * (len(acts) // len(default))]:
            raise refuse(f"activations {acts}")
    x = node.input[0]
    t_len, n, i = ctx.shape(x)
    dyn = ctx.graph.dynamic.get(x, (False, False, False))
    if dyn[0] or dyn[2]:
        raise UnsupportedShapeError(f"{op} node {node.name!r}: only the batch axis may vary")
    if t_len > MAX_STEPS:
        raise UnsupportedShapeError(
            f"{op} node {node.name!r}: {t_len} time steps; the TFLite writer unrolls at "
            f"most {MAX_STEPS}. Shorten the sequence or deploy to an ONNX target"
        )
    for pos in (1, 2):
        if not ctx.is_constant(node.input[pos]):
            raise refuse("weights must be constants")
    if len(node.input) > 3 and node.input[3] and not ctx.is_constant(node.input[3]):
        raise refuse("bias must be constant")
    if len(node.input) > 4 and node.input[4]:
        lens = ctx.constant(node.input[4]) if ctx.is_constant(node.input[4]) else None
        if lens is None or not (lens == t_len).all():
            raise refuse("sequence_lens other than the full length")
    states = range(5, 7 if op == "LSTM" else 6)
    for pos in states:
        if len(node.input) > pos and node.input[pos]:
            name = node.input[pos]
            if not ctx.is_constant(name) or np.any(ctx.constant(name)):
                raise refuse("a non-zero initial state")
    if op == "LSTM" and len(node.input) > 7 and node.input[7]:
        raise refuse("peepholes")
    dirs = ctx.constant(node.input[1]).shape[0]
    del gates
    return t_len, n, i, dirs, dyn[1]


def _steps(cell: _Cell, x_name: str, t_len: int, n: int, i: int) -> list[int]:
    """The input sequence as ``t_len`` tensors of ``[N, I]``."""
    ctx = cell.ctx
    src = ctx.input(x_name, ONNX)
    if t_len == 1:
        parts = [src]
    else:
        parts = [cell.t((1, n, i), batch_axis=1) for _ in range(t_len)]
        axis = ctx.int32(f"{cell.node.output[0] or cell.node.name}__tsplit", 0)
        ctx.op(Op.SPLIT, [axis, src], parts, ("SplitOptions", {"NumSplits": t_len}))
    out = []
    for p in parts:
        shape = [-1, i] if cell.dyn else [n, i]
        r = cell.t((n, i))
        ctx.op(Op.RESHAPE, [p, ctx.int32(f"{cell.node.name}__rs{cell.count}", shape)], [r],
               ("ReshapeOptions", {"NewShape": shape}))  # fmt: skip
        out.append(r)
    return out


def _lstm_direction(cell: _Cell, xs: list[int], d: int, reverse: bool, n: int) -> tuple:
    ctx, node = cell.ctx, cell.node
    w, r = ctx.constant(node.input[1])[d], ctx.constant(node.input[2])[d]
    h4 = w.shape[0]
    hs = h4 // 4
    b = (
        ctx.constant(node.input[3])[d]
        if len(node.input) > 3 and node.input[3]
        else np.zeros(2 * h4, np.float32)
    )
    bias = b[:h4] + b[h4:]
    h = cell.const(f"h0_{d}", np.zeros((1, hs)))
    c = cell.const(f"c0_{d}", np.zeros((1, hs)))
    ys: list[int] = [0] * len(xs)
    order = range(len(xs) - 1, -1, -1) if reverse else range(len(xs))
    for step in order:
        gx = cell.fc(xs[step], w, bias, f"w{d}", n)
        gh = cell.fc(h, r, None, f"r{d}", n)
        g = cell.binary(Op.ADD, gx, gh, n, h4)
        gi, go, gf, gc = cell.split(g, 4, hs, n)
        gi, go, gf = (cell.op(Op.LOGISTIC, [v], (n, hs)) for v in (gi, go, gf))
        gc = cell.op(Op.TANH, [gc], (n, hs))
        c = cell.binary(
            Op.ADD, cell.binary(Op.MUL, gf, c, n, hs), cell.binary(Op.MUL, gi, gc, n, hs), n, hs
        )
        h = cell.binary(Op.MUL, go, cell.op(Op.TANH, [c], (n, hs)), n, hs)
        ys[step] = h
    return ys, h, c, hs


def _gru_direction(cell: _Cell, xs: list[int], d: int, reverse: bool, n: int) -> tuple:
    ctx, node = cell.ctx, cell.node
    w, r = ctx.constant(node.input[1])[d], ctx.constant(node.input[2])[d]
    h3 = w.shape[0]
    hs = h3 // 3
    b = (
        ctx.constant(node.input[3])[d]
        if len(node.input) > 3 and node.input[3]
        else np.zeros(2 * h3, np.float32)
    )
    wb, rb = b[:h3], b[h3:]
    lbr = int(attrs(node).get("linear_before_reset", 0))
    h = cell.const(f"h0_{d}", np.zeros((1, hs)))
    ys: list[int] = [0] * len(xs)
    order = range(len(xs) - 1, -1, -1) if reverse else range(len(xs))
    for step in order:
        xz, xr, xh = cell.split(cell.fc(xs[step], w, wb, f"w{d}", n), 3, hs, n)
        if lbr:
            hz, hr, hh = cell.split(cell.fc(h, r, rb, f"r{d}", n), 3, hs, n)
        else:
            hz, hr = cell.split(cell.fc(h, r[: 2 * hs], rb[: 2 * hs], f"rzr{d}", n), 2, hs, n)
        z = cell.op(Op.LOGISTIC, [cell.binary(Op.ADD, xz, hz, n, hs)], (n, hs))
        rg = cell.op(Op.LOGISTIC, [cell.binary(Op.ADD, xr, hr, n, hs)], (n, hs))
        if lbr:
            pre = cell.binary(Op.ADD, xh, cell.binary(Op.MUL, rg, hh, n, hs), n, hs)
        else:
            rh = cell.binary(Op.MUL, rg, h, n, hs)
            pre = cell.binary(
                Op.ADD, xh, cell.fc(rh, r[2 * hs :], rb[2 * hs :], f"rh{d}", n), n, hs
            )
        nt = cell.op(Op.TANH, [pre], (n, hs))
        # (1 - z) * n + z * h = n + z * (h - n)
        h = cell.binary(
            Op.ADD, nt, cell.binary(Op.MUL, z, cell.binary(Op.SUB, h, nt, n, hs), n, hs), n, hs
        )
        ys[step] = h
    return ys, h, None, hs


def _reshaped(cell: _Cell, src: int, shape: tuple[int, ...], batch_axis: int) -> int:
    target = [-1 if (cell.dyn and k == batch_axis) else s for k, s in enumerate(shape)]
    out = cell.t(shape, batch_axis)
    cell.ctx.op(
        Op.RESHAPE,
        [src, cell.ctx.int32(f"{cell.node.name}__rs{cell.count}", target)],
        [out],
        ("ReshapeOptions", {"NewShape": target}),
    )
    return out


def _concat(
    cell: _Cell, parts: list[int], shape: tuple[int, ...], axis: int, batch_axis: int
) -> int:
    if len(parts) == 1:
        return parts[0]
    return cell.op(
        Op.CONCATENATION,
        parts,
        shape,
        ("ConcatenationOptions", {"Axis": axis, "FusedActivationFunction": 0}),
        batch_axis,
    )


def recurrent(ctx: Context, node: onnx.NodeProto) -> None:
    """LSTM / GRU unrolled (see the module doc)."""
    lstm = node.op_type == "LSTM"
    t_len, n, i, dirs, dyn = _check(ctx, node, 4 if lstm else 3)
    direction = attrs(node).get("direction", b"forward")
    direction = direction.decode() if isinstance(direction, bytes) else direction
    cell = _Cell(ctx, node, dyn)
    xs = _steps(cell, node.input[0], t_len, n, i)
    run = _lstm_direction if lstm else _gru_direction
    if direction == "bidirectional":
        results = [run(cell, xs, 0, False, n), run(cell, xs, 1, True, n)]
    elif direction in ("forward", "reverse"):
        results = [run(cell, xs, 0, direction == "reverse", n)]
    else:
        raise UnsupportedAttributeError(node.op_type, node.name, f"direction {direction!r}")
    hs = results[0][3]
    outs = list(node.output) + ["", "", ""]
    if outs[0]:
        steps = []
        for t in range(t_len):
            per_dir = [_reshaped(cell, res[0][t], (1, 1, n, hs), 2) for res in results]
            steps.append(_concat(cell, per_dir, (1, len(results), n, hs), 1, 2))
        y = _concat(cell, steps, (t_len, len(results), n, hs), 0, 2)
        ctx.output(outs[0], y, ONNX)
    for k, pos in ((1, 1), (2, 2)):
        if not outs[pos] or (k == 2 and not lstm):
            continue
        last = [_reshaped(cell, res[k], (1, n, hs), 1) for res in results]
        ctx.output(outs[pos], _concat(cell, last, (len(results), n, hs), 0, 1), ONNX)


SEQ_LOWERINGS: dict[str, Lowering] = {"LSTM": recurrent, "GRU": recurrent}
