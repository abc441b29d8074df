"""Read an ONNX model into an :class:`OnnxGraph`: static shapes, folded constants.

What this module guarantees to the lowering:

* every tensor left in the graph has a fully static shape, taken from ONNX shape
  inference with the batch dimension fixed to 1; ``dynamic`` marks which of its
  dimensions follow the batch (found by inferring a second time at batch 2), so
  the TFLite tensors get ``shape_signature`` -1 there;
* subgraphs computed from initializers and static shapes only (the
  ``Shape -> Gather -> Unsqueeze -> Concat`` chains exporters emit for
  ``view(x.size(0), -1)``) are evaluated here with ONNX's reference evaluator
  and left as constants; a value derived from the dynamic batch size may only
  feed the target shape of a ``Reshape`` (whose output shape inference already
  knows), anything else is refused;
* ``BatchNormalization`` right after a ``Conv`` whose output nothing else reads
  is folded into the convolution's weights and bias.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from converters.tflite.errors import InvalidModelError, UnsupportedShapeError

# Operators evaluated at conversion time when all their inputs are constants.
FOLDABLE_OPS = frozenset(
    {
        "Add", "Cast", "Ceil", "Concat", "ConstantOfShape", "Div", "Equal", "Expand",
        "Flatten", "Floor", "Gather", "Identity", "Max", "Min", "Mul", "Neg", "Range",
        "ReduceProd", "Reshape", "Slice", "Sqrt", "Squeeze", "Sub", "Transpose",
        "Unsqueeze", "Where", "Relu", "Sigmoid", "Tanh", "Clip", "Pad",
    }
)  # fmt: skip


@dataclass
class OnnxGraph:
    """The part of an ONNX graph left to lower, with shapes and constants."""

    nodes: list[onnx.NodeProto]
    constants: dict[str, np.ndarray]
    shapes: dict[str, tuple[int, ...]]
    dynamic: dict[str, tuple[bool, ...]]
    inputs: list[str]
    outputs: list[str]
    opset: int
    batch_tainted: set[str] = field(default_factory=set)

    def signature(self, name: str) -> tuple[int, ...]:
        """Shape of ``name`` with -1 where it follows the batch size."""
        return tuple(
            -1 if d else s for s, d in zip(self.shapes[name], self.dynamic[name], strict=False)
        )


def _default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    raise InvalidModelError("the model imports no default ONNX opset")


def _fix_batch(model: onnx.ModelProto, batch: int, initializers: set[str]) -> onnx.ModelProto:
    fixed = copy.deepcopy(model)
    for vi in fixed.graph.input:
        if vi.name in initializers:
            continue
        if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
            raise UnsupportedShapeError(
                f"input {vi.name!r} has no shape; export the model with input shapes"
            )
        dims = vi.type.tensor_type.shape.dim
        for axis, dim in enumerate(dims):
            if dim.HasField("dim_value") and dim.dim_value == 0:
                raise UnsupportedShapeError(_zero_size(f"input {vi.name!r}", _dims(dims)))
            if dim.HasField("dim_value") and dim.dim_value > 0:
                continue
            if axis != 0:
                raise UnsupportedShapeError(
                    f"input {vi.name!r} has a dynamic dimension at axis {axis}; only the "
                    "batch dimension (axis 0) may be dynamic. Export with fixed sizes there."
                )
            dim.Clear()
            dim.dim_value = batch
    return fixed


def _dims(dims) -> list[int | str]:  # type: ignore[no-untyped-def]
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]


def _zero_size(what: str, shape: object) -> str:
    return (
        f"{what} has a zero-size dimension (shape {shape}); a TFLite model cannot hold "
        "empty tensors. Remove the empty tensor from the model, or deploy it to an ONNX "
        "target"
    )


def _inferred_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    except Exception as e:  # onnx raises InferenceError and a few others
        raise InvalidModelError(f"ONNX shape inference failed: {e}") from e
    shapes: dict[str, tuple[int, ...]] = {}
    graph = inferred.graph
    for vi in [*graph.input, *graph.value_info, *graph.output]:
        t = vi.type.tensor_type
        if not t.HasField("shape"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
        if all(d >= 0 for d in dims):
            shapes[vi.name] = tuple(dims)
    return shapes


def _evaluate(node: onnx.NodeProto, args: list[np.ndarray | None], opset: int) -> list[np.ndarray]:
    from onnx.reference import ReferenceEvaluator

    feeds = {name: value for name, value in zip(node.input, args, strict=False) if name}
    try:
        outs = ReferenceEvaluator(node, opsets={"": opset}).run(None, feeds)
    except Exception as e:
        raise InvalidModelError(
            f"could not evaluate constant node {node.name!r} ({node.op_type}): {e}"
        ) from e
    return [np.asarray(o) for o in outs]


def _shape_node(node: onnx.NodeProto, shape: tuple[int, ...], dyn: tuple[bool, ...]):
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    start, end = attrs.get("start", 0), attrs.get("end", len(shape))
    sl = slice(start, end)
    return np.asarray(shape[sl], dtype=np.int64), any(dyn[sl])


def fold_constants(
    model: onnx.ModelProto,
    shapes: dict[str, tuple[int, ...]],
    dynamic: dict[str, tuple[bool, ...]],
    opset: int,
) -> tuple[list[onnx.NodeProto], dict[str, np.ndarray], set[str]]:
    """Evaluate constant subgraphs. Returns (remaining nodes, constants, batch-tainted)."""
    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    tainted: set[str] = set()
    remaining: list[onnx.NodeProto] = []
    for node in model.graph.node:
        ins = [i for i in node.input if i]
        if node.op_type == "Constant":
            consts[node.output[0]] = _evaluate(node, [], opset)[0]
        elif node.op_type == "Shape" and node.input[0] in shapes:
            value, is_dynamic = _shape_node(node, shapes[node.input[0]], dynamic[node.input[0]])
            consts[node.output[0]] = value
            if is_dynamic:
                tainted.add(node.output[0])
        elif node.op_type in FOLDABLE_OPS and all(i in consts for i in ins):
            outs = _evaluate(node, [consts[i] if i else None for i in node.input], opset)
            for name, value in zip(node.output, outs, strict=False):
                consts[name] = value
                if any(i in tainted for i in ins):
                    tainted.add(name)
        else:
            remaining.append(node)
    return remaining, consts, tainted


def _consumers(nodes: list[onnx.NodeProto]) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for n in nodes:
        for i in n.input:
            out.setdefault(i, []).append(n)
    return out


def fold_batch_norm(graph: OnnxGraph) -> None:
    """Fold ``Conv -> BatchNormalization`` pairs into one ``Conv`` (in place)."""
    producers = {o: n for n in graph.nodes for o in n.output}
    consumers = _consumers(graph.nodes)
    removed: set[int] = set()
    replaced: dict[int, onnx.NodeProto] = {}
    for bn in graph.nodes:
        if bn.op_type != "BatchNormalization" or len(bn.output) != 1:
            continue
        conv = producers.get(bn.input[0])
        if conv is None or conv.op_type != "Conv" or conv.input[1] not in graph.constants:
            continue
        if len(conv.input) > 2 and conv.input[2] and conv.input[2] not in graph.constants:
            continue
        if len(consumers.get(conv.output[0], [])) != 1 or conv.output[0] in graph.outputs:
            continue
        if not all(i in graph.constants for i in bn.input[1:5]):
            continue
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        gamma, beta, mean, var = (graph.constants[i].astype(np.float64) for i in bn.input[1:5])
        w = graph.constants[conv.input[1]].astype(np.float64)
        has_bias = len(conv.input) > 2 and bool(conv.input[2])
        b = graph.constants[conv.input[2]].astype(np.float64) if has_bias else 0.0
        scale = gamma / np.sqrt(var + eps)
        w_name, b_name = f"{conv.name or conv.output[0]}__bn_w", f"{bn.output[0]}__bn_b"
        graph.constants[w_name] = (w * scale.reshape((-1,) + (1,) * (w.ndim - 1))).astype(
            np.float32
        )
        graph.constants[b_name] = ((b - mean) * scale + beta).astype(np.float32)
        fused = helper.make_node(
            "Conv", [conv.input[0], w_name, b_name], [bn.output[0]], name=conv.name
        )
        fused.attribute.extend(conv.attribute)
        replaced[id(conv)] = fused
        removed.add(id(bn))
    graph.nodes = [replaced.get(id(n), n) for n in graph.nodes if id(n) not in removed]


def load_graph(model: onnx.ModelProto) -> OnnxGraph:
    """Shape-infer, constant-fold and BN-fold ``model`` (which is not modified)."""
    opset = _default_opset(model)
    init_names = {t.name for t in model.graph.initializer}
    inputs = [vi.name for vi in model.graph.input if vi.name not in init_names]
    outputs = [vi.name for vi in model.graph.output]
    one = _inferred_shapes(_fix_batch(model, 1, init_names))
    try:
        two = _inferred_shapes(_fix_batch(model, 2, init_names))
    except InvalidModelError:
        two = one  # the graph only works at batch 1 (e.g. a hard-coded reshape)
    dynamic = {
        name: tuple(a != b for a, b in zip(s, two.get(name, s), strict=False))
        for name, s in one.items()
    }
    nodes, consts, tainted = fold_constants(model, one, dynamic, opset)
    for name in outputs:
        if name in consts:
            raise UnsupportedShapeError(f"output {name!r} is a constant; nothing to convert")
    graph = OnnxGraph(nodes, consts, one, dynamic, inputs, outputs, opset, tainted)
    fold_batch_norm(graph)
    for node in graph.nodes:
        for pos, name in enumerate(node.input):
            zero_state = (  # torch's LSTM/GRU initial state: zeros shaped by the batch
                node.op_type in ("LSTM", "GRU")
                and pos in (5, 6)
                and name in consts
                and not consts[name].any()
            )
            if name in tainted and not (node.op_type == "Reshape" and pos == 1) and not zero_state:
                raise UnsupportedShapeError(
                    f"node {node.name!r} ({node.op_type}) uses {name!r}, a value computed "
                    "from the dynamic batch size; export with a fixed batch size or "
                    "flatten with Flatten/Reshape only"
                )
        for out in node.output:
            if out and 0 in one.get(out, ()):
                raise UnsupportedShapeError(
                    _zero_size(
                        f"{out!r} (output of node {node.name!r}, {node.op_type})", list(one[out])
                    )
                )
        first = next((o for o in node.output if o), node.output[0])  # LSTM may skip Y
        if first not in one:
            raise UnsupportedShapeError(
                f"ONNX shape inference gives no static shape for {first!r} "
                f"(output of node {node.name!r}, {node.op_type})"
            )
    return graph
