"""Lowering ONNX models for older runtimes, shown against a real older onnxruntime.

The older onnxruntime lives in its own virtualenv (it needs numpy < 2), built
once from PyPI and cached in ``$EDGEFLEET_VENV_CACHE`` (default
``~/.cache/edgefleet/venvs``, outside the checkout so fresh CI clones on the
same machine reuse it). Models run there through a subprocess.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from converters import onnx_tools
from converters.errors import LoweringError, TargetError
from converters.pipeline import convert
from converters.source import from_onnx
from converters.targets import (
    Target,
    min_onnxruntime,
    onnxruntime_limits,
    parse_target,
    parse_version,
)
from tests import models

OLD_ORT = "1.16.3"
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"), "edgefleet", "venvs")

_RUNNER = r"""
import json, sys
import numpy as np
import onnxruntime as ort
model, inp, out = sys.argv[1:4]
try:
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
except Exception as e:
    print(json.dumps({"ok": False, "error": str(e), "version": ort.__version__}))
    sys.exit(0)
x = np.load(inp)
y = sess.run(None, {sess.get_inputs()[0].name: x})[0]
np.save(out, y)
print(json.dumps({"ok": True, "version": ort.__version__}))
"""


@dataclass
class OldRuntime:
    python: Path

    def run(self, model: bytes, x: np.ndarray, workdir: Path) -> tuple[dict, np.ndarray | None]:
        mpath, ipath, opath = workdir / "m.onnx", workdir / "x.npy", workdir / "y.npy"
        mpath.write_bytes(model)
        np.save(ipath, x)
        opath.unlink(missing_ok=True)
        proc = subprocess.run(
            [str(self.python), "-c", _RUNNER, str(mpath), str(ipath), str(opath)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        return result, (np.load(opath) if result["ok"] else None)


def _build_venv(dest: Path) -> None:
    tmp = dest.with_name(f"{dest.name}.building-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(tmp)], check=True, timeout=120)
    subprocess.run(
        [
            str(tmp / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            f"onnxruntime=={OLD_ORT}",
            "numpy<2",
        ],
        check=True,
        timeout=600,
    )
    (tmp / ".complete").write_text(OLD_ORT)
    try:
        os.replace(tmp, dest)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def old_ort() -> OldRuntime:
    cache = Path(os.environ.get("EDGEFLEET_VENV_CACHE", DEFAULT_CACHE))
    dest = cache / f"onnxruntime-{OLD_ORT}"
    if not (dest / ".complete").exists():
        cache.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(dest, ignore_errors=True)
        _build_venv(dest)
    return OldRuntime(dest / "bin" / "python")


def test_unlowered_torch_export_is_refused_by_onnxruntime_1_16(
    old_ort: OldRuntime, tmp_path: Path
) -> None:
    source, x = models.zoo_source("cnn")
    assert source.onnx_model.ir_version > 9
    result, _ = old_ort.run(source.onnx_model.SerializeToString(), x, tmp_path)
    assert result["version"] == OLD_ORT
    assert not result["ok"]
    assert "Unsupported model IR version" in result["error"]


@pytest.mark.parametrize(
    "name,precision",
    [("cnn", "float32"), ("cnn", "int8-dynamic"), ("mlp", "float16"), ("pipeline", "float32")],
)
def test_lowered_model_loads_and_runs_on_onnxruntime_1_16(
    old_ort: OldRuntime, tmp_path: Path, name: str, precision: str
) -> None:
    source, x = models.zoo_source(name)
    artifact = convert(source, Target("onnx", precision, runtime_version="1.16"), samples=x)
    model = onnx.load_from_string(artifact.data)
    assert model.ir_version <= 9 and onnx_tools.opsets(model)[""] <= 19
    assert parse_version(artifact.runtime["min_runtime_version"]) <= (1, 16)
    result, y = old_ort.run(artifact.data, x, tmp_path)
    assert result == {"ok": True, "version": OLD_ORT}
    assert y is not None
    expected = source.reference({source.inputs[0].name: x})[0]
    if precision == "float32":
        assert float(np.max(np.abs(y - expected))) <= 1e-4
    else:
        assert float(np.mean(y.argmax(-1) == expected.argmax(-1))) >= 0.97


def test_target_limits_follow_the_runtime_version() -> None:
    assert Target(runtime_version="1.16").limits == (9, 19, 3)
    assert Target(runtime_version="1.16.3").limits == (9, 19, 3)
    assert Target(runtime_version="1.19").limits == Target(runtime_version="1.18").limits
    assert Target(runtime_version="1.16", max_opset=17).limits == (9, 17, 3)
    assert onnxruntime_limits("1.99")[0] >= 13
    assert min_onnxruntime(9, 19, 3) == "1.15"
    assert min_onnxruntime(10, 18) == "1.18"


def test_runtime_older_than_known_releases_is_refused() -> None:
    with pytest.raises(TargetError, match="older than the oldest known"):
        Target(runtime_version="1.2")


@pytest.mark.parametrize(
    "spec,expected",
    [
        ("onnx", ("onnx", "float32", None, None)),
        ("onnx:int8-dynamic@onnxruntime-1.16", ("onnx", "int8-dynamic", 9, 19)),
        ("onnx:float16@ir8/opset17", ("onnx", "float16", 8, 17)),
        ("tflite:float16", ("tflite", "float16", None, None)),
    ],
)
def test_parse_target(spec: str, expected: tuple) -> None:
    t = parse_target(spec)
    assert (t.format, t.precision, t.limits[0], t.limits[1]) == expected


@pytest.mark.parametrize(
    "spec,message",
    [
        ("coreml", "is not like"),
        ("onnx:int4", "precision 'int4'"),
        ("tflite:int8-static", "not available for tflite"),
        ("onnx@somewhere", "after '@'"),
        ("onnx@onnxruntime-x.y", "after '@'"),
    ],
)
def test_bad_target_is_refused_with_target_error(spec: str, message: str) -> None:
    with pytest.raises(TargetError, match=message):
        parse_target(spec)


def test_opset_is_lowered_with_the_version_converter() -> None:
    model, x = models.onnx_helper_mlp(opset=17)
    source = from_onnx(model)
    artifact = convert(source, parse_target("onnx@ir7/opset14"), samples=x)
    lowered = onnx.load_from_string(artifact.data)
    assert onnx_tools.opsets(lowered)[""] == 14 and lowered.ir_version == 7
    assert "opset 17 -> 14" in artifact.notes
    assert artifact.parity.passed and artifact.parity.outputs[0].max_abs_error <= 1e-4


def test_opset_without_downward_adapter_is_refused_with_lowering_error() -> None:
    model, x = models.onnx_helper_mlp(opset=17)
    with pytest.raises(LoweringError, match="cannot convert the model from opset 17 to opset 12"):
        convert(from_onnx(model), parse_target("onnx@ir7/opset12"), samples=x)


def test_operator_newer_than_target_opset_is_refused_with_lowering_error() -> None:
    graph = helper.make_graph(
        [helper.make_node("Mish", ["x"], ["y"])],
        "mish",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    with pytest.raises(LoweringError, match="Mish"):
        onnx_tools.lower(model, 8, 17)


def test_ir_not_lowered_below_what_the_element_types_need() -> None:
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["x"], ["c"], to=TensorProto.FLOAT8E4M3FN),
            helper.make_node("Cast", ["c"], ["y"], to=TensorProto.FLOAT),
        ],
        "f8",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    model.ir_version = 10
    with pytest.raises(LoweringError, match="needs ONNX IR version 9"):
        onnx_tools.lower(model, 8, None)
    lowered, notes = onnx_tools.lower(model, 9, None)
    assert lowered.ir_version == 9 and notes == ["IR 10 -> 9"]


def test_ml_opset_newer_than_target_is_refused() -> None:
    source, x = models.zoo_source("pipeline")
    model = onnx.ModelProto()
    model.CopyFrom(source.onnx_model)
    for entry in model.opset_import:
        if entry.domain == "ai.onnx.ml":
            entry.version = 5
    with pytest.raises(LoweringError, match="ai.onnx.ml opset 5"):
        convert(from_onnx(model), Target("onnx", runtime_version="1.16"), samples=x)


def test_optimization_folds_batch_norm_and_keeps_standard_domain() -> None:
    # Build Conv -> BatchNormalization by hand (the torch exporter already folds it).
    rng = np.random.default_rng(0)
    inits = [
        onnx.numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "W"),
        onnx.numpy_helper.from_array(rng.normal(size=4).astype(np.float32), "scale"),
        onnx.numpy_helper.from_array(rng.normal(size=4).astype(np.float32), "bias"),
        onnx.numpy_helper.from_array(rng.normal(size=4).astype(np.float32), "mean"),
        onnx.numpy_helper.from_array((rng.random(4) + 0.5).astype(np.float32), "var"),
    ]
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("BatchNormalization", ["c", "scale", "bias", "mean", "var"], ["y"]),
        ],
        "convbn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    x = rng.normal(size=(4, 3, 8, 8)).astype(np.float32)
    artifact = convert(from_onnx(model, task="regression"), Target("onnx"), samples=x)
    optimized = onnx.load_from_string(artifact.data)
    assert [n.op_type for n in optimized.graph.node] == ["Conv"]
    assert set(onnx_tools.opsets(optimized)) == {""}
    assert artifact.parity.outputs[0].max_abs_error <= 1e-4
