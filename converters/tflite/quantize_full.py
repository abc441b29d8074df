"""Full-integer int8 TFLite without TensorFlow (``tflite:int8-full``).

    from converters.tflite.quantize_full import onnx_to_tflite_int8_full
    data, report = onnx_to_tflite_int8_full(onnx_model, calibration, int8_io=False)

What is produced is what TensorFlow's full-integer post-training quantization
produces, and what NPUs, Edge TPUs and microcontrollers run:

* **activations int8**, asymmetric, one scale and zero point per tensor, from the
  minimum and maximum each tensor of the float32 model reaches over the calibration
  samples (run one at a time on ai-edge-litert with every intermediate tensor kept);
  ranges always include 0 so zero padding is exact;
* **weights int8**, symmetric (zero point 0, values in [-127, 127]): per output channel
  for ``CONV_2D`` (dimension 0), ``DEPTHWISE_CONV_2D`` (dimension 3) and
  ``TRANSPOSE_CONV`` (dimension 0), per tensor for ``FULLY_CONNECTED``;
* **biases int32** with scale ``input scale x weight scale`` (per channel), zero point 0;
* operators whose int8 kernels need it get TFLite's fixed output parameters
  (``LOGISTIC`` and ``SOFTMAX``: 1/256 and -128; ``TANH``: 1/128 and 0), and operators
  that move values without arithmetic (reshape, transpose, pools, pad, slice, concat, ...)
  keep their input's parameters, requantizing (``QUANTIZE`` int8 -> int8) an input
  whose parameters differ;
* an operator without an int8 kernel here (e.g. ``DIV``, ``POW``, ``EXP``, ``SIGN``)
  runs in float32 between ``DEQUANTIZE`` and ``QUANTIZE``; the report names
  each such operator (``float_operators``), so "full integer" is never claimed falsely;
* inputs and outputs: float32 by default (a ``QUANTIZE`` after each input, a
  ``DEQUANTIZE`` before each output), or int8 with ``int8_io=True``; the report's
  ``io`` gives each one's dtype, scale and zero point, which the manifest must carry so
  a device feeds ``round(x / scale) + zero_point``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import tflite

from converters.tflite.builder import ModelSpec, OperatorSpec, Quantization, serialize
from converters.tflite.errors import UnsupportedQuantizationError
from converters.tflite.quantize import quantize_int8

Op = tflite.BuiltinOperator
T = tflite.TensorType

#: Operators with int8 kernels that requantize (any input and output parameters).
_ARITHMETIC = {
    Op.CONV_2D, Op.DEPTHWISE_CONV_2D, Op.FULLY_CONNECTED, Op.TRANSPOSE_CONV,
    Op.ADD, Op.SUB, Op.MUL, Op.MEAN, Op.SUM, Op.RELU, Op.RELU6, Op.RELU_N1_TO_1,
    Op.HARD_SWISH, Op.LEAKY_RELU, Op.BATCH_MATMUL, Op.GELU,
    Op.SQUARED_DIFFERENCE, Op.RSQRT,
}  # fmt: skip
#: Fixed output (scale, zero point) of int8 kernels.
_FIXED = {Op.LOGISTIC: (1 / 256, -128), Op.SOFTMAX: (1 / 256, -128), Op.TANH: (1 / 128, 0)}
#: Operators whose int8 kernels need the output (and every data input) to share
#: the first input's parameters.
_SAME = {
    Op.RESHAPE, Op.TRANSPOSE, Op.MAX_POOL_2D, Op.AVERAGE_POOL_2D, Op.PAD, Op.PADV2,
    Op.MIRROR_PAD, Op.STRIDED_SLICE, Op.SPLIT, Op.SPLIT_V, Op.GATHER, Op.SQUEEZE,
    Op.BROADCAST_TO, Op.RESIZE_NEAREST_NEIGHBOR, Op.RESIZE_BILINEAR, Op.REDUCE_MAX, Op.REDUCE_MIN,
    Op.MAXIMUM, Op.MINIMUM, Op.CONCATENATION,
}  # fmt: skip
#: (weight input, per-channel dimension or None) of weighted operators.
_WEIGHTS = {
    Op.CONV_2D: (1, 0),
    Op.DEPTHWISE_CONV_2D: (1, 3),
    Op.FULLY_CONNECTED: (1, None),
    Op.TRANSPOSE_CONV: (1, 0),
}
_BIAS_POS = {Op.CONV_2D: 2, Op.DEPTHWISE_CONV_2D: 2, Op.FULLY_CONNECTED: 2, Op.TRANSPOSE_CONV: 3}
#: Data inputs of operators whose other inputs are shapes, axes or sizes.
_DATA_INPUTS = {
    Op.TRANSPOSE_CONV: (2,), Op.SPLIT: (1,), Op.RESHAPE: (0,), Op.TRANSPOSE: (0,),
    Op.MEAN: (0,), Op.SUM: (0,), Op.REDUCE_MAX: (0,), Op.REDUCE_MIN: (0,), Op.PAD: (0,),
    Op.PADV2: (0, 2), Op.MIRROR_PAD: (0,), Op.STRIDED_SLICE: (0,), Op.SPLIT_V: (0,),
    Op.GATHER: (0,), Op.BROADCAST_TO: (0,), Op.RESIZE_BILINEAR: (0,),
    Op.RESIZE_NEAREST_NEIGHBOR: (0,),
}  # fmt: skip
_INT8_VERSION = {
    Op.CONV_2D: 3, Op.DEPTHWISE_CONV_2D: 3, Op.FULLY_CONNECTED: 4, Op.ADD: 2, Op.SUB: 2,
    Op.MUL: 2, Op.MEAN: 2, Op.SUM: 2, Op.SOFTMAX: 2, Op.LOGISTIC: 2, Op.TANH: 2,
    Op.MAX_POOL_2D: 2, Op.AVERAGE_POOL_2D: 2, Op.TRANSPOSE: 2, Op.CONCATENATION: 2,
    Op.PAD: 2, Op.PADV2: 2, Op.RELU: 2, Op.RELU6: 2, Op.LEAKY_RELU: 2, Op.STRIDED_SLICE: 2,
    Op.SPLIT: 2, Op.SPLIT_V: 2, Op.GATHER: 2, Op.RESIZE_BILINEAR: 2,
    Op.RESIZE_NEAREST_NEIGHBOR: 2, Op.MAXIMUM: 2, Op.MINIMUM: 2, Op.BATCH_MATMUL: 2,
    Op.TRANSPOSE_CONV: 2, Op.REDUCE_MAX: 2, Op.REDUCE_MIN: 2, Op.SQUARED_DIFFERENCE: 2,
    Op.RSQRT: 2,
}  # fmt: skip


@dataclass(frozen=True)
class IOQuantization:
    """How a device feeds (or reads) one model input (output)."""

    name: str
    dtype: str  # "float32" or "int8"
    scale: float
    zero_point: int

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "scale": self.scale,
            "zero_point": self.zero_point,
        }


@dataclass
class FullIntReport:
    """What full-integer quantization did."""

    calibration_samples: int
    int8_operators: int
    float_operators: list[str] = field(default_factory=list)
    weights_quantized: int = 0
    biases_quantized: int = 0
    requantized: int = 0
    inputs: list[IOQuantization] = field(default_factory=list)
    outputs: list[IOQuantization] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": "int8-full",
            "calibration_samples": self.calibration_samples,
            "int8_operators": self.int8_operators,
            "float_operators": sorted(self.float_operators),
            "weights_quantized": self.weights_quantized,
            "biases_quantized": self.biases_quantized,
            "requantized": self.requantized,
            "inputs": [i.to_json() for i in self.inputs],
            "outputs": [o.to_json() for o in self.outputs],
        }


def build_float_spec(model: onnx.ModelProto) -> ModelSpec:
    """The float32 :class:`ModelSpec` :func:`converters.tflite.onnx_to_tflite` writes."""
    import converters.tflite as writer
    from converters.tflite.context import Context
    from converters.tflite.graph import load_graph
    from converters.tflite.layout import ONNX
    from converters.tflite.ops_transformer import fuse_erf_gelu
    from converters.tflite.optimize import fuse_activations

    writer._check_supported(
        model,
        [
            n
            for n in model.graph.node
            if n.domain not in ("", "ai.onnx") or n.op_type not in writer._FOLDABLE_OR_SHAPE
        ],
    )
    graph = load_graph(model)
    fuse_erf_gelu(graph)
    writer._check_supported(model, graph.nodes)
    spec = ModelSpec(description="edgefleet onnx_to_tflite (int8-full)")
    ctx = Context(graph, spec)
    for name in graph.inputs:
        elem = writer._elem_type(model, name)
        if elem != onnx.TensorProto.FLOAT:
            raise writer.UnsupportedTypeError(
                f"input {name!r} is {onnx.TensorProto.DataType.Name(elem)}; "
                "only float32 inputs are supported"
            )
        index = ctx.new_tensor(name, ONNX)
        spec.inputs.append(index)
        ctx.output(name, index, ONNX)
    for node in graph.nodes:
        writer._LOWERINGS[node.op_type](ctx, node)
    for name in graph.outputs:
        spec.outputs.append(writer._bind_output(ctx, name))
    fuse_activations(spec)
    spec.compact()
    return spec


# --- calibration ------------------------------------------------------------------------


def _as_feeds(
    spec: ModelSpec, samples: Mapping[str, np.ndarray] | np.ndarray
) -> list[dict[int, np.ndarray]]:
    names = [spec.tensors[i].name for i in spec.inputs]
    if isinstance(samples, np.ndarray):
        if len(names) != 1:
            raise UnsupportedQuantizationError(
                f"the model has {len(names)} inputs; give calibration samples by input name"
            )
        samples = {names[0]: samples}
    arrays = []
    for name in names:
        if name not in samples:
            raise UnsupportedQuantizationError(f"no calibration samples for input {name!r}")
        arrays.append(np.asarray(samples[name], dtype=np.float32))
    count = len(arrays[0])
    if count == 0 or any(len(a) != count for a in arrays):
        raise UnsupportedQuantizationError(
            "calibration samples: every input needs the same, non-zero number of samples"
        )
    return [{idx: arrays[k][i : i + 1] for k, idx in enumerate(spec.inputs)} for i in range(count)]


def calibrate(
    spec: ModelSpec, feeds: list[dict[int, np.ndarray]]
) -> dict[int, tuple[float, float]]:
    """(min, max) of every float32 activation tensor of ``spec`` over ``feeds``."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    interp = Interpreter(
        model_content=serialize(spec),
        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
        experimental_preserve_all_tensors=True,
    )
    interp.allocate_tensors()
    wanted = [i for i, t in enumerate(spec.tensors) if t.data is None and t.dtype == T.FLOAT32]
    lo = dict.fromkeys(wanted, np.inf)
    hi = dict.fromkeys(wanted, -np.inf)
    for feed in feeds:
        for idx, arr in feed.items():
            interp.set_tensor(idx, arr)
        interp.invoke()
        for i in wanted:
            try:
                v = interp.get_tensor(i)
            except ValueError:
                continue
            if v.size:
                lo[i] = min(lo[i], float(v.min()))
                hi[i] = max(hi[i], float(v.max()))
    return {i: (lo[i], hi[i]) for i in wanted if np.isfinite(lo[i])}


