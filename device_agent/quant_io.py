"""Quantized model inputs and outputs, served as real values.

A model whose manifest gives an input or output an integer dtype and per-tensor
``quantization`` (``real = scale * (q - zero_point)``) is served as if that tensor
were float32, so an application, the serving endpoint, telemetry and the smoke test
need not know the model is quantized. :meth:`QuantizedIO.wrap` wraps a backend's
runner so that, per call:

* an input array of any other dtype holds real values and is quantized:
  ``clip(rint(x / scale) + zero_point)`` in float32, rounding half to even, clipped
  to the dtype's range (NaN has no integer and is not a valid input);
* an input array already of the tensor's integer dtype is passed as is (an
  application holding quantized data pays no double quantization);
* a quantized output is returned dequantized, as float32.

Models without quantized I/O have no :class:`QuantizedIO` and keep the backend's
runner itself: no extra work per call. Pure numpy, no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .bundle.manifest import QUANTIZED_DTYPES
from .bundle.manifest import TensorSpec as ManifestTensor
from .runtime import ModelLoadError, Runner
from .runtime import TensorSpec as RuntimeTensor


class TensorQuant:
    """How to move one tensor between real values and its integer dtype.

    The quantization bounds are shifted by the zero point (clip ``rint(x / scale)`` to
    ``[lo - zero_point, hi - zero_point]``, then add the zero point in the integer
    dtype): the same integers as clipping after the addition, in fewer numpy calls on
    the small arrays a device feeds one at a time.
    """

    __slots__ = ("name", "dtype", "scale", "zero_point", "lo", "hi", "_lo", "_hi", "_zq", "_zf")

    def __init__(self, name: str, dtype: np.dtype, scale: float, zero_point: int) -> None:
        lo, hi = QUANTIZED_DTYPES[dtype.name]
        self.name, self.dtype, self.zero_point, self.lo, self.hi = name, dtype, zero_point, lo, hi
        self.scale = np.float32(scale)
        self._lo, self._hi = np.float32(lo - zero_point), np.float32(hi - zero_point)
        self._zq = dtype.type(zero_point)
        self._zf = np.float32(zero_point)

    def quantize(self, x: Any) -> np.ndarray:
        """Real values -> integers of :attr:`dtype` (round half to even, clipped)."""
        v = np.divide(x, self.scale, dtype=np.float32)
        np.rint(v, out=v)
        np.maximum(v, self._lo, out=v)
        np.minimum(v, self._hi, out=v)
        q = v.astype(self.dtype)
        if self.zero_point:
            q += self._zq
        return q

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        """Integers -> real values, float32: ``(q - zero_point) * scale``."""
        v = q.astype(np.float32)
        if self.zero_point:
            v -= self._zf
        v *= self.scale
        return v


class QuantizedIO:
    """The quantized inputs and outputs of one model (see the module docstring)."""

    def __init__(
        self, inputs: Sequence[TensorQuant], outputs: Sequence[TensorQuant | None]
    ) -> None:
        self.inputs = {q.name: q for q in inputs}
        #: one entry per model output, in the backend's order; None for a float output
        self.outputs = list(outputs)

    def wrap(self, run: Runner) -> Runner:
        """``run`` feeding real or already-quantized inputs and returning real outputs."""
        qin = tuple(self.inputs.items())
        qout = tuple((i, q) for i, q in enumerate(self.outputs) if q is not None)
        nd = np.ndarray
        if len(qin) == 1 and len(self.outputs) == 1:
            return _single_io_runner(run, qin[0][1], self.outputs[0])

        def runner(feed: dict[str, np.ndarray]) -> list[np.ndarray]:
            if qin:
                feed = dict(feed)
                for name, q in qin:
                    arr = feed.get(name)
                    if arr is not None and (arr.__class__ is not nd or arr.dtype != q.dtype):
                        feed[name] = q.quantize(arr)
            out = list(run(feed))
            for i, q in qout:
                out[i] = q.dequantize(out[i])
            return out

        return runner

    def real_inputs(self, kept: Any, single: str | None) -> Any:
        """``kept`` (one array for input ``single``, or a feed) with inputs that were
        passed already quantized turned back into real values, for telemetry."""
        if single is not None:
            q = self.inputs.get(single)
            if q is not None and isinstance(kept, np.ndarray) and kept.dtype == q.dtype:
                return q.dequantize(kept)
            return kept
        out = dict(kept)
        for name, q in self.inputs.items():
            arr = out.get(name)
            if isinstance(arr, np.ndarray) and arr.dtype == q.dtype:
                out[name] = q.dequantize(arr)
        return out


def _single_io_runner(run: Runner, q: TensorQuant, oq: TensorQuant | None) -> Runner:
    """:meth:`QuantizedIO.wrap` for one quantized input and one output: no loops."""
    name, qd, nd = q.name, q.dtype, np.ndarray

    def runner(feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        arr = feed.get(name)
        if arr is not None and (
            arr.__class__ is not nd or (arr.dtype is not qd and arr.dtype != qd)
        ):
            feed = {**feed, name: q.quantize(arr)}
        out = run(feed)
        if oq is not None:
            out = list(out)
            out[0] = oq.dequantize(out[0])
        return out

    return runner


def _tensor_quant(
    spec: ManifestTensor, runtime: RuntimeTensor | None, model: str
) -> TensorQuant | None:
    q = spec.quantization
    if q is None:
        return None
    if runtime is None:
        raise ModelLoadError(
            f"{model}: the manifest gives tensor {spec.name!r} quantization parameters but "
            "the model has no input or output of that name; re-pack the bundle"
        )
    if runtime.dtype != np.dtype(spec.dtype):
        raise ModelLoadError(
            f"{model}: the manifest says tensor {spec.name!r} is {spec.dtype}, the model file "
            f"says {runtime.dtype}; re-pack the bundle from this model file"
        )
    if runtime.quantization is not None:
        scale, zero = runtime.quantization
        if not np.isclose(scale, q.scale, rtol=1e-6, atol=0.0) or zero != q.zero_point:
            raise ModelLoadError(
                f"{model}: the manifest quantizes tensor {spec.name!r} with scale {q.scale:g}, "
                f"zero point {q.zero_point}; the model file with scale {scale:g}, zero point "
                f"{zero}; re-pack the bundle from this model file"
            )
    return TensorQuant(spec.name, np.dtype(spec.dtype), q.scale, q.zero_point)


def quantized_io(
    model: str,
    manifest_inputs: Sequence[ManifestTensor],
    manifest_outputs: Sequence[ManifestTensor],
    inputs: Sequence[RuntimeTensor],
    outputs: Sequence[RuntimeTensor],
) -> QuantizedIO | None:
    """The quantized I/O the manifest declares, checked against the loaded model (the
    runtime's tensors); None when no input or output is quantized (float I/O, or a
    manifest written before quantization parameters were recorded).
    Raises :class:`ModelLoadError` when the manifest and the model file disagree."""
    by_name = {t.name: t for t in (*inputs, *outputs)}
    qin = [_tensor_quant(s, by_name.get(s.name), model) for s in manifest_inputs]
    qout_by_name = {
        s.name: q for s in manifest_outputs if (q := _tensor_quant(s, by_name.get(s.name), model))
    }
    if not any(qin) and not qout_by_name:
        return None
    return QuantizedIO(
        [q for q in qin if q is not None], [qout_by_name.get(o.name) for o in outputs]
    )


def served_spec(spec: RuntimeTensor, q: TensorQuant | None) -> RuntimeTensor:
    """What the application sees of a tensor: float32 for a quantized one."""
    if q is None:
        return spec
    return RuntimeTensor(spec.name, np.dtype(np.float32), spec.shape)
