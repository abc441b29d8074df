"""The converter's TFLite files on the legacy ``tflite-runtime`` 2.14 (numpy < 2).

Older boards run that interpreter, which cannot share an environment with
numpy 2, so the test builds a separate virtualenv once (cached under
``.venv-cache/tflite-legacy`` in the checkout, rebuilt if its marker is missing)
and runs every model there in one subprocess, comparing its outputs with
onnxruntime on the source models.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from converters.tflite import onnx_to_tflite
from tests.tflite_models import BUILDERS, FLOAT32_ABS, OP_CASES, TOLERANCE, run_onnx

REPO = Path(__file__).resolve().parents[3]
CACHE = REPO / ".venv-cache"
LEGACY_VENV = CACHE / "tflite-legacy"
REQUIREMENTS = ["tflite-runtime==2.14.0", "numpy<2"]
MARKER = ".edgefleet-requirements"

RUNNER = """
import json, sys
from pathlib import Path
import numpy as np
import tflite_runtime
from tflite_runtime.interpreter import Interpreter

folder = Path(sys.argv[1])
for name in json.loads((folder / "cases.json").read_text()):
    interp = Interpreter(model_path=str(folder / f"{name}.tflite"))
    x = np.load(folder / f"{name}.in.npy")
    d = interp.get_input_details()[0]
    interp.resize_tensor_input(d["index"], x.shape)
    interp.allocate_tensors()
    interp.set_tensor(d["index"], x)
    interp.invoke()
    np.save(folder / f"{name}.out.npy", interp.get_tensor(interp.get_output_details()[0]["index"]))
print(json.dumps({"tflite_runtime": tflite_runtime.__version__, "numpy": np.__version__}))
"""

# Quantized op cases worth a look on the old kernels besides the models.
QUANTIZED_OP_CASES = ("conv_depthwise_multiplier2_stride2", "conv_grouped", "flatten_after_conv")


def _build_legacy_venv() -> Path:
    """The legacy interpreter's Python, building its virtualenv if needed."""
    python = LEGACY_VENV / "bin" / "python"
    wanted = "\n".join(REQUIREMENTS)
    CACHE.mkdir(exist_ok=True)
    with open(CACHE / "tflite-legacy.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        marker = LEGACY_VENV / MARKER
        if python.exists() and marker.exists() and marker.read_text() == wanted:
            return python
        staging = CACHE / f"tflite-legacy.staging-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(staging)], check=True, timeout=300)
        subprocess.run(
            [str(staging / "bin" / "python"), "-m", "pip", "install", "--quiet",
             "--disable-pip-version-check", *REQUIREMENTS],
            check=True, timeout=900,
        )  # fmt: skip
        (staging / MARKER).write_text(wanted)
        shutil.rmtree(LEGACY_VENV, ignore_errors=True)
        os.replace(staging, LEGACY_VENV)
    return python


@pytest.fixture(scope="module")
def legacy_python() -> Path:
    return _build_legacy_venv()


def _cases() -> dict[str, tuple[bytes, np.ndarray, np.ndarray, str]]:
    """name -> (tflite bytes, input, onnxruntime reference, weight mode)."""
    out = {}
    for case, build in OP_CASES.items():
        model, x = build()
        ref = run_onnx(model, x)
        out[f"op-{case}-float32"] = (onnx_to_tflite(model), x, ref, "float32")
        if case in QUANTIZED_OP_CASES:
            for w in TOLERANCE:
                out[f"op-{case}-{w}"] = (onnx_to_tflite(model, weights=w), x, ref, w)
    for name, build_model in BUILDERS.items():
        model, x = build_model()
        ref = run_onnx(model, x)
        for w in ("float32", *TOLERANCE):
            out[f"model-{name}-{w}"] = (onnx_to_tflite(model, weights=w), x, ref, w)
    return out


@pytest.mark.slow
def test_legacy_tflite_runtime_matches_onnxruntime(legacy_python: Path, tmp_path: Path) -> None:
    cases = _cases()
    for name, (data, x, _, _) in cases.items():
        (tmp_path / f"{name}.tflite").write_bytes(data)
        np.save(tmp_path / f"{name}.in.npy", x)
    (tmp_path / "cases.json").write_text(json.dumps(sorted(cases)))
    (tmp_path / "runner.py").write_text(RUNNER)
    proc = subprocess.run(
        [str(legacy_python), str(tmp_path / "runner.py"), str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    versions = json.loads(proc.stdout.strip().splitlines()[-1])
    assert versions["tflite_runtime"] == "2.14.0"
    assert versions["numpy"].startswith("1.")

    failures = []
    for name, (_, _, ref, weights) in cases.items():
        got = np.load(tmp_path / f"{name}.out.npy")
        err = float(np.abs(got - ref).max()) if got.shape == ref.shape else float("inf")
        if weights == "float32":
            ok = err <= FLOAT32_ABS
        else:
            rel, top1 = TOLERANCE[weights]
            agree = (got.argmax(axis=-1) == ref.argmax(axis=-1)).mean()
            if name.startswith("op-"):
                agree = 1.0  # top-1 is meaningless for single operators
            ok = err <= rel * max(1.0, float(np.abs(ref).max())) and agree >= top1
        if not ok:
            failures.append(f"{name}: max abs error {err:.3g}")
    assert not failures, failures
