"""Cases the ONNX node tests lack, by operator row (expected outputs from onnxruntime).

* ``Softmax``: every axis of rank-2, 3 and 4 inputs at opset 11 (the input is
  coerced to 2-D at ``axis``) and opset 13 (one axis); ONNX ships opset-13 cases only.
* ``Relu``: a zero-size dimension, which must be refused by name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .cases import NodeCase


def _single_node(op: str, name: str, x: np.ndarray, opset: int, **attrs: Any) -> NodeCase:
    import onnx
    from onnx import TensorProto, helper

    from .judge import _ort_runner

    node = helper.make_node(op, ["x"], ["y"], **attrs)
    graph = helper.make_graph(
        [node],
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    model.graph.output[0].CopyFrom(inferred.graph.output[0])
    expected = _ort_runner(model)({"x": x})
    return NodeCase(op, name, model, [x], expected, origin="edgefleet")


def softmax_cases() -> list[NodeCase]:
    rng = np.random.default_rng(11)
    shapes = {2: (3, 5), 3: (2, 3, 4), 4: (2, 3, 4, 5)}
    cases = []
    for opset in (11, 13):
        for rank, shape in shapes.items():
            x = rng.normal(0, 2, size=shape).astype(np.float32)
            for axis in range(-rank, rank):
                cases.append(
                    _single_node(
                        "Softmax",
                        f"edgefleet_softmax_opset{opset}_rank{rank}_axis{axis}",
                        x,
                        opset,
                        axis=axis,
                    )
                )
    return cases


def zero_size_cases() -> list[NodeCase]:
    return [_single_node("Relu", "edgefleet_relu_zero_size", np.zeros((2, 0, 4), np.float32), 13)]


#: Operator -> extra cases of its row.
EXTRA_CASES: dict[str, Callable[[], list[NodeCase]]] = {
    "Softmax": softmax_cases,
    "Relu": zero_size_cases,
}

# The forms exporters write of the operators added by [converters-reach] (extra_reach.py).
from .extra_reach import REACH_CASES  # noqa: E402

for _op, _make in REACH_CASES.items():
    EXTRA_CASES.setdefault(_op, _make)
