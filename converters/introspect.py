"""Read a model file's input/output signature and runtime requirements."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from device_agent.bundle.manifest import QUANTIZED_DTYPES, Quantization, TensorSpec

from .errors import PackError
from .targets import min_onnxruntime

# Lowest onnxruntime release that loads each ONNX IR version (by IR alone; the
# manifest uses targets.min_onnxruntime, which also accounts for opsets).
ORT_MIN_FOR_IR = {
    3: "1.0",
    4: "1.0",
    5: "1.0",
    6: "1.1",
    7: "1.3",
    8: "1.10",
    9: "1.15",
    10: "1.18",
    11: "1.20",
    12: "1.23",
}

_ONNX_DTYPES = {
    1: "float32",
    2: "uint8",
    3: "int8",
    4: "uint16",
    5: "int16",
    6: "int32",
    7: "int64",
    8: "string",
    9: "bool",
    10: "float16",
    11: "float64",
    12: "uint32",
    13: "uint64",
    16: "bfloat16",
}


def onnx_signature(
    path: str | Path,
) -> tuple[list[TensorSpec], list[TensorSpec], dict[str, Any]]:
    """Inputs, outputs and runtime requirements of an ONNX model file."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError and others
        raise PackError(f"{path} is not a readable ONNX model: {e}") from e
    return onnx_model_signature(model)


def onnx_model_signature(
    model: Any,
) -> tuple[list[TensorSpec], list[TensorSpec], dict[str, Any]]:
    """Inputs, outputs and runtime requirements of an in-memory ONNX model."""
    initializers = {i.name for i in model.graph.initializer}

    def spec(v: Any) -> TensorSpec:
        t = v.type.tensor_type
        dims: list[int | str | None] = []
        for d in t.shape.dim:
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            elif d.HasField("dim_param"):
                dims.append(d.dim_param)
            else:
                dims.append(None)
        return TensorSpec(v.name, _ONNX_DTYPES.get(t.elem_type, f"onnx:{t.elem_type}"), tuple(dims))

    inputs = [spec(v) for v in model.graph.input if v.name not in initializers]
    outputs = [spec(v) for v in model.graph.output]
    opsets = {(o.domain or "ai.onnx"): int(o.version) for o in model.opset_import}
    runtime = {
        "engine": "onnxruntime",
        "onnx_ir_version": int(model.ir_version),
        "opsets": opsets,
        "min_runtime_version": min_onnxruntime(
            int(model.ir_version), opsets.get("ai.onnx"), opsets.get("ai.onnx.ml")
        ),
    }
    return inputs, outputs, runtime


def tflite_signature(
    path: str | Path,
) -> tuple[list[TensorSpec], list[TensorSpec], dict[str, Any]]:
    """Inputs, outputs and runtime requirements of a TFLite flatbuffer."""
    from ai_edge_litert.interpreter import Interpreter

    try:
        interp = Interpreter(model_path=str(path))
    except Exception as e:
        raise PackError(f"{path} is not a loadable TFLite model: {e}") from e

    def spec(d: dict[str, Any]) -> TensorSpec:
        shape = [int(s) for s in d["shape_signature"]]
        dtype = str(d["dtype"].__name__)
        return TensorSpec(
            d["name"],
            dtype,
            tuple(None if s < 0 else s for s in shape),
            _tflite_io_quantization(d, dtype),
        )

    inputs = [spec(d) for d in interp.get_input_details()]
    outputs = [spec(d) for d in interp.get_output_details()]
    runtime = {"engine": "tflite", "tflite_schema_version": 3, "min_runtime_version": "2.14"}
    return inputs, outputs, runtime


def _tflite_io_quantization(d: dict[str, Any], dtype: str) -> Quantization | None:
    """The per-tensor quantization of an integer input/output (None for float I/O);
    :class:`PackError` for per-axis parameters, which devices cannot feed."""
    params = d.get("quantization_parameters") or {}
    scales = np.asarray(params.get("scales", ()), dtype=np.float64)
    zeros = np.asarray(params.get("zero_points", ()), dtype=np.int64)
    if dtype not in QUANTIZED_DTYPES or scales.size == 0:
        return None
    if scales.size != 1 or zeros.size > 1:
        raise PackError(
            f"TFLite tensor {d['name']!r} is quantized per axis ({scales.size} scales); "
            "model inputs and outputs must be quantized per tensor. Convert with per-tensor "
            "I/O quantization or float32 I/O"
        )
    return Quantization(float(scales[0]), int(zeros[0]) if zeros.size else 0)


def model_signature(
    path: str | Path, fmt: str
) -> tuple[list[TensorSpec], list[TensorSpec], dict[str, Any]]:
    if fmt == "onnx":
        return onnx_signature(path)
    if fmt == "tflite":
        return tflite_signature(path)
    raise PackError(f"unknown model format {fmt!r}; use onnx or tflite")
