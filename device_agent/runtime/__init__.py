"""Runtime backends: run a model file with onnxruntime, ai-edge-litert or the
legacy tflite-runtime, behind one small interface.

A backend is chosen by the bundle's format and what is installed on the device:

* ``onnx``   -> onnxruntime
* ``tflite`` -> ai-edge-litert, else the legacy ``tflite_runtime`` (numpy < 2)
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np


class BackendError(Exception):
    """Root of runtime backend errors."""


class RuntimeUnavailableError(BackendError):
    """No installed runtime can run this model format."""


class ModelLoadError(BackendError):
    """The runtime refused the model file."""


class Backend(Protocol):
    """One loaded model. ``run`` must be safe to call from several threads."""

    name: str
    input_names: list[str]
    output_names: list[str]

    def run(self, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]: ...


class OnnxBackend:
    name = "onnxruntime"

    def __init__(self, model_path: str | Path, threads: int = 1) -> None:
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise RuntimeUnavailableError(
                "onnxruntime is not installed; install edgefleet[agent-onnx]"
            ) from e
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(
                str(model_path), sess_options=opts, providers=["CPUExecutionProvider"]
            )
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
            raise ModelLoadError(f"onnxruntime could not load {model_path}: {e}") from e
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.version = ort.__version__

    def run(self, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(None, dict(inputs))  # type: ignore[no-any-return]


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


class TFLiteBackend:
    """TFLite interpreter. Interpreters are not thread-safe, so ``run`` holds a lock."""

    def __init__(self, model_path: str | Path, threads: int = 1) -> None:
        import threading

        cls, self.name, self.version = _tflite_interpreter_class()
        try:
            self.interp = cls(model_path=str(model_path), num_threads=threads)
            self.interp.allocate_tensors()
        except Exception as e:
            raise ModelLoadError(f"{self.name} could not load {model_path}: {e}") from e
        self._inputs = self.interp.get_input_details()
        self._outputs = self.interp.get_output_details()
        self.input_names = [d["name"] for d in self._inputs]
        self.output_names = [d["name"] for d in self._outputs]
        self._lock = threading.Lock()
        self._shapes = {d["index"]: tuple(d["shape"]) for d in self._inputs}

    def run(self, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        with self._lock:
            for d in self._inputs:
                arr = np.ascontiguousarray(inputs[d["name"]], dtype=d["dtype"])
                if tuple(arr.shape) != self._shapes[d["index"]]:
                    self.interp.resize_tensor_input(d["index"], arr.shape)
                    self.interp.allocate_tensors()
                    self._shapes[d["index"]] = tuple(arr.shape)
                self.interp.set_tensor(d["index"], arr)
            self.interp.invoke()
            return [self.interp.get_tensor(d["index"]).copy() for d in self._outputs]


def load_backend(model_path: str | Path, fmt: str, threads: int = 1) -> Backend:
    """Load ``model_path`` (format ``onnx`` or ``tflite``) with the best installed runtime."""
    if fmt == "onnx":
        return OnnxBackend(model_path, threads)
    if fmt == "tflite":
        return TFLiteBackend(model_path, threads)
    raise RuntimeUnavailableError(f"unknown model format {fmt!r}")
