"""Peephole passes over a :class:`~converters.tflite.builder.ModelSpec`."""

from __future__ import annotations

from collections import Counter

import tflite

from converters.tflite.builder import ModelSpec

Op = tflite.BuiltinOperator
Act = tflite.ActivationFunctionType

_FUSABLE_ACTIVATIONS = {Op.RELU: Act.RELU, Op.RELU6: Act.RELU6, Op.RELU_N1_TO_1: Act.RELU_N1_TO_1}
_WITH_FUSED_ACTIVATION = {
    Op.ADD, Op.MUL, Op.CONV_2D, Op.DEPTHWISE_CONV_2D, Op.FULLY_CONNECTED,
    Op.AVERAGE_POOL_2D, Op.MAX_POOL_2D, Op.CONCATENATION,
}  # fmt: skip


def fuse_activations(spec: ModelSpec) -> None:
    """Fold a RELU/RELU6/RELU_N1_TO_1 into the op before it, when nothing else reads
    that op's output (in place). This is what TensorFlow's converter emits too."""
    readers = Counter(i for op in spec.operators for i in op.inputs)
    producer = {out: op for op in spec.operators for out in op.outputs}
    removed = set()
    for act in spec.operators:
        if act.code not in _FUSABLE_ACTIVATIONS:
            continue
        src = act.inputs[0]
        prev = producer.get(src)
        if (
            prev is None
            or prev.code not in _WITH_FUSED_ACTIVATION
            or prev.options is None
            or prev.options[1].get("FusedActivationFunction", 0) != Act.NONE
            or readers[src] != 1
            or src in spec.outputs
        ):
            continue
        prev.options[1]["FusedActivationFunction"] = _FUSABLE_ACTIVATIONS[act.code]
        prev.outputs = list(act.outputs)
        producer[act.outputs[0]] = prev
        removed.add(id(act))
    spec.operators = [op for op in spec.operators if id(op) not in removed]
