"""Weight-only quantization passes over a :class:`~converters.tflite.builder.ModelSpec`.

Both modes keep float32 inputs, outputs and activations; only constants shrink.

``float16``
    Every float32 constant becomes a float16 constant followed by a
    ``DEQUANTIZE`` op (placed before every other op) that yields the float32
    tensor the consumers read, as TensorFlow's float16 post-training
    quantization does. Compute stays float32; weights take half the bytes.

``int8`` (dynamic range)
    The weights of ``CONV_2D`` (per output channel, quantized dimension 0),
    ``DEPTHWISE_CONV_2D`` (per channel, dimension 3) and ``FULLY_CONNECTED``
    (per tensor) become symmetric int8 with float scales and zero points 0, as
    TensorFlow's dynamic range quantization stores them. The interpreter then
    runs its hybrid kernels: activations are quantized on the fly (per row for
    dense layers, per image for convolutions). Biases and other constants stay
    float32. Unlike TensorFlow's converter, which leaves weights under 1024
    elements in float, every conv / dense weight is quantized, however small.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tflite

from converters.tflite.builder import ModelSpec, OperatorSpec, Quantization, TensorSpec
from converters.tflite.errors import UnsupportedQuantizationError

Op = tflite.BuiltinOperator
T = tflite.TensorType

WEIGHT_MODES = ("float32", "float16", "int8")

# op code -> (weight input position, per-channel quantized dimension or None)
_HYBRID = {
    Op.CONV_2D: (1, 0),
    Op.DEPTHWISE_CONV_2D: (1, 3),
    Op.FULLY_CONNECTED: (1, None),
}
# Operator versions of the hybrid kernels (TFLite's op_version rules).
_HYBRID_VERSION = {Op.CONV_2D: 5, Op.DEPTHWISE_CONV_2D: 6, Op.FULLY_CONNECTED: 3}


@dataclass(frozen=True)
class WeightReport:
    """What a weight mode changed: constants stored in fewer bits, operators reading them."""

    mode: str
    float_constants: int
    constants_converted: int
    operators_changed: int


def _float_constants(spec: ModelSpec) -> int:
    return sum(
        1
        for t in spec.tensors
        if t.data is not None and t.dtype == T.FLOAT32 and int(np.prod(t.shape)) > 1
    )


def _values(t: TensorSpec) -> np.ndarray:
    assert t.data is not None
    return np.frombuffer(t.data, dtype="<f4").reshape(t.shape)


def to_float16(spec: ModelSpec) -> tuple[int, int]:
    """Store float32 constants as float16 + ``DEQUANTIZE`` (in place).

    Returns (constants converted, operators reading a converted constant).
    """
    dequantized: dict[int, int] = {}
    prologue = []
    changed = 0
    for op in spec.operators:
        before = list(op.inputs)
        for pos, idx in enumerate(op.inputs):
            if idx < 0:
                continue
            t = spec.tensors[idx]
            if t.data is None or t.dtype != T.FLOAT32:
                continue
            if idx not in dequantized:
                values = _values(t)
                if values.size and np.abs(values).max() > np.finfo(np.float16).max:
                    continue  # e.g. the lowest-float pad value: keep it float32
                half = values.astype(np.float16)
                src = spec.add_constant(f"{t.name}__fp16", half)
                dst = spec.add_tensor(f"{t.name}__dequant", t.shape)
                prologue.append((src, dst))
                dequantized[idx] = dst
            op.inputs[pos] = dequantized[idx]
        changed += op.inputs != before
    spec.operators[:0] = [OperatorSpec(Op.DEQUANTIZE, [s], [d], None, 3) for s, d in prologue]
    spec.compact()
    return len(prologue), changed


def quantize_int8(values: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 values and scales (per ``axis`` or per tensor) for ``values``."""
    if axis is None:
        peak = np.abs(values).max(keepdims=True).reshape(1)
    else:
        other = tuple(i for i in range(values.ndim) if i != axis)
        peak = np.abs(values).max(axis=other)
    scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
    shape = [1] * values.ndim
    if axis is not None:
        shape[axis] = -1
    q = np.clip(np.round(values / scale.reshape(shape)), -127, 127).astype(np.int8)
    return q, scale


def to_int8_dynamic_range(spec: ModelSpec) -> tuple[int, int]:
    """Quantize conv / depthwise / fully-connected weights to int8 (in place).

    Returns (weights quantized, operators now running hybrid kernels).
    """
    done: dict[int, int] = {}
    changed = 0
    for op in spec.operators:
        if op.code not in _HYBRID:
            continue
        pos, axis = _HYBRID[op.code]
        idx = op.inputs[pos]
        t = spec.tensors[idx]
        if t.data is None or t.dtype != T.FLOAT32:
            continue
        if idx not in done:
            q, scale = quantize_int8(_values(t), axis)
            new = spec.add_constant(f"{t.name}__int8", q)
            spec.tensors[new].quantization = Quantization(
                [float(s) for s in scale], [0] * len(scale), 0 if axis is None else axis
            )
            done[idx] = new
        op.inputs[pos] = done[idx]
        changed += 1
        version = _HYBRID_VERSION[op.code]
        if op.code == Op.FULLY_CONNECTED and op.options and op.options[1].get("KeepNumDims"):
            version = 5
        elif op.code == Op.CONV_2D and axis is None:
            version = 2
        op.version = max(op.version, version)
    spec.compact()
    return len(done), changed


def apply(spec: ModelSpec, weights: str) -> WeightReport:
    """Apply weight mode ``weights`` (one of :data:`WEIGHT_MODES`) to ``spec``."""
    floats = _float_constants(spec)
    if weights == "float32":
        return WeightReport(weights, floats, 0, 0)
    if weights == "float16":
        return WeightReport(weights, floats, *to_float16(spec))
    if weights == "int8":
        return WeightReport(weights, floats, *to_int8_dynamic_range(spec))
    raise UnsupportedQuantizationError(
        f"unknown weights mode {weights!r}; use one of {', '.join(WEIGHT_MODES)}"
    )
