"""Conformance cases: ONNX's own node test cases, plus rows' extra cases, and their variants.

A :class:`NodeCase` is one model with its inputs and expected outputs. ONNX's
node test cases come from :mod:`onnx.backend.test.case.node`: only the modules
that build a node of a wanted operator are imported (importing all of them
evaluates every operator's reference, about 25 s), and the function-expanded
copies (``*_expanded``) are left out, since they test other operators.

:func:`variants` derives the models the converters are run on:

``shipped``
    the case as ONNX ships it: every node input is a graph input;
``initializers``
    every input after the first is an initializer (how real models carry weights);
``nhwc``
    as ``initializers``, with the first input (a rank-4 float tensor) coming out of
    a depthwise 1x1 convolution of weight 1, so the operator reads the TFLite
    writer's internal NHWC layout (exact: ``x * 1 + 0``, infinities included).

Each variant exists with the shipped shapes (checked against ONNX's expected
outputs) and with a dynamic first dimension on the first input (run at batch 1
and 2, checked against onnxruntime on the unconverted variant).
"""

from __future__ import annotations

import copy
import importlib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

BATCH_DIM = "N"


@dataclass
class NodeCase:
    """One model with its inputs (graph input order) and expected outputs."""

    op: str
    name: str
    model: Any
    inputs: list[np.ndarray]
    outputs: list[np.ndarray]
    rtol: float = 1e-3
    atol: float = 1e-7
    origin: str = "onnx"


@dataclass
class Variant:
    """A model derived from a case; ``feeds`` are its graph inputs' arrays by name."""

    case: NodeCase
    name: str
    model: Any
    feeds: dict[str, np.ndarray]
    first: str
    notes: list[str] = field(default_factory=list)


def _as_array(value: Any) -> np.ndarray | None:
    from onnx import TensorProto, numpy_helper

    if isinstance(value, TensorProto):
        return np.asarray(numpy_helper.to_array(value))
    if isinstance(value, (np.ndarray, np.generic, bool, int, float)):
        return np.asarray(value)
    return None  # sequences, optionals: not tensors


def _node_case_modules(ops: Iterable[str]) -> list[str]:
    import onnx.backend.test.case.node as node_pkg

    folder = Path(node_pkg.__file__).parent
    patterns = [re.compile(rf"make_node\(\s*[\"']{re.escape(op)}[\"']") for op in ops]
    found = []
    for path in sorted(folder.glob("*.py")):
        text = path.read_text(encoding="utf-8")
        if any(p.search(text) for p in patterns):
            found.append(f"{node_pkg.__name__}.{path.stem}")
    return found


_COLLECTED: dict[str, list[Any]] = {}


def _raw_onnx_cases(ops: Iterable[str]) -> list[Any]:
    """ONNX ``TestCase`` objects from the modules that build a node of ``ops``."""
    import onnx.backend.test.case.node as node_pkg

    wanted = [m for m in _node_case_modules(ops) if m not in _COLLECTED]
    node_pkg._TargetOpType = None  # type: ignore[attr-defined]
    for module in wanted:
        start = len(node_pkg._NodeTestCases)
        with np.errstate(all="ignore"):
            importlib.import_module(module)
        _COLLECTED[module] = list(node_pkg._NodeTestCases[start:])
    out: list[Any] = []
    for module in _node_case_modules(ops):
        out.extend(_COLLECTED.get(module, []))
    return out


def onnx_cases(op: str) -> list[NodeCase]:
    """ONNX's node test cases of ``op`` (single node of that type, tensors only)."""
    cases = []
    for tc in _raw_onnx_cases([op]):
        graph = tc.model.graph
        if tc.name.endswith("_expanded") or "_expanded_" in tc.name:
            continue
        if len(graph.node) != 1 or graph.node[0].op_type != op:
            continue
        if graph.node[0].domain not in ("", "ai.onnx"):
            continue
        for inputs, outputs in tc.data_sets:
            maybe_ins = [_as_array(v) for v in inputs]
            maybe_outs = [_as_array(v) for v in outputs]
            ins = [v for v in maybe_ins if v is not None]
            outs = [v for v in maybe_outs if v is not None]
            if len(ins) != len(maybe_ins) or len(outs) != len(maybe_outs):
                continue
            cases.append(
                NodeCase(
                    op,
                    tc.name,
                    tc.model,
                    ins,
                    outs,
                    float(tc.rtol),
                    float(tc.atol),
                    "onnx",
                )
            )
    return cases


