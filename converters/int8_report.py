"""What an int8 file holds, read from the file itself: weights by dtype, nodes int8 or float.

An int8 variant must show that its weights are int8 *in the produced file*; a label or
a tool's log is not proof. This module reads the file:

* :func:`onnx_weights_by_dtype` / :func:`tflite_weights_by_dtype`: weight tensors
  (initializers or constant tensors with more than one element) by element type;
* :func:`onnx_int8_weights` / :func:`tflite_int8_weights`: how many of them are int8 or
  uint8 data (an ONNX zero-point vector is not a weight, it only describes one);
* :func:`onnx_node_report`: every computing node of a quantized ONNX graph classed as
  int8 or float, by op type, with the reason each float node stayed float, and the
  weight input of each Conv / ConvTranspose / MatMul / Gemm classed as int8 per-channel,
  int8 per-tensor or float.

Classing a node of an ONNX graph (QDQ or dynamic):

* *plumbing*, not counted: QuantizeLinear, DequantizeLinear, DynamicQuantizeLinear, Cast,
  and the Muls of dynamic int8 that combine scales and rescale an integer kernel's output;
* *int8*: it reads an int8/uint8 tensor directly (MatMulInteger, ConvInteger, QLinear*),
  or every float input arrives through a DequantizeLinear and every float output goes
  only into QuantizeLinear (a QDQ group onnxruntime runs as an int8 kernel or as
  dequantize -> float op -> quantize, its choice at load time);
* *float*, with a reason: the quantizing pass has no int8 form of the op; an input is float
  (named, with what produced it); an output leaves in float (named, with its reader);
* nodes with no float, int8 or dequantized input (shape arithmetic on int64), and
  Shape / Size, are not counted.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

_PLUMBING = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "Cast"}
_INT8 = {2, 3}  # uint8, int8
_FLOAT = {1, 10, 16}  # float32, float16, bfloat16
_INTEGER_KERNELS = {"MatMulInteger", "ConvInteger"}
_SHAPE_ONLY = {"Shape", "Size"}  # read only a tensor's shape
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "MatMulInteger", "ConvInteger")
NAMES_PER_REASON = 5

_ONNX_DTYPES = {
    1: "float32",
    2: "uint8",
    3: "int8",
    5: "int16",
    6: "int32",
    7: "int64",
    10: "float16",
    11: "float64",
    16: "bfloat16",
}


def _size(dims: Iterable[int]) -> int:
    n = 1
    for d in dims:
        n *= int(d)
    return n


def _dtype_name(code: int) -> str:
    return _ONNX_DTYPES.get(code, f"type{code}")


def _descriptors(model: Any) -> set[str]:
    """Names of the scales and zero points of (de)quantizing nodes and integer kernels."""
    names: set[str] = set()
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            names.update(node.input[1:3])
        elif node.op_type in _INTEGER_KERNELS:
            names.update(node.input[2:4])
    names.discard("")
    return names


def onnx_weights_by_dtype(model: Any) -> dict[str, int]:
    """Initializers with more than one element, counted by element type; the scales
    and zero points that describe quantized tensors are not weights and not counted."""
    skip = _descriptors(model)
    counts: Counter[str] = Counter()
    for t in model.graph.initializer:
        if _size(t.dims) > 1 and t.name not in skip:
            counts[_dtype_name(int(t.data_type))] += 1
    return dict(sorted(counts.items()))


def onnx_int8_weights(model: Any) -> int:
    """int8/uint8 initializers with more than one element that carry data: the input a
    DequantizeLinear dequantizes, or a tensor an integer kernel reads (not the scales
    and zero points that describe them)."""
    int8 = {
        t.name for t in model.graph.initializer if int(t.data_type) in _INT8 and _size(t.dims) > 1
    }
    data: set[str] = set()
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear":
            data.update(i for i in node.input[:1] if i in int8)
        elif node.op_type in _INTEGER_KERNELS:
            data.update(i for i in node.input[:2] if i in int8)
        elif node.op_type.startswith("QLinear"):
            data.update(i for k, i in enumerate(node.input) if k % 3 == 0 and i in int8)
    return len(data)


@dataclass(frozen=True)
class FloatReason:
    """Float nodes of one op type that stayed float for one reason."""

    op: str
    reason: str
    count: int
    nodes: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "op": self.op,
            "reason": self.reason,
            "count": self.count,
            "nodes": list(self.nodes),
        }


@dataclass(frozen=True)
class NodeReport:
    """Computing nodes of a quantized ONNX graph, int8 or float, by op type."""

    int8_by_op: dict[str, int]
    float_by_op: dict[str, int]
    float_reasons: tuple[FloatReason, ...]
    weights: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def int8_nodes(self) -> int:
        return sum(self.int8_by_op.values())

    @property
    def float_nodes(self) -> int:
        return sum(self.float_by_op.values())

    def weight_count(self, kind: str) -> int:
        """Weight inputs of Conv/MatMul/Gemm... of ``kind`` (``int8 per-channel``, ...)."""
        return sum(w.get(kind, 0) for w in self.weights.values())

    def note(self) -> str:
        ops = sorted(set(self.int8_by_op) | set(self.float_by_op))
        parts = [f"{op} {self.int8_by_op.get(op, 0)}/{self.float_by_op.get(op, 0)}" for op in ops]
        text = (
            f"nodes int8/float: {self.int8_nodes}/{self.float_nodes} ({', '.join(parts)})"
            if parts
            else "no computing nodes"
        )
        if self.float_reasons:
            why = "; ".join(f"{r.op} x{r.count}: {r.reason}" for r in self.float_reasons)
            text += f"; stayed float: {why}"
        return text

    def to_json(self) -> dict[str, Any]:
        ops = sorted(set(self.int8_by_op) | set(self.float_by_op))
        return {
            "int8_nodes": self.int8_nodes,
            "float_nodes": self.float_nodes,
            "by_op": {
                op: {"int8": self.int8_by_op.get(op, 0), "float": self.float_by_op.get(op, 0)}
                for op in ops
            },
            "stayed_float": [r.to_json() for r in self.float_reasons],
            "weights": {op: dict(sorted(k.items())) for op, k in sorted(self.weights.items())},
        }


class _Graph:
    def __init__(self, model: Any) -> None:
        from .quantization_report import value_types

        self.model = model
        self.types = value_types(model)
        self.init = {t.name: t for t in model.graph.initializer}
        self.producer = {o: n for n in model.graph.node for o in n.output if o}
        self.readers: dict[str, list[Any]] = defaultdict(list)
        for n in model.graph.node:
            for i in n.input:
                if i:
                    self.readers[i].append(n)
        self.graph_outputs = {o.name for o in model.graph.output}
        self.plumbing = {id(n) for n in model.graph.node if self._is_plumbing(n)}

    def _is_plumbing(self, node: Any) -> bool:
        if node.op_type in _PLUMBING:
            return True
        if node.op_type == "Mul":  # dynamic int8: scale * scale, Cast(int32 result) * scale
            for i in node.input:
                cast = self.producer.get(i)
                if cast is not None and cast.op_type == "DynamicQuantizeLinear":
                    return True
                if cast is not None and cast.op_type == "Cast":
                    src = self.producer.get(cast.input[0])
                    if src is not None and src.op_type in _INTEGER_KERNELS:
                        return True
        return False

    def dequantized(self, name: str) -> bool:
        p = self.producer.get(name)
        return p is not None and p.op_type == "DequantizeLinear"

    def origin(self, name: str) -> str:
        if name in self.init:
            return "a float initializer"
        p = self.producer.get(name)
        if p is None:
            return "a graph input"
        return f"{p.op_type} {p.name or '(unnamed)'}"

    def weight_kind(self, node: Any) -> str | None:
        """int8 per-channel / int8 per-tensor / float, or None when input 1 is an
        activation (e.g. attention's MatMul of two activations)."""
        if len(node.input) < 2:
            return None
        w = node.input[1]
        if w in self.init:
            t = self.init[w]
            if int(t.data_type) in _INT8:
                zp = node.input[3] if len(node.input) > 3 else ""
                per_channel = zp in self.init and _size(self.init[zp].dims) > 1
                return "int8 per-channel" if per_channel else "int8 per-tensor"
            return "float" if int(t.data_type) in _FLOAT else None
        dq = self.producer.get(w)
        if dq is None or dq.op_type != "DequantizeLinear":
            return None
        src = dq.input[0]
        if src in self.init and int(self.init[src].data_type) in _INT8:
            scale = self.init.get(dq.input[1]) if len(dq.input) > 1 else None
            per_channel = scale is not None and _size(scale.dims) > 1
            return "int8 per-channel" if per_channel else "int8 per-tensor"
        q = self.producer.get(src)
        if q is not None and q.op_type == "QuantizeLinear" and q.input[0] in self.init:
            return "float"  # quantized at load time, stored float
        return None


def onnx_node_report(
    model: Any, quantizable: Iterable[str], quantizer: str = "the quantizer"
) -> NodeReport:
    """Class every computing node of ``model`` as int8 or float (see the module docs).

    ``quantizable`` are the op types the quantizing pass (named ``quantizer`` in the
    reasons) had an int8 form for; a float node of another type is reported as
    ``"{quantizer} has no int8 form of {op}"``.
    """
    g = _Graph(model)
    can = set(quantizable)
    int8_by_op: Counter[str] = Counter()
    float_by_op: Counter[str] = Counter()
    reasons: dict[tuple[str, str], list[str]] = defaultdict(list)
    weights: dict[str, Counter[str]] = defaultdict(Counter)
    for node in model.graph.node:
        if id(node) in g.plumbing:
            continue
        if node.op_type in WEIGHTED_OPS:
            kind = g.weight_kind(node)
            if kind is not None:
                weights[node.op_type][kind] += 1
        ins = [i for i in node.input if i]
        direct_int8 = [i for i in ins if g.types.get(i) in _INT8 and not g.dequantized(i)]
        dq = [i for i in ins if g.dequantized(i)]
        floats = [i for i in ins if g.types.get(i) in _FLOAT and not g.dequantized(i)]
        if not (direct_int8 or dq or floats):
            continue  # shape arithmetic
        if node.op_type in _SHAPE_ONLY:
            continue
        reason = None
        if direct_int8 and not floats:
            reason = None
        elif node.op_type not in can and not direct_int8:
            reason = f"{quantizer} has no int8 form of {node.op_type}"
        elif floats:
            reason = f"input {floats[0]} is float (from {g.origin(floats[0])})"
        else:
            for o in node.output:
                if not o or g.types.get(o, 1) not in _FLOAT:
                    continue
                outside = [r for r in g.readers.get(o, []) if r.op_type != "QuantizeLinear"]
                if outside or o in g.graph_outputs:
                    reader = (
                        f"{outside[0].op_type} {outside[0].name or '(unnamed)'}"
                        if outside
                        else "the graph output"
                    )
                    reason = f"output {o} leaves in float (read by {reader})"
                    break
        if reason is None:
            int8_by_op[node.op_type] += 1
        else:
            float_by_op[node.op_type] += 1
            reasons[(node.op_type, reason)].append(node.name or "(unnamed)")
    grouped: dict[tuple[str, str], list[str]] = defaultdict(list)
    for (op, reason), names in reasons.items():
        # one line per op and kind of reason: tensor names differ node by node
        grouped[(op, _generic(reason))].extend(names)
    float_reasons = tuple(
        FloatReason(op, reason, len(names), tuple(names[:NAMES_PER_REASON]))
        for (op, reason), names in sorted(grouped.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    )
    return NodeReport(
        int8_by_op=dict(sorted(int8_by_op.items())),
        float_by_op=dict(sorted(float_by_op.items())),
        float_reasons=float_reasons,
        weights={op: dict(c) for op, c in weights.items()},
    )


def _generic(reason: str) -> str:
    """``input T is float (from GRU g)`` -> ``an input is float (from GRU)``."""
    if reason.startswith("input "):
        origin = reason.split(" (from ", 1)[1].rstrip(")")
        if not origin.startswith(("a float initializer", "a graph input")):
            origin = origin.split(" ")[0]
        return f"an input is float (from {origin})"
    if reason.startswith("output "):
        reader = reason.split("(read by ", 1)[1].rstrip(")")
        if reader != "the graph output":
            reader = reader.split(" ")[0]
        return f"its output is read in float (by {reader})"
    return reason


# -- TFLite -----------------------------------------------------------------------

_TFLITE_DTYPES = {
    0: "float32",
    1: "float16",
    2: "int32",
    3: "uint8",
    4: "int64",
    7: "int16",
    9: "int8",
    10: "float64",
}


def _tflite_constants(data: bytes) -> list[tuple[str, int, int]]:
    """(dtype name, element count, tensor index) of every constant tensor of subgraph 0."""
    import tflite

    model = tflite.Model.GetRootAsModel(data, 0)
    graph = model.Subgraphs(0)
    out = []
    for i in range(graph.TensorsLength()):
        t = graph.Tensors(i)
        b = t.Buffer()
        if b == 0 or b >= model.BuffersLength():
            continue
        buf = model.Buffers(b)
        if buf.DataLength() == 0 and not buf.Offset():
            continue
        shape = [int(t.Shape(k)) for k in range(t.ShapeLength())]
        out.append((_TFLITE_DTYPES.get(int(t.Type()), f"type{t.Type()}"), _size(shape), i))
    return out


def tflite_weights_by_dtype(data: bytes) -> dict[str, int]:
    """Constant tensors with more than one element, counted by element type."""
    counts = Counter(dtype for dtype, size, _ in _tflite_constants(data) if size > 1)
    return dict(sorted(counts.items()))


def tflite_int8_weights(data: bytes) -> int:
    """int8/uint8 constant tensors with more than one element (TFLite keeps scales and
    zero points in tensor metadata, so every such tensor is data)."""
    return sum(
        1 for dtype, size, _ in _tflite_constants(data) if size > 1 and dtype in {"int8", "uint8"}
    )


# -- what onnxruntime runs -----------------------------------------------------------

_ORT_INT8_KERNELS = {
    "QGemm",
    "MatMulInteger",
    "ConvInteger",
    "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat",
    "QAttention",
    "DynamicQuantizeLSTM",
    "QEmbedLayerNormalization",
}


#: the two ways onnxruntime's CPU provider fuses QDQ groups: as on this machine, and as
#: its ARM builds do (``session.qdqisint8allowed=1``: int8 activations taken directly;
#: x86-64 builds take them only where they can be converted to uint8)
PLATFORMS = ("this machine", "arm")


@dataclass(frozen=True)
class RuntimeKernels:
    """Computing ops of a model after onnxruntime's own graph optimizations (extended
    level: where it fuses a DequantizeLinear -> op -> QuantizeLinear group into an int8
    kernel), int8 kernels and float ones by op type, in the installed onnxruntime, as
    fused on ``platform`` (``"this machine (x86_64)"`` or ``"arm"``)."""

    onnxruntime: str
    platform: str
    int8: dict[str, int]
    float: dict[str, int]

    def note(self) -> str:
        def fmt(counts: dict[str, int]) -> str:
            return ", ".join(f"{k} {v}" for k, v in counts.items()) or "none"

        return (
            f"onnxruntime {self.onnxruntime} ({self.platform}) runs "
            f"{sum(self.int8.values())} int8 kernels ({fmt(self.int8)}) and "
            f"{sum(self.float.values())} float ones ({fmt(self.float)})"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "onnxruntime": self.onnxruntime,
            "platform": self.platform,
            "int8": self.int8,
            "float": self.float,
        }


def onnx_runtime_kernels(data: bytes, platform: str = "this machine") -> RuntimeKernels | None:
    """What the installed onnxruntime's CPU provider runs for ``data``, fused as on this
    machine or as on ARM (see :data:`PLATFORMS`); None when it does not load the file
    (the pipeline's parity step then reports why). Another onnxruntime release may fuse
    differently."""
    import os
    import platform as host
    import tempfile

    import onnx
    import onnxruntime as ort

    label = f"this machine ({host.machine()})" if platform == "this machine" else platform
    with tempfile.TemporaryDirectory(prefix="edgefleet-kernels-") as tmp:
        path = os.path.join(tmp, "optimized.onnx")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        opts.optimized_model_filepath = path
        opts.log_severity_level = 3
        if platform == "arm":
            opts.add_session_config_entry("session.qdqisint8allowed", "1")
        try:
            ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
            model = onnx.load(path)
        except Exception:  # reported by the parity step, which runs the file itself
            return None
    int8: Counter[str] = Counter()
    flt: Counter[str] = Counter()
    for node in model.graph.node:
        op = node.op_type
        if op in _PLUMBING:
            continue
        if op.startswith("QLinear") or op in _ORT_INT8_KERNELS:
            int8[op] += 1
        else:
            flt[op] += 1
    return RuntimeKernels(
        ort.__version__, label, dict(sorted(int8.items())), dict(sorted(flt.items()))
    )
