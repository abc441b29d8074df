"""The onnxruntime backend.

Its fast runner calls the session's native ``run`` with precomputed output
names: what ``InferenceSession.run`` ends up calling after argument checks that
matter only for OrtValue inputs, graph capture and execution-provider fallback,
none of which the agent uses on the CPU provider (missing or mistyped inputs are
still refused by the native call). ``bench/bench_predict.py`` measures it against
the public ``run``, ``run_with_ort_values`` and I/O binding: on small models the
public calls cost 5 us (``run``) to 100 us (``run_with_ort_values``) more per call.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .base import FALLBACK, NATIVE, ModelLoadError, Runner, RuntimeUnavailableError, TensorSpec

log = logging.getLogger("edgefleet.runtime")

_ONNX_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int8)": np.int8,
    "tensor(int16)": np.int16,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(uint8)": np.uint8,
    "tensor(uint16)": np.uint16,
    "tensor(uint32)": np.uint32,
    "tensor(uint64)": np.uint64,
    "tensor(bool)": np.bool_,
    "tensor(string)": np.object_,
}


def _spec(arg: Any) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) and d >= 0 else None for d in (arg.shape or ()))
    return TensorSpec(arg.name, np.dtype(_ONNX_DTYPES.get(arg.type, np.float32)), shape)


class OnnxBackend:
    """A model file opened with onnxruntime on the CPU execution provider."""

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
        self.inputs = [_spec(i) for i in self.session.get_inputs()]
        self.outputs = [_spec(o) for o in self.session.get_outputs()]
        self.input_names = [s.name for s in self.inputs]
        self.output_names = [s.name for s in self.outputs]
        self.version: str = ort.__version__
        self.fast_path = ""

    def run(self, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """The public, fully checked ``InferenceSession.run``."""
        return self.session.run(None, dict(inputs))  # type: ignore[no-any-return]

    def fast_runner(self) -> Runner:
        """The session's native ``run`` (see the module docstring); :meth:`run` if this
        onnxruntime has none or the session is not on the CPU provider alone."""
        native = getattr(self.session, "_sess", None)
        native_run = getattr(native, "run", None)
        if native_run is None:
            return self._fallback("this onnxruntime's InferenceSession has no native _sess.run")
        providers = self.session.get_providers()
        if providers != ["CPUExecutionProvider"]:
            return self._fallback(f"providers {providers} may fall back between providers")
        names = list(self.output_names)
        self.fast_path = NATIVE

        def run(feed: dict[str, np.ndarray]) -> list[np.ndarray]:
            return native_run(names, feed, None)  # type: ignore[no-any-return]

        return run

    def _fallback(self, reason: str) -> Runner:
        log.warning(
            "onnxruntime %s: predict() uses the checked InferenceSession.run (%s)",
            self.version,
            reason,
        )
        self.fast_path = FALLBACK
        session_run = self.session.run

        def run(feed: dict[str, np.ndarray]) -> list[np.ndarray]:
            return session_run(None, feed)  # type: ignore[no-any-return]

        return run
