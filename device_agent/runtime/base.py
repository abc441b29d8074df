"""What every runtime backend offers: errors, tensor specs and the runner type.

A backend is one loaded model. Besides ``run`` (a checked, convenient call) it
offers :meth:`Backend.fast_runner`, the cheapest correct way to run the model
that the agent's ``predict()`` hot path uses. Private attributes of the runtimes
(onnxruntime's native session, the TFLite interpreter's native object) are
touched only inside this package, so a runtime upgrade that moves them changes
one module and is caught by ``tests/device_agent/runtime``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np

#: ``runner(feed) -> outputs``: ``feed`` maps every input name to an array; outputs come in
#: the backend's ``output_names`` order. Safe to call from several threads.
Runner = Callable[[dict[str, np.ndarray]], list[np.ndarray]]

#: :attr:`Backend.fast_path` of a backend whose fast runner skips the public wrappers
NATIVE = "native"
#: :attr:`Backend.fast_path` of a backend whose fast runner is its checked ``run``
FALLBACK = "fallback"


class BackendError(Exception):
    """Root of runtime backend errors."""


class RuntimeUnavailableError(BackendError):
    """No installed runtime can run this model format."""


class ModelLoadError(BackendError):
    """The runtime refused the model file."""


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a loaded model.

    ``shape`` holds ``None`` for a dimension the model leaves open (the batch,
    usually); ``dtype`` is the numpy dtype the runtime expects or returns;
    ``quantization`` is ``(scale, zero_point)`` when the model file itself records
    per-tensor quantization of this tensor (TFLite does; ONNX I/O carries none).
    """

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...]
    quantization: tuple[float, int] | None = None

    def nbytes_per_call(self) -> int:
        """Bytes of one batch-1 tensor (open dimensions count as 1)."""
        n = 1
        for d in self.shape:
            n *= d if d is not None and d > 0 else 1
        return n * self.dtype.itemsize


class Backend(Protocol):
    """One loaded model. ``run`` and the fast runner are safe to call from several threads."""

    name: str
    version: str
    input_names: list[str]
    output_names: list[str]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    #: :data:`NATIVE` or :data:`FALLBACK` once :meth:`fast_runner` was built
    fast_path: str

    def run(self, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]: ...

    def fast_runner(self) -> Runner: ...
