"""ONNX quantization: dynamic int8, static int8 (QDQ) from calibration samples, float16.

All three use onnxruntime's own tools, so the result runs on onnxruntime's
CPU kernels. Inputs and outputs stay float32 in every variant, so the
device-side interface (and the smoke samples' dtypes) does not change.
Operators outside the tools' reach (for example ``ai.onnx.ml`` tree
ensembles) stay in float32; the notes returned say how many weights changed.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from .errors import QuantizationError

STATIC_BATCH = 16


def _summary(before: Any, after: Any) -> str:
    from .int8_report import onnx_weights_by_dtype

    b, a = onnx_weights_by_dtype(before), onnx_weights_by_dtype(after)
    parts = [f"{k} {b.get(k, 0)}->{a.get(k, 0)}" for k in sorted(set(b) | set(a))]
    return "weights by dtype: " + ", ".join(parts)


def _via_file(fn: Any, model: Any) -> Any:
    """Run ``fn(path)`` (which writes a model to ``path``) and load the result.

    onnxruntime's quantization tools log advice on the root logger; it is muted here.
    """
    import onnx

    fd, out = tempfile.mkstemp(suffix=".onnx", prefix="edgefleet-q-")
    os.close(fd)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        fn(out)
        return onnx.load(out)
    finally:
        root.setLevel(level)
        os.unlink(out)


# Dynamic quantization covers dense layers only: ConvInteger with int8 weights
# has no CPU kernel before onnxruntime 1.17 (static int8 is the path for CNNs).
DYNAMIC_OPS = ["MatMul", "Gemm"]

# Kept in float32 by the float16 conversion besides the tool's defaults:
# onnxruntime < 1.17 expands a float16 Softmax at opset >= 18 through an invalid
# function body and refuses the model; softmax in float32 is also more accurate.
FLOAT16_BLOCKED = ["Softmax", "LogSoftmax"]


def static_quantizable_ops() -> tuple[str, ...]:
    """Op types onnxruntime's static quantizer has an int8 form for (its default set)."""
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    return tuple(sorted(set(QLinearOpsRegistry) | set(QDQRegistry)))


#: how the float-node report names each ONNX int8 pass
QUANTIZER_NAMES = {
    "int8-dynamic": "dynamic int8 (MatMul/Gemm only)",
    "int8-static": "onnxruntime's static quantizer",
}


def quantizable_ops(precision: str) -> tuple[str, ...]:
    """Op types the ``precision`` pass can make int8 (empty for float precisions)."""
    if precision == "int8-dynamic":
        return tuple(DYNAMIC_OPS)
    if precision == "int8-static":
        return static_quantizable_ops()
    return ()


