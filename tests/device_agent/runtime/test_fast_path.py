"""Each backend's fast runner takes the runtime's native path, on the real runtimes.

The tests fail if a fast runner silently falls back to the checked public calls:
they replace the public calls (``InferenceSession.run``; the interpreter's
``set_tensor``/``invoke``/``get_tensor``) with ones that raise, then run the
fast runner and ``Agent.predict()``, which must still return the runtime's
outputs. The legacy ``tflite-runtime`` is pinned in
``test_fast_path_legacy.py`` (it needs numpy < 2).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from ai_edge_litert.interpreter import Interpreter
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_agent.agent import Agent
from device_agent.bundle import TrustStore
from device_agent.config import AgentConfig
from device_agent.runtime import (
    FALLBACK,
    NATIVE,
    OnnxBackend,
    TensorSpec,
    TFLiteBackend,
    load_backend,
)
from tests.agent_models import add_onnx, cnn_onnx, install, make_bundle, mlp_onnx


def _tflite_bytes(onnx_bytes: bytes) -> bytes:
    import onnx

    from converters.tflite import onnx_to_tflite

    return onnx_to_tflite(onnx.load_from_string(onnx_bytes))


def _reference(onnx_bytes: bytes, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]  # type: ignore[no-any-return]


def _refuse(*_a: Any, **_k: Any) -> Any:
    raise AssertionError("the fast path fell back to the runtime's public call")


def _backend(tmp_path: Path, fmt: str, onnx_bytes: bytes) -> Any:
    path = tmp_path / f"model.{fmt}"
    path.write_bytes(onnx_bytes if fmt == "onnx" else _tflite_bytes(onnx_bytes))
    return load_backend(path, fmt)


def _block_public_calls(monkeypatch: pytest.MonkeyPatch, fmt: str) -> None:
    if fmt == "onnx":
        monkeypatch.setattr(ort.InferenceSession, "run", _refuse)
    else:
        for name in ("set_tensor", "invoke", "get_tensor"):
            monkeypatch.setattr(Interpreter, name, _refuse)


CASES = [("onnx", "mlp"), ("onnx", "cnn"), ("tflite", "mlp"), ("tflite", "cnn")]


def _model_and_input(kind: str, batch: int = 1) -> tuple[bytes, np.ndarray]:
    rng = np.random.default_rng(3)
    if kind == "mlp":
        return mlp_onnx(0), rng.normal(size=(batch, 16)).astype(np.float32)
    return cnn_onnx(0), rng.normal(size=(batch, 3, 32, 32)).astype(np.float32)


@pytest.mark.parametrize(("fmt", "kind"), CASES)
def test_fast_runner_is_native_and_never_calls_the_public_api(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str, kind: str
) -> None:
    data, x = _model_and_input(kind)
    ref = _reference(data, x)
    backend = _backend(tmp_path, fmt, data)
    run = backend.fast_runner()
    assert backend.fast_path == NATIVE
    _block_public_calls(monkeypatch, fmt)
    out = run({"x": x})
    assert [o.shape for o in out] == [ref.shape]
    np.testing.assert_allclose(out[0], ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
def test_fast_runner_follows_the_batch_size_and_returns_fresh_arrays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    data = mlp_onnx(0)
    backend = _backend(tmp_path, fmt, data)
    run = backend.fast_runner()
    cases = [_model_and_input("mlp", batch)[1] for batch in (1, 5, 1, 3)]
    refs = [_reference(data, x) for x in cases]
    _block_public_calls(monkeypatch, fmt)
    for x, ref in zip(cases, refs, strict=True):
        batch = len(x)
        first = run({"x": x})[0]
        second = run({"x": x + 1})[0]
        np.testing.assert_allclose(first, ref, rtol=1e-4, atol=1e-5)
        assert first.shape == (batch, 4)
        assert not np.shares_memory(first, second)  # a later call does not overwrite it


@pytest.mark.parametrize(("fmt", "kind"), CASES)
def test_predict_runs_on_the_fast_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str, kind: str
) -> None:
    """``Agent.predict()`` itself, not only the runner, stays off the public calls."""
    data, x = _model_and_input(kind)
    ref = _reference(data, x)
    key = Ed25519PrivateKey.generate()
    trust = TrustStore()
    trust.add(key.public_key(), comment="test")
    payload = data if fmt == "onnx" else _tflite_bytes(data)
    bundle = make_bundle(tmp_path, key, model_bytes=payload, fmt=fmt, name=kind)
    model = install(bundle, tmp_path / "slot-a", trust, "a")
    agent = Agent(AgentConfig(), None, model=model, start_worker=False)
    try:
        assert model.backend.fast_path == NATIVE
        _block_public_calls(monkeypatch, fmt)
        out = agent.predict(x)
        np.testing.assert_allclose(out[0], ref, rtol=1e-4, atol=1e-5)
    finally:
        agent.close()


def test_onnx_fallback_is_named_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Without the native session the runner is the public run, and says so."""
    data, x = _model_and_input("mlp")
    backend = _backend(tmp_path, "onnx", data)
    assert isinstance(backend, OnnxBackend)

    class Wrapped:  # a session as a future onnxruntime might shape it: no _sess
        def __init__(self, inner: ort.InferenceSession) -> None:
            self.inner = inner

        def run(self, names: Any, feed: Any, opts: Any = None) -> Any:
            return self.inner.run(names, feed, opts)

        def get_providers(self) -> list[str]:
            return self.inner.get_providers()  # type: ignore[no-any-return]

    backend.session = Wrapped(backend.session)  # type: ignore[assignment]
    with caplog.at_level(logging.WARNING, logger="edgefleet.runtime"):
        run = backend.fast_runner()
    assert backend.fast_path == FALLBACK
    assert "no native _sess.run" in caplog.text
    np.testing.assert_allclose(run({"x": x})[0], _reference(data, x), rtol=1e-5)


