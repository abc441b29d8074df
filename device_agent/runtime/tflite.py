"""The TFLite backend: ai-edge-litert, else the legacy ``tflite_runtime`` (numpy < 2).

Interpreters are not thread-safe, so every call holds the backend's lock. The
fast runner uses the interpreter's native ``SetTensor``/``Invoke``/``GetTensor``
with precomputed indices, as the ONNX backend uses the session's native run: the
Python wrappers add only a check for numpy views into the interpreter's buffers
(``tensor()``), which the agent never takes; ``GetTensor`` already returns a copy.
No reference to the native object outlives a call: the wrappers' check counts
references to it, and resizing goes through that check.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .base import FALLBACK, NATIVE, ModelLoadError, Runner, RuntimeUnavailableError, TensorSpec

log = logging.getLogger("edgefleet.runtime")

_NATIVE_METHODS = ("SetTensor", "Invoke", "GetTensor")


def _tflite_interpreter_class() -> tuple[Any, str, str]:
    try:
        from ai_edge_litert import __version__ as v
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter, "ai-edge-litert", v
    except ImportError:
        pass
    try:
        from tflite_runtime import __version__ as v2
        from tflite_runtime.interpreter import Interpreter as LegacyInterpreter

        return LegacyInterpreter, "tflite-runtime", v2
    except ImportError as e:
        raise RuntimeUnavailableError(
            "no TFLite interpreter is installed; install edgefleet[agent-tflite] "
            "(or edgefleet[agent-tflite-legacy] on numpy<2 devices)"
        ) from e


def _spec(d: Mapping[str, Any]) -> TensorSpec:
    sig = d.get("shape_signature")
    dims = sig if sig is not None and len(sig) == len(d["shape"]) else d["shape"]
    params = d.get("quantization_parameters") or {}
    scales, zeros = params.get("scales", ()), params.get("zero_points", ())
    quant = (float(scales[0]), int(zeros[0])) if len(scales) == 1 and len(zeros) == 1 else None
    return TensorSpec(
        str(d["name"]),
        np.dtype(d["dtype"]),
        tuple(int(v) if int(v) >= 0 else None for v in dims),
        quant,
    )


class TFLiteBackend:
    """A model file opened with a TFLite interpreter; ``run`` holds a lock."""

    def __init__(self, model_path: str | Path, threads: int = 1) -> None:
        cls, self.name, self.version = _tflite_interpreter_class()
        try:
            self.interp = cls(model_path=str(model_path), num_threads=threads)
            self.interp.allocate_tensors()
        except Exception as e:
            raise ModelLoadError(f"{self.name} could not load {model_path}: {e}") from e
        self._inputs = self.interp.get_input_details()
        self._outputs = self.interp.get_output_details()
        self.inputs = [_spec(d) for d in self._inputs]
        self.outputs = [_spec(d) for d in self._outputs]
        self.input_names = [s.name for s in self.inputs]
        self.output_names = [s.name for s in self.outputs]
        self._lock = threading.Lock()
        self._shapes = {d["index"]: tuple(d["shape"]) for d in self._inputs}
        self.fast_path = ""

    def run(self, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """The interpreter's public ``set_tensor``/``invoke``/``get_tensor``."""
        with self._lock:
            for d in self._inputs:
                arr = np.ascontiguousarray(inputs[d["name"]], dtype=d["dtype"])
                self._fit(d["index"], arr.shape)
                self.interp.set_tensor(d["index"], arr)
            self.interp.invoke()
            return [self.interp.get_tensor(d["index"]).copy() for d in self._outputs]

    def _fit(self, idx: int, shape: tuple[int, ...]) -> None:
        """Resize input ``idx`` to ``shape`` if it has another (caller holds the lock)."""
        if shape != self._shapes[idx]:
            self.interp.resize_tensor_input(idx, shape)
            self.interp.allocate_tensors()
            self._shapes[idx] = tuple(shape)

    def fast_runner(self) -> Runner:
        """Native set/invoke/get under the lock (see the module docstring); :meth:`run`
        if this interpreter has no native object with those methods."""
        native_obj = getattr(self.interp, "_interpreter", None)
        missing = [m for m in _NATIVE_METHODS if not hasattr(native_obj, m)]
        if missing:
            log.warning(
                "%s %s: predict() uses the checked interpreter calls (the native "
                "interpreter lacks %s)",
                self.name,
                self.version,
                missing,
            )
            self.fast_path = FALLBACK
            return self.run  # type: ignore[return-value]
        del native_obj
        interp, lock, fit = self.interp, self._lock, self._fit
        shapes = self._shapes
        ins = [(d["name"], d["index"], np.dtype(d["dtype"])) for d in self._inputs]
        outs = [d["index"] for d in self._outputs]
        nd = np.ndarray
        self.fast_path = NATIVE
        if len(ins) == 1 and len(outs) == 1:
            return _single_io_runner(interp, lock, fit, shapes, ins[0], outs[0])

        def run(feed: dict[str, np.ndarray]) -> list[np.ndarray]:
            with lock:
                ready = []
                for name, idx, dtype in ins:
                    arr = feed[name]
                    if arr.__class__ is not nd or arr.dtype is not dtype:
                        arr = np.ascontiguousarray(arr, dtype=dtype)
                    if arr.shape != shapes[idx]:
                        fit(idx, arr.shape)
                    ready.append((idx, arr))
                native = interp._interpreter
                for idx, arr in ready:
                    native.SetTensor(idx, arr)
                native.Invoke()
                out = [native.GetTensor(o, 0) for o in outs]
                del native
                return out

        return run


def _single_io_runner(
    interp: Any,
    lock: Any,
    fit: Any,
    shapes: dict[int, tuple[int, ...]],
    inp: tuple[str, int, np.dtype],
    out: int,
) -> Runner:
    """The fast runner of a one-input, one-output model (the common case): no loops."""
    name, idx, dtype = inp
    nd = np.ndarray

    def run(feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        arr = feed[name]
        if arr.__class__ is not nd or arr.dtype is not dtype:
            arr = np.ascontiguousarray(arr, dtype=dtype)
        with lock:
            if arr.shape != shapes[idx]:
                fit(idx, arr.shape)
            native = interp._interpreter
            native.SetTensor(idx, arr)
            native.Invoke()
            result = native.GetTensor(out, 0)
            del native
        return [result]

    return run
