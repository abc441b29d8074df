"""Runtime backends: run a model file with onnxruntime, ai-edge-litert or the
legacy tflite-runtime, behind one small interface (:class:`Backend`).

A backend is chosen by the bundle's format and what is installed on the device:

* ``onnx``   -> onnxruntime (:mod:`.onnx`)
* ``tflite`` -> ai-edge-litert, else the legacy ``tflite_runtime`` (numpy < 2) (:mod:`.tflite`)

Each backend describes its tensors (:class:`TensorSpec`) and offers
``fast_runner()``, the hot path ``Agent.predict()`` calls; ``fast_path`` then says
whether it is the runtime's native call (:data:`NATIVE`) or the checked
``run`` (:data:`FALLBACK`, logged as a warning).
"""

from __future__ import annotations

from pathlib import Path

from .base import (
    FALLBACK,
    NATIVE,
    Backend,
    BackendError,
    ModelLoadError,
    Runner,
    RuntimeUnavailableError,
    TensorSpec,
)
from .onnx import OnnxBackend
from .tflite import TFLiteBackend


def load_backend(model_path: str | Path, fmt: str, threads: int = 1) -> Backend:
    """Load ``model_path`` (format ``onnx`` or ``tflite``) with the best installed runtime."""
    if fmt == "onnx":
        return OnnxBackend(model_path, threads)
    if fmt == "tflite":
        return TFLiteBackend(model_path, threads)
    raise RuntimeUnavailableError(f"unknown model format {fmt!r}")


__all__ = [
    "FALLBACK",
    "NATIVE",
    "Backend",
    "BackendError",
    "ModelLoadError",
    "OnnxBackend",
    "Runner",
    "RuntimeUnavailableError",
    "TFLiteBackend",
    "TensorSpec",
    "load_backend",
]