def _params(lo: float, hi: float) -> tuple[float, int]:
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if hi - lo < 1e-8:
        return 1e-8, -128 if lo == 0 else 127
    scale = (hi - lo) / 255.0
    zp = int(np.clip(round(-128 - lo / scale), -128, 127))
    return float(scale), zp


# --- rewriting --------------------------------------------------------------------------


class _Rewriter:
    def __init__(self, spec: ModelSpec, ranges: dict[int, tuple[float, float]]) -> None:
        self.spec = spec
        self.ranges = ranges
        self.params: dict[int, tuple[float, int]] = {}
        self.ops: list[OperatorSpec] = []
        self.report = FullIntReport(0, 0)
        self._const_q: dict[tuple[int, float, int], int] = {}
        self._deq: dict[int, int] = {}
        self._weights: dict[int, tuple[int, np.ndarray]] = {}
        self._biases: dict[tuple[int, float], int] = {}

    # tensors
    def is_activation(self, i: int) -> bool:
        t = self.spec.tensors[i]
        return i >= 0 and t.data is None and t.dtype in (T.FLOAT32, T.INT8)

    def set_int8(self, i: int, scale: float, zp: int) -> None:
        t = self.spec.tensors[i]
        t.dtype = T.INT8
        t.quantization = Quantization([float(scale)], [int(zp)])
        self.params[i] = (float(scale), int(zp))

    def own_params(self, i: int) -> tuple[float, int]:
        lo, hi = self.ranges.get(i, (0.0, 1.0))
        return _params(lo, hi)

    def quantized_const(self, i: int, scale: float | None = None, zp: int | None = None) -> int:
        """An int8 copy of float32 constant ``i`` (its own range unless given)."""
        t = self.spec.tensors[i]
        values = np.frombuffer(t.data or b"", dtype="<f4").reshape(t.shape)
        if scale is None or zp is None:
            finite = values[np.isfinite(values)]
            lo = float(finite.min()) if finite.size else 0.0
            hi = float(finite.max()) if finite.size else 0.0
            scale, zp = _params(lo, hi)
        key = (i, scale, zp)
        if key not in self._const_q:
            q = np.clip(np.round(np.nan_to_num(values / scale, posinf=1e9, neginf=-1e9)) + zp,
                        -128, 127).astype(np.int8)  # fmt: skip
            new = self.spec.add_constant(f"{t.name}__int8", q)
            self.spec.tensors[new].quantization = Quantization([float(scale)], [int(zp)])
            self._const_q[key] = new
        return self._const_q[key]

    def requantize(self, i: int, scale: float, zp: int) -> int:
        """Int8 tensor ``i`` moved to (scale, zp) by a QUANTIZE op."""
        if self.params.get(i) == (scale, zp):
            return i
        t = self.spec.tensors[i]
        new = self.spec.add_tensor(f"{t.name}__rq", t.shape, T.INT8, t.signature)
        self.set_int8(new, scale, zp)
        self.ops.append(OperatorSpec(Op.QUANTIZE, [i], [new], None, 2))
        self.report.requantized += 1
        return new

    def dequantized(self, i: int) -> int:
        if i not in self._deq:
            t = self.spec.tensors[i]
            new = self.spec.add_tensor(f"{t.name}__f32", t.shape, T.FLOAT32, t.signature)
            self.ops.append(OperatorSpec(Op.DEQUANTIZE, [i], [new], None, 2))
            self._deq[i] = new
        return self._deq[i]

    # operators
    def float_island(self, op: OperatorSpec) -> None:
        self.report.float_operators.append(_op_name(op.code))
        op.inputs = [self.dequantized(i) if i >= 0 and i in self.params else i for i in op.inputs]
        outs = []
        for o in op.outputs:
            t = self.spec.tensors[o]
            f = self.spec.add_tensor(f"{t.name}__f32out", t.shape, T.FLOAT32, t.signature)
            outs.append((f, o))
        op.outputs = [f for f, _ in outs]
        self.ops.append(op)
        for f, o in outs:
            self.set_int8(o, *self.own_params(o))
            self.ops.append(OperatorSpec(Op.QUANTIZE, [f], [o], None, 1))

    def weighted(self, op: OperatorSpec) -> None:
        pos, axis = _WEIGHTS[op.code]
        data_pos = 2 if op.code == Op.TRANSPOSE_CONV else 0
        w_idx = op.inputs[pos]
        w_t = self.spec.tensors[w_idx]
        if w_t.data is None or w_t.dtype != T.FLOAT32 or op.inputs[data_pos] not in self.params:
            self.float_island(op)  # activation weights, or a constant input (an RNN's h0)
            return
        in_scale, _ = self.params[op.inputs[data_pos]]
        if w_idx not in self._weights:  # shared weights (an unrolled RNN) quantized once
            values = np.frombuffer(w_t.data, dtype="<f4").reshape(w_t.shape)
            q, w_scale = quantize_int8(values, axis)
            w_new = self.spec.add_constant(f"{w_t.name}__int8", q)
            self.spec.tensors[w_new].quantization = Quantization(
                [float(s) for s in w_scale], [0] * len(w_scale), 0 if axis is None else axis
            )
            self._weights[w_idx] = (w_new, w_scale)
            self.report.weights_quantized += 1
        w_new, w_scale = self._weights[w_idx]
        op.inputs[pos] = w_new
        bpos = _BIAS_POS[op.code]
        if (
            len(op.inputs) > bpos
            and op.inputs[bpos] >= 0
            and (op.inputs[bpos], in_scale) in self._biases
        ):
            op.inputs[bpos] = self._biases[(op.inputs[bpos], in_scale)]
        elif len(op.inputs) > bpos and op.inputs[bpos] >= 0:
            key = (op.inputs[bpos], in_scale)
            b_t = self.spec.tensors[op.inputs[bpos]]
            bias = np.frombuffer(b_t.data or b"", dtype="<f4").reshape(b_t.shape)
            b_scale = (in_scale * w_scale.astype(np.float64)).reshape(-1)
            bq = np.clip(np.round(bias / b_scale), -(2**31), 2**31 - 1).astype(np.int32)
            b_new = self.spec.add_constant(f"{b_t.name}__int32", bq)
            self.spec.tensors[b_new].quantization = Quantization(
                [float(s) for s in b_scale], [0] * len(b_scale), 0
            )
            op.inputs[bpos] = self._biases[key] = b_new
            self.report.biases_quantized += 1
        for o in op.outputs:
            self.set_int8(o, *self.own_params(o))
        self.int8(op)

    def int8(self, op: OperatorSpec) -> None:
        op.version = max(op.version, _INT8_VERSION.get(op.code, 1))
        self.ops.append(op)
        self.report.int8_operators += 1

    def arithmetic(self, op: OperatorSpec) -> None:
        data = _DATA_INPUTS.get(op.code)
        for pos, i in enumerate(op.inputs):
            if i < 0 or (data is not None and pos not in data):
                continue
            t = self.spec.tensors[i]
            if t.data is not None and t.dtype == T.FLOAT32:
                op.inputs[pos] = self.quantized_const(i)
        for o in op.outputs:
            fixed = _FIXED.get(op.code)
            self.set_int8(o, *(fixed or self.own_params(o)))
        self.int8(op)

    def same(self, op: OperatorSpec) -> None:
        data = _DATA_INPUTS.get(op.code)
        acts = [
            (pos, i)
            for pos, i in enumerate(op.inputs)
            if i >= 0 and i in self.params and (data is None or pos in data)
        ]
        if op.code == Op.CONCATENATION:
            target = self.own_params(op.outputs[0])
        elif acts:
            target = self.params[acts[0][1]]
        else:  # data moved out of a constant (a SPLIT of a folded product)
            q = self.spec.tensors[self.quantized_const(op.inputs[(data or (0,))[0]])].quantization
            assert q is not None
            target = (q.scale[0], q.zero_point[0])
        for pos, i in acts:
            op.inputs[pos] = self.requantize(i, *target)
        for pos, i in enumerate(op.inputs):
            if i < 0 or (data is not None and pos not in data):
                continue
            t = self.spec.tensors[i]
            if t.data is not None and t.dtype == T.FLOAT32:
                op.inputs[pos] = self.quantized_const(i, *target)
        for o in op.outputs:
            self.set_int8(o, *target)
        self.int8(op)