def test_tflite_fallback_is_named_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data, x = _model_and_input("mlp")
    backend = _backend(tmp_path, "tflite", data)
    assert isinstance(backend, TFLiteBackend)

    class NoNative:
        def __init__(self, inner: Any) -> None:
            self._inner = inner

        def __getattr__(self, name: str) -> Any:
            if name == "_interpreter":
                raise AttributeError(name)
            return getattr(self._inner, name)

    backend.interp = NoNative(backend.interp)
    with caplog.at_level(logging.WARNING, logger="edgefleet.runtime"):
        run = backend.fast_runner()
    assert backend.fast_path == FALLBACK
    assert "lacks" in caplog.text
    np.testing.assert_allclose(run({"x": x})[0], _reference(data, x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
def test_backends_describe_their_tensors(tmp_path: Path, fmt: str) -> None:
    backend = _backend(tmp_path, fmt, mlp_onnx(0))
    (inp,) = backend.inputs
    (out,) = backend.outputs
    assert isinstance(inp, TensorSpec)
    assert inp.dtype == np.float32 and out.dtype == np.float32
    assert inp.shape[1:] == (16,) and out.shape[1:] == (4,)
    assert inp.shape[0] in (None, 1)  # TFLite files from the converter fix batch 1
    assert inp.nbytes_per_call() == 16 * 4
    assert backend.input_names == [inp.name] and backend.output_names == [out.name]


@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
def test_fast_runner_of_a_two_input_model_is_native_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    backend = _backend(tmp_path, fmt, add_onnx())
    run = backend.fast_runner()
    assert backend.fast_path == NATIVE
    rng = np.random.default_rng(9)
    cases = [{n: rng.normal(size=(b, 4)).astype(np.float32) for n in ("a", "b")} for b in (1, 3)]
    _block_public_calls(monkeypatch, fmt)
    for feed in cases:
        (y,) = run(feed)
        np.testing.assert_allclose(y, feed["a"] + feed["b"], rtol=1e-6)