# -- variants -------------------------------------------------------------------------------


def _graph_inputs(model: Any) -> list[Any]:
    inits = {t.name for t in model.graph.initializer}
    return [vi for vi in model.graph.input if vi.name not in inits]


def _feeds(case: NodeCase) -> dict[str, np.ndarray]:
    names = [vi.name for vi in _graph_inputs(case.model)]
    return dict(zip(names, case.inputs, strict=False))


def shipped(case: NodeCase) -> Variant:
    feeds = _feeds(case)
    return Variant(case, "shipped", copy.deepcopy(case.model), feeds, next(iter(feeds), ""))


def with_initializers(case: NodeCase) -> Variant:
    """Every graph input after the first becomes an initializer."""
    from onnx import numpy_helper

    model = copy.deepcopy(case.model)
    feeds = _feeds(case)
    names = list(feeds)
    keep = names[:1]
    for name in names[1:]:
        model.graph.initializer.append(numpy_helper.from_array(feeds[name], name))
    kept = [vi for vi in model.graph.input if vi.name in keep]
    del model.graph.input[:]
    model.graph.input.extend(kept)
    return Variant(
        case, "initializers", model, {n: feeds[n] for n in keep}, keep[0] if keep else ""
    )


def behind_conv(case: NodeCase) -> Variant | None:
    """``initializers`` with the first input produced by a depthwise 1x1 conv (weight 1)."""
    from onnx import TensorProto, helper, numpy_helper

    base = with_initializers(case)
    if not base.first:
        return None
    x = base.feeds[base.first]
    if x.dtype != np.float32 or x.ndim != 4 or x.shape[1] == 0:
        return None
    model = base.model
    vi = next(v for v in model.graph.input if v.name == base.first)
    raw = f"{base.first}__raw"
    channels = int(x.shape[1])
    weight = np.ones((channels, 1, 1, 1), dtype=np.float32)
    bias = np.zeros((channels,), dtype=np.float32)
    model.graph.initializer.extend(
        [numpy_helper.from_array(weight, f"{raw}__w"), numpy_helper.from_array(bias, f"{raw}__b")]
    )
    conv = helper.make_node(
        "Conv",
        [raw, f"{raw}__w", f"{raw}__b"],
        [base.first],
        name="conformance_conv",
        kernel_shape=[1, 1],
        group=channels,
    )
    model.graph.node.insert(0, conv)
    new_vi = helper.make_tensor_value_info(raw, TensorProto.FLOAT, list(x.shape))
    vi.CopyFrom(new_vi)
    return Variant(case, "nhwc", model, {raw: x}, raw)


VARIANTS: dict[str, Callable[[NodeCase], Variant | None]] = {
    "shipped": shipped,
    "initializers": with_initializers,
    "nhwc": behind_conv,
}


def dynamic_batch(variant: Variant) -> Any | None:
    """The variant's model with a dynamic first dimension on its first input.

    Output shapes are cleared (element types kept) so shape inference re-derives them.
    """
    model = copy.deepcopy(variant.model)
    vi = next((v for v in model.graph.input if v.name == variant.first), None)
    if vi is None or not vi.type.HasField("tensor_type"):
        return None
    dims = vi.type.tensor_type.shape.dim
    if len(dims) == 0:
        return None
    dims[0].Clear()
    dims[0].dim_param = BATCH_DIM
    for out in model.graph.output:
        if out.type.HasField("tensor_type"):
            out.type.tensor_type.ClearField("shape")
    del model.graph.value_info[:]
    return model


def at_batch(variant: Variant, batch: int) -> dict[str, np.ndarray]:
    """The variant's feeds with the first input cut or tiled to ``batch`` rows."""
    feeds = dict(variant.feeds)
    x = feeds[variant.first]
    if x.shape[0] == 0:
        return feeds
    reps = -(-batch // x.shape[0])
    tiled = np.concatenate([x] * reps, axis=0) if reps > 1 else x
    feeds[variant.first] = np.ascontiguousarray(tiled[:batch])
    return feeds
