"""Checks every converter path makes on an ONNX graph before producing an artifact.

:func:`check_inference_mode` refuses a model that would behave randomly on a
device: a ``Dropout`` whose ``training_mode`` input is not a constant false
(torch exports one when the module was left in training mode).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .errors import TrainingModeError


def dropout_training_problem(node: Any, constants: Mapping[str, Any]) -> str | None:
    """Why ``node`` (a Dropout) may run in training mode, or None.

    ``constants`` maps value names to arrays (initializers, folded constants).
    """
    if len(node.input) < 3 or not node.input[2]:
        return None
    mode = node.input[2]
    if mode not in constants:
        return (
            f"its training_mode comes from {mode!r}, not a constant false, so it "
            "may zero values at random"
        )
    if bool(np.asarray(constants[mode]).reshape(-1)[0]):
        return "training_mode=True: it zeroes values at random on every run"
    return None


def check_inference_mode(model: Any) -> None:
    """Raise :class:`TrainingModeError` for a Dropout that may run in training mode."""
    from onnx import numpy_helper

    graph = model.graph
    constants: dict[str, Any] = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            from onnx.reference import ReferenceEvaluator

            try:
                values: list[Any] = list(ReferenceEvaluator(node).run(None, {}))
                constants[str(node.output[0])] = values[0]
            except Exception:  # a Constant the evaluator cannot read: not a training flag
                continue
        if node.op_type == "Dropout" and node.domain in ("", "ai.onnx"):
            problem = dropout_training_problem(node, constants)
            if problem:
                raise TrainingModeError(training_message(node, problem))


def training_message(node: Any, problem: str) -> str:
    """The refusal text for a Dropout in training mode."""
    return (
        f"Dropout node {node.name or node.output[0]!r}: {problem}. Export the model in "
        "inference mode (torch: call model.eval() before exporting)"
    )