def _op_name(code: int) -> str:
    for name, value in vars(Op).items():
        if value == code and name.isupper():
            return name
    return str(code)


_FUSED = {0: lambda v: v, 1: lambda v: np.maximum(v, 0), 3: lambda v: np.clip(v, 0, 6)}


def fold_constant_fully_connected(spec: ModelSpec) -> int:
    """Replace each ``FULLY_CONNECTED`` whose input, weights and bias are all float32
    constants by its constant result (in place); returns how many were folded.

    An unrolled GRU/LSTM multiplies its zero initial state by the recurrent weights on
    the first step: left as an operator, that product would keep a float32 copy of the
    weights beside their int8 copy (the file grew past the float32 model's size).
    """
    folded = 0
    kept = []
    for op in spec.operators:
        if op.code == Op.FULLY_CONNECTED and _fold_fc(spec, op):
            folded += 1
            continue
        kept.append(op)
    spec.operators = kept
    return folded


def _fold_fc(spec: ModelSpec, op: OperatorSpec) -> bool:
    ins = [spec.tensors[i] if i >= 0 else None for i in op.inputs[:3]]
    act = op.options[1].get("FusedActivationFunction", 0) if op.options else 0
    if (
        any(t is not None and (t.data is None or t.dtype != T.FLOAT32) for t in ins)
        or ins[0] is None
        or ins[1] is None
        or act not in _FUSED
    ):
        return False
    x = np.frombuffer(ins[0].data or b"", dtype="<f4")
    w = np.frombuffer(ins[1].data or b"", dtype="<f4").reshape(ins[1].shape)
    y = x.reshape(-1, w.shape[1]).astype(np.float64) @ w.T.astype(np.float64)
    if ins[2] is not None:
        y = y + np.frombuffer(ins[2].data or b"", dtype="<f4")
    out = spec.tensors[op.outputs[0]]
    out.data = _FUSED[act](y).astype("<f4").reshape(out.shape).tobytes()
    out.signature = None
    return True


