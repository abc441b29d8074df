"""What a quantization pass did: weights and operators changed, and the size change.

:func:`summarize_onnx` compares an ONNX model before and after
:func:`converters.quantize.apply_precision`; the TFLite writer reports its own
counts (:class:`converters.tflite.quantize.WeightReport`). A pass that changed
nothing (:attr:`QuantizationSummary.quantized` false) is refused by the pipeline
with :func:`nothing_quantized_reason`, unless the operator packs the float32 model
deliberately, labelled unquantized.

Counting rules (ONNX):

* a *weight* is an initializer with more than one element (scales and zero points
  are scalars); weights quantized = reduced-precision weights after the pass
  (int8, uint8, float16 and narrower);
* an *operator* is quantized when it reads a reduced-precision tensor, directly
  (``MatMulInteger``, float16 kernels) or through a ``DequantizeLinear`` (QDQ);
  the quantize/dequantize/cast nodes themselves are not counted.

An int8 variant (``int8-dynamic``, ``int8-static``, ``int8-full``) counts as quantized
only when its file holds int8 weights: ``int8_weights``, counted from the produced file
(:mod:`converters.int8_report`), must be above zero. Operators reading dequantized
activations alone do not make an int8 model, and a summary built without the count
is refused. ``weights_by_dtype`` records the file's weight tensors by element type before
and after, and ``nodes`` (ONNX int8) which nodes are int8 and which stayed float, and why.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .int8_report import NodeReport, RuntimeKernels

_REDUCED = {2, 3, 10, 16, 17, 18, 19, 20, 21, 22, 23}  # uint8 int8 float16 bfloat16 fp8 int4...
_FLOAT32 = 1
_PLUMBING = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "Cast"}


@dataclass(frozen=True)
class QuantizationSummary:
    """Counts and sizes of one quantized variant."""

    precision: str
    float_weights_before: int
    weights_quantized: int
    operators_quantized: int
    bytes_before: int
    bytes_after: int
    operator_types: tuple[str, ...] = ()
    packed_unquantized: bool = False
    int8_weights: int | None = None
    weights_by_dtype_before: dict[str, int] | None = None
    weights_by_dtype_after: dict[str, int] | None = None
    nodes: NodeReport | None = None
    runtime_kernels: tuple[RuntimeKernels, ...] = ()

    @property
    def is_int8(self) -> bool:
        return self.precision.startswith("int8")

    @property
    def quantized(self) -> bool:
        """Something was reduced; for int8, weights that are int8 in the file."""
        if self.is_int8:
            return (self.int8_weights or 0) > 0
        return self.weights_quantized > 0 or self.operators_quantized > 0

    @property
    def size_ratio(self) -> float:
        return self.bytes_after / self.bytes_before if self.bytes_before else 1.0

    def note(self) -> str:
        if self.is_int8 and self.weights_by_dtype_after is not None:
            return (
                f"{self.precision}: {self.int8_weights or 0} weight tensors int8 in the file "
                f"(weights by dtype {_dtypes(self.weights_by_dtype_before)} -> "
                f"{_dtypes(self.weights_by_dtype_after)}), {self.operators_quantized} "
                f"operators quantized; {self.bytes_before / 1024:.1f} KiB -> "
                f"{self.bytes_after / 1024:.1f} KiB (size ratio {self.size_ratio:.3f})"
            )
        return (
            f"{self.precision}: {self.weights_quantized} of {self.float_weights_before} float "
            f"weights and {self.operators_quantized} operators quantized; "
            f"{self.bytes_before / 1024:.1f} KiB -> {self.bytes_after / 1024:.1f} KiB "
            f"({100 * (self.size_ratio - 1):+.1f} %)"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "precision": self.precision,
            "quantized": self.quantized and not self.packed_unquantized,
            "float_weights_before": self.float_weights_before,
            "weights_quantized": self.weights_quantized,
            "operators_quantized": self.operators_quantized,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "size_ratio": round(self.size_ratio, 4),
            **({"packed_unquantized": True} if self.packed_unquantized else {}),
            **({"int8_weights": self.int8_weights} if self.int8_weights is not None else {}),
            **(
                {
                    "weights_by_dtype": {
                        "before": self.weights_by_dtype_before or {},
                        "after": self.weights_by_dtype_after,
                    }
                }
                if self.weights_by_dtype_after is not None
                else {}
            ),
            **({"nodes": self.nodes.to_json()} if self.nodes is not None else {}),
            **(
                {"runtime_kernels": [k.to_json() for k in self.runtime_kernels]}
                if self.runtime_kernels
                else {}
            ),
        }


def _weights(model: Any) -> Counter[int]:
    counts: Counter[int] = Counter()
    for t in model.graph.initializer:
        size = 1
        for d in t.dims:
            size *= int(d)
        if size > 1:
            counts[int(t.data_type)] += 1
    return counts


def value_types(model: Any) -> dict[str, int]:
    import onnx

    types = {t.name: int(t.data_type) for t in model.graph.initializer}
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # counting only; missing types mean fewer operators counted
        inferred = model
    for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        if vi.type.HasField("tensor_type"):
            types.setdefault(vi.name, int(vi.type.tensor_type.elem_type))
    return types


def quantized_operators(model: Any) -> list[str]:
    """Op types of the nodes that read a reduced-precision tensor (directly or via DQ)."""
    types = value_types(model)
    dequantized = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    found = []
    for node in model.graph.node:
        if node.op_type in _PLUMBING:
            continue
        if any(i in dequantized or types.get(i) in _REDUCED for i in node.input if i):
            found.append(node.op_type)
    return found


def summarize_onnx(
    before: Any,
    after: Any,
    precision: str,
    quantizable: tuple[str, ...] = (),
    quantizer: str = "the quantizer",
) -> QuantizationSummary:
    """Compare an ONNX model before and after a quantization pass.

    For int8, the weights quantized are the int8 data tensors of ``after``
    (:func:`~converters.int8_report.onnx_int8_weights`), not its zero-point vectors, and
    ``nodes`` classes its nodes (``quantizable``: the op types the pass, named
    ``quantizer`` in the report, had an int8 form for).
    """
    from .int8_report import onnx_int8_weights, onnx_node_report, onnx_weights_by_dtype

    w_before, w_after = _weights(before), _weights(after)
    ops = quantized_operators(after)
    int8 = precision.startswith("int8")
    int8_weights = onnx_int8_weights(after) - onnx_int8_weights(before) if int8 else None
    reduced = sum(n for t, n in w_after.items() if t in _REDUCED) - sum(
        n for t, n in w_before.items() if t in _REDUCED
    )
    return QuantizationSummary(
        precision=precision,
        float_weights_before=w_before.get(_FLOAT32, 0),
        weights_quantized=int8_weights if int8_weights is not None else reduced,
        operators_quantized=len(ops),
        bytes_before=before.ByteSize(),
        bytes_after=after.ByteSize(),
        operator_types=tuple(sorted(set(ops))),
        int8_weights=int8_weights,
        weights_by_dtype_before=onnx_weights_by_dtype(before),
        weights_by_dtype_after=onnx_weights_by_dtype(after),
        nodes=onnx_node_report(after, quantizable, quantizer) if int8 else None,
    )


def nothing_quantized_reason(summary: QuantizationSummary, model: Any | None = None) -> str:
    """Why a variant that changed nothing is refused, and what to do instead."""
    kinds = ""
    if model is not None:
        ops = sorted({n.op_type for n in model.graph.node})
        kinds = f" (its operators: {', '.join(ops[:8])}{', ...' if len(ops) > 8 else ''})"
    if summary.precision == "float16":
        why = (
            f"float16 found no float32 weights to convert in this model{kinds}; it would "
            "only round the inputs, with no size gain"
        )
    elif summary.precision == "int8-dynamic":
        why = (
            "dynamic int8 quantizes the weights of MatMul/Gemm (ONNX) or Conv/dense layers "
            f"(TFLite), and this model has none{kinds}; weights by dtype in the produced "
            f"file: {_dtypes(summary.weights_by_dtype_after)}"
        )
    elif summary.is_int8:
        why = (
            f"{summary.precision} left no weight of this model int8 in the produced file "
            f"(weights by dtype: {_dtypes(summary.weights_by_dtype_after)}){kinds}"
        )
    else:
        why = f"{summary.precision} changed no weight and no operator of this model{kinds}"
    return (
        f"{why}. The artifact would be the float32 model labelled {summary.precision}. Use "
        "the float32 target, or pass allow_unquantized (CLI: --allow-unquantized) to pack "
        "it labelled as unquantized"
    )


def _dtypes(counts: dict[str, int] | None) -> str:
    if not counts:
        return "none counted"
    return ", ".join(f"{k} {v}" for k, v in counts.items())