def quantize_dynamic_int8(model: Any) -> tuple[Any, list[str]]:
    """Dense-layer weights to int8, activations quantized at run time (MatMul, Gemm)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    try:
        out = _via_file(
            lambda path: quantize_dynamic(
                model,
                path,
                weight_type=QuantType.QInt8,
                op_types_to_quantize=DYNAMIC_OPS,
                extra_options={"DefaultTensorType": 1},
            ),
            model,
        )
    except Exception as e:
        raise QuantizationError(f"dynamic int8 quantization failed: {e}") from e
    return out, [f"dynamic int8 ({_summary(model, out)})"]


class SampleReader:
    """A :class:`onnxruntime.quantization.CalibrationDataReader` over sample arrays.

    Yields the samples in batches of ``batch`` along the first axis.
    """

    def __init__(self, samples: Mapping[str, np.ndarray], batch: int = STATIC_BATCH) -> None:
        self.samples = {k: np.asarray(v) for k, v in samples.items()}
        self.batch = batch
        self._iter: Iterator[dict[str, np.ndarray]] = self._batches()

    def _batches(self) -> Iterator[dict[str, np.ndarray]]:
        n = len(next(iter(self.samples.values())))
        for start in range(0, n, self.batch):
            yield {k: v[start : start + self.batch] for k, v in self.samples.items()}

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._iter, None)

    def rewind(self) -> None:
        self._iter = self._batches()


def quantize_static_int8(model: Any, samples: Mapping[str, np.ndarray]) -> tuple[Any, list[str]]:
    """Weights and activations to int8 (QDQ format), ranges from calibration samples.

    Weights of Conv, ConvTranspose, MatMul and Gemm per channel (int8, symmetric),
    biases int32, activations int8 with ranges from min/max over ``samples`` (fed
    :data:`STATIC_BATCH` at a time through a ``CalibrationDataReader``).
    """
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    if not samples:
        raise QuantizationError("static int8 quantization needs calibration samples")
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(SampleReader, CalibrationDataReader):
        pass

    reader = _Reader(samples)
    try:
        out = _via_file(
            lambda path: quantize_static(
                model,
                path,
                reader,
                quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                per_channel=True,
                extra_options={"ActivationSymmetric": False},
            ),
            model,
        )
    except Exception as e:
        raise QuantizationError(
            f"static int8 quantization failed: {e}; check that the calibration samples "
            "match the model's inputs"
        ) from e
    from .onnx_tools import drop_value_info

    n = len(next(iter(samples.values())))
    renamed = compact_qdq_names(out)
    drop_value_info(out)  # onnxruntime infers them at load
    return out, [
        f"static int8 QDQ, {n} calibration samples ({_summary(model, out)}); "
        f"{renamed} quantizer-made names shortened"
    ]


def compact_qdq_names(model: Any) -> int:
    """Give the tensors and nodes the static quantizer added short names, in place.

    The quantizer names each QuantizeLinear / DequantizeLinear, its output, scale, zero
    point and quantized weight after the tensor it quantizes
    (``/blocks/blocks.0/c1/Conv_output_0_DequantizeLinear_Output``); on a small network
    these strings outweigh the int8 weights (EfficientNet-B0 at the zoo's width: 125 KB of
    names against 51 KB of weights). They become ``q0``, ``q1``, ... ; the computing
    nodes, their own tensors and the graph's inputs and outputs keep their names. A graph
    with subgraphs (If, Loop) is left as it is. Returns the number of names changed.
    """
    graph = model.graph
    if any(a.type in (5, 10) for n in graph.node for a in n.attribute):  # GRAPH, GRAPHS
        return 0
    keep = {v.name for v in (*graph.input, *graph.output)}
    added: list[str] = []
    for node in graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        added.extend(node.output)
        added.extend(node.input[1:3])
        if node.op_type == "DequantizeLinear":
            added.append(node.input[0])
    initializers = {t.name for t in graph.initializer}
    produced_by_qdq = {
        o
        for n in graph.node
        if n.op_type in ("QuantizeLinear", "DequantizeLinear")
        for o in n.output
    }
    rename: dict[str, str] = {}
    for name in added:
        if not name or name in keep or name in rename:
            continue
        if name in initializers or name in produced_by_qdq:
            rename[name] = f"q{len(rename)}"
    if not rename:
        return 0
    for node in graph.node:
        node.input[:] = [rename.get(i, i) for i in node.input]
        node.output[:] = [rename.get(o, o) for o in node.output]
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            node.name = rename.get(node.output[0], node.output[0])
    for t in graph.initializer:
        t.name = rename.get(t.name, t.name)
    for vi in graph.value_info:
        vi.name = rename.get(vi.name, vi.name)
    return len(rename)


def convert_float16(model: Any) -> tuple[Any, list[str]]:
    """Weights and compute to float16; float32 inputs/outputs kept (Cast at the edges)."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    from .onnx_tools import toposort

    try:
        out = convert_float_to_float16(
            model,
            keep_io_types=True,
            op_block_list=list(DEFAULT_OP_BLOCK_LIST) + FLOAT16_BLOCKED,
        )
        toposort(out)
    except Exception as e:
        raise QuantizationError(f"float16 conversion failed: {e}") from e
    return out, [f"float16 ({_summary(model, out)})"]


def apply_precision(
    model: Any, precision: str, samples: Mapping[str, np.ndarray]
) -> tuple[Any, list[str]]:
    """Turn a float32 ONNX model into ``precision`` (see :data:`converters.targets.PRECISIONS`)."""
    from .onnx_tools import drop_value_info

    if precision == "float32":
        return model, []
    drop_value_info(model)
    if precision == "float16":
        return convert_float16(model)
    if precision == "int8-dynamic":
        return quantize_dynamic_int8(model)
    if precision == "int8-static":
        return quantize_static_int8(model, samples)
    raise QuantizationError(f"unknown precision {precision!r}")