def share_recurrent_ranges(spec: ModelSpec, ranges: dict[int, tuple[float, float]]) -> None:
    """Give the inputs of ``FULLY_CONNECTED`` operators that share one weight tensor (the
    steps of an unrolled GRU/LSTM) one common calibrated range (in place).

    An int32 bias is stored at ``input scale x weight scale``: with a range per step, every
    step needed its own copy of the bias (24 copies in a 24-step GRU); with one range,
    one copy serves every step whose input takes its parameters from that range.
    """
    groups: dict[int, list[int]] = {}
    for op in spec.operators:
        if op.code == Op.FULLY_CONNECTED and op.inputs[0] in ranges:
            groups.setdefault(op.inputs[1], []).append(op.inputs[0])
    for inputs in groups.values():
        if len(set(inputs)) > 1:
            lo = min(ranges[i][0] for i in inputs)
            hi = max(ranges[i][1] for i in inputs)
            for i in inputs:
                ranges[i] = (lo, hi)


def quantize_full_integer(
    spec: ModelSpec, ranges: dict[int, tuple[float, float]], *, int8_io: bool
) -> FullIntReport:
    """Rewrite float32 ``spec`` into a full-integer int8 model (in place)."""
    fold_constant_fully_connected(spec)
    ranges = dict(ranges)
    share_recurrent_ranges(spec, ranges)
    rw = _Rewriter(spec, ranges)
    new_inputs = []
    for i in spec.inputs:
        scale, zp = rw.own_params(i)
        t = spec.tensors[i]
        rw.report.inputs.append(IOQuantization(t.name, "int8" if int8_io else "float32", scale, zp))
        if int8_io:
            rw.set_int8(i, scale, zp)
            new_inputs.append(i)
        else:
            f = spec.add_tensor(t.name, t.shape, T.FLOAT32, t.signature)
            spec.tensors[f].name, t.name = t.name, f"{t.name}__int8"
            rw.set_int8(i, scale, zp)
            rw.ops.append(OperatorSpec(Op.QUANTIZE, [f], [i], None, 1))
            new_inputs.append(f)
    for op in list(spec.operators):
        if all(spec.tensors[o].dtype not in (T.FLOAT32, T.INT8) for o in op.outputs):
            rw.ops.append(op)  # shape arithmetic (SHAPE, int32 slices): unchanged
            continue
        acts_float = [
            i
            for i in op.inputs
            if i >= 0
            and spec.tensors[i].data is None
            and spec.tensors[i].dtype == T.FLOAT32
            and i not in rw.params
        ]
        if acts_float:  # reads a tensor no quantized op produced: keep it float
            rw.float_island(op)
        elif op.code in _WEIGHTS:
            rw.weighted(op)
        elif op.code in _SAME:
            rw.same(op)
        elif op.code in _ARITHMETIC or op.code in _FIXED:
            rw.arithmetic(op)
        else:
            rw.float_island(op)
    new_outputs = []
    for o in spec.outputs:
        t = spec.tensors[o]
        scale, zp = rw.params[o]
        rw.report.outputs.append(
            IOQuantization(t.name, "int8" if int8_io else "float32", scale, zp)
        )
        if int8_io:
            new_outputs.append(o)
        else:
            f = spec.add_tensor(t.name, t.shape, T.FLOAT32, t.signature)
            spec.tensors[f].name, t.name = t.name, f"{t.name}__int8"
            rw.ops.append(OperatorSpec(Op.DEQUANTIZE, [o], [f], None, 2))
            new_outputs.append(f)
    spec.inputs, spec.outputs = new_inputs, new_outputs
    spec.operators = rw.ops
    spec.compact()
    return rw.report


def onnx_to_tflite_int8_full(
    model: onnx.ModelProto,
    calibration: Mapping[str, np.ndarray] | np.ndarray,
    *,
    int8_io: bool = False,
) -> tuple[bytes, FullIntReport]:
    """Convert ``model`` to a full-integer int8 TFLite file, calibrated on ``calibration``.

    ``calibration`` holds representative inputs (by input name, or one array for a
    single-input model), run one sample at a time. Returns the file and a
    :class:`FullIntReport` (operators left in float, input/output quantization).
    """
    spec = build_float_spec(model)
    feeds = _as_feeds(spec, calibration)
    ranges = calibrate(spec, feeds)
    report = quantize_full_integer(spec, ranges, int8_io=int8_io)
    report.calibration_samples = len(feeds)
    spec.description = "edgefleet onnx_to_tflite (int8-full)"
    _short_names(spec)
    return serialize(spec), report


def _short_names(spec: ModelSpec) -> None:
    """Inner tensors named by index: on a small model the names are half the file.
    Inputs and outputs keep their ONNX names (the signature uses them)."""
    keep = {*spec.inputs, *spec.outputs}
    for i, t in enumerate(spec.tensors):
        if i not in keep:
            t.name = f"t{i}"
