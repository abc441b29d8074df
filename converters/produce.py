"""Producing one artifact's model file for a target (the first step of the pipeline).

* ONNX targets: :func:`float32_onnx_for` (inference-mode check, lowering to the
  target runtime's IR/opsets, offline optimization), then the target precision
  (:mod:`converters.quantize`);
* TFLite targets: the ONNX -> TFLite writer with the precision's weight mode, or a
  TFLite source passed through.

Every quantized variant comes with a
:class:`~converters.quantization_report.QuantizationSummary`. One that changed
nothing is refused (:class:`~converters.errors.NothingQuantizedError`) unless
``allow_unquantized``: then the float32 model is produced instead and the
summary says ``packed_unquantized``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from . import onnx_tools
from .errors import ConverterError, NothingQuantizedError, TargetError, TargetUnavailableError
from .graph_checks import check_inference_mode
from .int8_report import (
    PLATFORMS,
    onnx_runtime_kernels,
    tflite_int8_weights,
    tflite_weights_by_dtype,
)
from .quantization_report import QuantizationSummary, nothing_quantized_reason, summarize_onnx
from .quantize import QUANTIZER_NAMES, apply_precision, quantizable_ops
from .source import SourceModel
from .targets import Target

TFLITE_WEIGHTS = {"float32": "float32", "float16": "float16", "int8-dynamic": "int8"}


@dataclass
class Produced:
    """A model file and what was done to make it."""

    data: bytes
    notes: list[str] = field(default_factory=list)
    quantization: QuantizationSummary | None = None

    @property
    def precision_packed(self) -> str | None:
        """``"float32"`` when a quantized target was packed unquantized, else None."""
        q = self.quantization
        return "float32" if q is not None and q.packed_unquantized else None


def float32_onnx_for(
    model: Any, max_ir: int | None, max_opset: int | None, max_ml: int | None = None
) -> tuple[Any, list[str]]:
    """The float32 ONNX model an ONNX target gets: checked for inference mode,
    lowered to the limits, optimized offline. Returns (model, notes)."""
    check_inference_mode(model)
    model = onnx_tools.loadable_by_installed_ort(model)
    model, notes = onnx_tools.lower(model, max_ir, max_opset, max_ml)
    model = onnx_tools.optimize(model)
    notes.append("optimized (onnxruntime basic level)")
    return model, notes


def _finish_onnx(model: Any, target: Target) -> bytes:
    import onnx

    max_ir, max_opset, _ = target.limits
    final_opset = onnx_tools.opsets(model).get("", 0)
    if max_opset is not None and final_opset > max_opset:
        raise TargetError(
            f"{target.precision} needs opset {final_opset}, the target allows {max_opset}; "
            "choose float32 or a newer runtime for this device class"
        )
    if max_ir is not None:
        onnx_tools.set_ir_version(model, max_ir)
    try:
        onnx.checker.check_model(model)
    except Exception as e:
        raise TargetError(f"the produced ONNX model does not pass the checker: {e}") from e
    return bytes(model.SerializeToString())


def _unquantized(summary: QuantizationSummary, model: Any, allow: bool) -> QuantizationSummary:
    if not allow:
        raise NothingQuantizedError(nothing_quantized_reason(summary, model), summary)
    return replace(summary, packed_unquantized=True)


def onnx_artifact(
    source: SourceModel,
    target: Target,
    samples: Mapping[str, np.ndarray],
    allow_unquantized: bool = False,
) -> Produced:
    """The ONNX model file for ``target`` (precision applied and accounted for)."""
    import onnx
    from onnx import ModelProto

    if source.onnx_model is None:
        raise TargetError(
            f"a {source.origin} source can only produce TFLite targets (pass-through); "
            "convert the original model to get an ONNX artifact"
        )
    max_ir, max_opset, max_ml = target.limits
    model, notes = float32_onnx_for(source.onnx_model, max_ir, max_opset, max_ml)
    if target.precision == "float32":
        return Produced(_finish_onnx(model, target), notes)
    float32 = ModelProto()
    float32.CopyFrom(model)
    quantized, qnotes = apply_precision(model, target.precision, samples)
    data = _finish_onnx(quantized, target)
    # counted on the file as written, not on the tool's in-memory model
    summary = summarize_onnx(
        float32,
        onnx.load_from_string(data),
        target.precision,
        quantizable_ops(target.precision),
        QUANTIZER_NAMES.get(target.precision, "the quantizer"),
    )
    if not summary.quantized:
        summary = _unquantized(summary, float32, allow_unquantized)
        notes.append(
            f"{target.precision} changed nothing; packed the float32 model, labelled unquantized"
        )
        return Produced(_finish_onnx(float32, target), notes, summary)
    if summary.is_int8:
        kernels = (onnx_runtime_kernels(data, p) for p in PLATFORMS)
        summary = replace(summary, runtime_kernels=tuple(k for k in kernels if k is not None))
    notes.extend(qnotes)
    notes.append(summary.note())
    if summary.nodes is not None:
        notes.append(summary.nodes.note())
    notes.extend(k.note() for k in summary.runtime_kernels)
    return Produced(data, notes, summary)


def tflite_artifact(
    source: SourceModel,
    target: Target,
    allow_unquantized: bool = False,
    calibration: Mapping[str, np.ndarray] | None = None,
) -> Produced:
    """The TFLite model file for ``target`` (weights mode applied and accounted for).

    ``tflite:int8-full`` calibrates its activation ranges on ``calibration``.
    """
    if source.tflite_bytes is not None:
        if target.precision != "float32":
            raise TargetError(
                "a TFLite source is passed through as it is; re-quantizing it is not "
                "supported (target precision float32)"
            )
        return Produced(source.tflite_bytes, ["TFLite source passed through"])
    try:
        from converters.tflite import onnx_to_tflite_with_report
    except ImportError as e:
        raise TargetUnavailableError(
            "the ONNX -> TFLite writer (converters.tflite) is not available in this "
            "installation; target ONNX instead"
        ) from e
    assert source.onnx_model is not None
    check_inference_mode(source.onnx_model)
    model = onnx_tools.optimize(onnx_tools.loadable_by_installed_ort(source.onnx_model))
    if target.precision in ("int8-full", "int8-full-io"):
        return _tflite_int8_full(model, calibration, int8_io=target.precision == "int8-full-io")
    weights = TFLITE_WEIGHTS[target.precision]

    def write(mode: str) -> tuple[bytes, Any]:
        try:
            data, report = onnx_to_tflite_with_report(model, weights=mode)
        except ConverterError:
            raise
        except Exception as e:  # keep one error root for callers
            raise TargetError(f"ONNX -> TFLite conversion failed: {e}") from e
        return bytes(data), report

    data, report = write(weights)
    notes = [f"ONNX -> TFLite ({weights} weights)"]
    if weights == "float32":
        return Produced(data, notes)
    float32, _ = write("float32")
    int8 = target.precision.startswith("int8")
    summary = QuantizationSummary(
        precision=target.precision,
        float_weights_before=report.float_constants,
        weights_quantized=tflite_int8_weights(data) if int8 else report.constants_converted,
        operators_quantized=report.operators_changed,
        bytes_before=len(float32),
        bytes_after=len(data),
        int8_weights=tflite_int8_weights(data) if int8 else None,
        weights_by_dtype_before=tflite_weights_by_dtype(float32),
        weights_by_dtype_after=tflite_weights_by_dtype(data),
    )
    if not summary.quantized:
        summary = _unquantized(summary, model, allow_unquantized)
        notes.append(
            f"{target.precision} changed nothing; packed the float32 model, labelled unquantized"
        )
        return Produced(float32, notes, summary)
    notes.append(summary.note())
    return Produced(data, notes, summary)


def _tflite_int8_full(
    model: Any, calibration: Mapping[str, np.ndarray] | None, *, int8_io: bool = False
) -> Produced:
    """Full-integer int8 (:mod:`converters.tflite.quantize_full`), float32 I/O or, with
    ``int8_io``, int8 inputs and outputs (their scale and zero point go in the manifest from
    the file); the input and output quantization and any operator left in float are in the
    notes."""
    precision = "int8-full-io" if int8_io else "int8-full"
    from converters.tflite import onnx_to_tflite
    from converters.tflite.quantize_full import onnx_to_tflite_int8_full

    if not calibration:
        raise TargetError(
            f"tflite:{precision} calibrates activation ranges on samples; give --samples "
            "(representative inputs, 100 or more)"
        )
    try:
        data, report = onnx_to_tflite_int8_full(model, calibration, int8_io=int8_io)
        float32 = onnx_to_tflite(model)
    except ConverterError:
        raise
    except Exception as e:  # keep one error root for callers
        raise TargetError(f"ONNX -> TFLite {precision} conversion failed: {e}") from e
    before = tflite_weights_by_dtype(float32)
    summary = QuantizationSummary(
        precision=precision,
        float_weights_before=before.get("float32", 0),
        weights_quantized=tflite_int8_weights(data),
        operators_quantized=report.int8_operators,
        bytes_before=len(float32),
        bytes_after=len(data),
        operator_types=tuple(sorted(set(report.float_operators))),
        int8_weights=tflite_int8_weights(data),
        weights_by_dtype_before=before,
        weights_by_dtype_after=tflite_weights_by_dtype(data),
    )
    if not summary.quantized:
        raise NothingQuantizedError(nothing_quantized_reason(summary, model), summary)
    io = "; ".join(
        f"{q.name}: scale {q.scale:.6g}, zero point {q.zero_point}"
        for q in (*report.inputs, *report.outputs)
    )
    notes = [
        f"ONNX -> TFLite full-integer int8 ({report.calibration_samples} calibration samples)",
        summary.note(),
        (
            f"int8 inputs/outputs (devices quantize on feed, dequantize outputs): {io}"
            if int8_io
            else f"int8 quantization of inputs/outputs (float32 I/O quantized inside): {io}"
        ),
    ]
    if report.float_operators:
        notes.append(
            "operators without an int8 kernel run in float32: "
            + ", ".join(sorted(set(report.float_operators)))
        )
    return Produced(bytes(data), notes, summary)
