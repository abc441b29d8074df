"""The TFLite fast runner on the legacy ``tflite-runtime`` 2.14 (numpy < 2).

The legacy interpreter cannot share an environment with numpy 2, so the check
runs in the cached legacy virtualenv (built by
``tests/converters/tflite/test_builder_legacy_runtime.py``'s helper) with this
checkout on ``PYTHONPATH``: :class:`TFLiteBackend` must pick ``tflite_runtime``,
build the native fast runner, and return the right outputs with the
interpreter's public ``set_tensor``/``invoke``/``get_tensor`` replaced by calls
that raise, so a silent fallback fails the test.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from converters.tflite import onnx_to_tflite
from tests.agent_models import cnn_onnx, mlp_onnx
from tests.converters.tflite.test_builder_legacy_runtime import _build_legacy_venv

REPO = Path(__file__).resolve().parents[3]

SCRIPT = r"""
import json, sys
from pathlib import Path
import numpy as np
import tflite_runtime
from tflite_runtime.interpreter import Interpreter
from device_agent.runtime.tflite import TFLiteBackend

def refuse(*a, **k):
    raise AssertionError("the fast path fell back to the interpreter's public call")

folder = Path(sys.argv[1])
report = {"numpy": np.__version__, "tflite_runtime": tflite_runtime.__version__}
for name in json.loads((folder / "cases.json").read_text()):
    backend = TFLiteBackend(folder / f"{name}.tflite")
    run = backend.fast_runner()
    saved = {m: getattr(Interpreter, m) for m in ("set_tensor", "invoke", "get_tensor")}
    for m in saved:
        setattr(Interpreter, m, refuse)
    try:
        for i, batch in enumerate((1, 3, 1)):
            x = np.load(folder / f"{name}.in{batch}.npy")
            np.save(folder / f"{name}.out{i}.npy", run({"x": x})[0])
    finally:
        for m, f in saved.items():
            setattr(Interpreter, m, f)
    report[name] = {"runtime": backend.name, "fast_path": backend.fast_path}
print(json.dumps(report))
"""


@pytest.mark.slow
def test_legacy_tflite_runtime_fast_runner_is_native(tmp_path: Path) -> None:
    python = _build_legacy_venv()
    rng = np.random.default_rng(5)
    cases = {"mlp": (mlp_onnx(0), (16,)), "cnn": (cnn_onnx(0), (3, 32, 32))}
    refs: dict[str, list[np.ndarray]] = {}
    for name, (data, shape) in cases.items():
        (tmp_path / f"{name}.tflite").write_bytes(onnx_to_tflite(onnx.load_from_string(data)))
        sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        xs = {b: rng.normal(size=(b, *shape)).astype(np.float32) for b in (1, 3)}
        for b, x in xs.items():
            np.save(tmp_path / f"{name}.in{b}.npy", x)
        refs[name] = [sess.run(None, {"x": xs[b]})[0] for b in (1, 3, 1)]
    (tmp_path / "cases.json").write_text(json.dumps(sorted(cases)))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [str(python), "-c", SCRIPT, str(tmp_path)],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["tflite_runtime"] == "2.14.0" and report["numpy"].startswith("1.")
    for name in cases:
        assert report[name] == {"runtime": "tflite-runtime", "fast_path": "native"}
        for i, ref in enumerate(refs[name]):
            got = np.load(tmp_path / f"{name}.out{i}.npy")
            np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
