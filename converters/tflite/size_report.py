"""Where the bytes of a TFLite file go, read from the file itself.

    from converters.tflite.size_report import size_breakdown
    print(size_breakdown(data).summary())

A full-integer int8 file is a quarter of its float32 twin only where the weights are
most of the file. :func:`size_breakdown` splits a file into:

* ``weights``: constant data read as the weights of ``CONV_2D``, ``DEPTHWISE_CONV_2D``,
  ``FULLY_CONNECTED``, ``TRANSPOSE_CONV`` and ``BATCH_MATMUL``, by element type;
* ``biases``: their bias inputs, by element type;
* ``other_constants``: every other constant (shape vectors, axes, the operands of
  arithmetic on constants), by element type;
* ``quantization``: the scale (float32) and zero point (int64) vectors of quantized
  tensors, split into ``weights``, ``biases``, ``other constants`` and ``activations``
  (12 bytes per value: per-channel weights and their biases carry one per channel);
* ``rest``: what remains: the flatbuffer tables of tensors, operators and buffers,
  shapes, names, signature, alignment.

A buffer several tensors share is counted once.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import tflite

Op = tflite.BuiltinOperator

#: weighted operator -> (weight input, bias input)
_WEIGHTED = {
    Op.CONV_2D: (1, 2),
    Op.DEPTHWISE_CONV_2D: (1, 2),
    Op.FULLY_CONNECTED: (1, 2),
    Op.TRANSPOSE_CONV: (1, 3),
    Op.BATCH_MATMUL: (1, -1),
}
_DTYPES = {v: k.lower() for k, v in vars(tflite.TensorType).items() if k.isupper()}


@dataclass
class SizeBreakdown:
    """Bytes of one TFLite file by what they hold (see the module docstring)."""

    total: int
    weights: dict[str, int] = field(default_factory=dict)
    biases: dict[str, int] = field(default_factory=dict)
    other_constants: dict[str, int] = field(default_factory=dict)
    quantization: dict[str, int] = field(default_factory=dict)
    tensors: int = 0
    operators: int = 0

    @property
    def rest(self) -> int:
        counted = sum(
            sum(d.values())
            for d in (self.weights, self.biases, self.other_constants, self.quantization)
        )
        return self.total - counted

    def summary(self) -> str:
        def part(d: dict[str, int]) -> str:
            return ", ".join(f"{k} {v:,}" for k, v in sorted(d.items(), key=lambda kv: -kv[1]))

        return (
            f"{self.total:,} B: weights {part(self.weights) or '0'}; biases "
            f"{part(self.biases) or '0'}; other constants {part(self.other_constants) or '0'}; "
            f"quantization parameters {part(self.quantization) or '0'}; tables, shapes and "
            f"names of {self.tensors} tensors and {self.operators} operators {self.rest:,}"
        )


def size_breakdown(data: bytes) -> SizeBreakdown:
    """Split TFLite file ``data`` (subgraph 0) into weights, biases, other constants,
    quantization parameters and the rest."""
    model = tflite.Model.GetRootAsModel(data, 0)
    graph = model.Subgraphs(0)
    role: dict[int, str] = {}
    for k in range(graph.OperatorsLength()):
        op = graph.Operators(k)
        code = model.OperatorCodes(op.OpcodeIndex()).BuiltinCode()
        w, b = _WEIGHTED.get(code, (-2, -2))
        for pos in range(op.InputsLength()):
            i = op.Inputs(pos)
            if i >= 0 and i not in role:
                role[i] = "weights" if pos == w else "biases" if pos == b else "other constants"
    out = SizeBreakdown(
        total=len(data), tensors=graph.TensorsLength(), operators=graph.OperatorsLength()
    )
    parts = {"weights": out.weights, "biases": out.biases, "other constants": out.other_constants}
    quant: dict[str, int] = defaultdict(int)
    seen: set[int] = set()
    for i in range(graph.TensorsLength()):
        t = graph.Tensors(i)
        length = model.Buffers(t.Buffer()).DataLength() if t.Buffer() else 0
        kind = role.get(i, "other constants") if length else "activations"
        if length and t.Buffer() not in seen:
            seen.add(t.Buffer())
            target = parts[kind]
            dtype = _DTYPES.get(t.Type(), str(t.Type()))
            target[dtype] = target.get(dtype, 0) + length
        q = t.Quantization()
        if q is not None and q.ScaleLength():
            quant[kind] += 4 * q.ScaleLength() + 8 * q.ZeroPointLength()
    out.quantization = dict(quant)
    return out
