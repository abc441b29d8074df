"""`edgefleet convert` and `edgefleet bundle build` end to end on real models."""

from __future__ import annotations

import json
from pathlib import Path

import joblib
import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from converters.keys import KeyStore
from device_agent.bundle import TrustStore, unpack_bundle, verify_file
from device_agent.model import load_model, run_smoke_test
from fleet_server.cli import main
from tests import models


@pytest.fixture()
def keys_dir(tmp_path: Path) -> Path:
    d = tmp_path / "keys"
    r = CliRunner().invoke(main, ["keys", "generate", "--name", "rel", "--keys-dir", str(d)])
    assert r.exit_code == 0, r.output
    return d


@pytest.fixture()
def mlp_files(tmp_path: Path) -> tuple[Path, Path]:
    model, x = models.onnx_helper_mlp()
    path = tmp_path / "mlp.onnx"
    path.write_bytes(model.SerializeToString())
    samples = tmp_path / "x.npy"
    np.save(samples, x)
    return path, samples


def _trust(keys_dir: Path) -> TrustStore:
    store = TrustStore(threshold=1)
    store.add(KeyStore(keys_dir).public_key("rel"), comment="rel")
    return store


def test_bundle_build_writes_signed_bundles_that_install_and_pass_smoke(
    tmp_path: Path, keys_dir: Path, mlp_files: tuple[Path, Path]
) -> None:
    model, samples = mlp_files
    out = tmp_path / "out"
    r = CliRunner().invoke(
        main,
        [
            "bundle",
            "build",
            str(model),
            "--samples",
            str(samples),
            "--target",
            "onnx",
            "--target",
            "onnx:int8-dynamic@onnxruntime-1.16",
            "--target",
            "tflite:float16",
            "--device-class",
            "pi4",
            "--name",
            "mlp",
            "--version",
            "4",
            "--key",
            "rel",
            "--keys-dir",
            str(keys_dir),
            "-o",
            str(out),
        ],
    )
    assert r.exit_code == 0, r.output
    assert "converting" in r.stderr  # the progress display goes to stderr
    table = r.stdout
    for name in ("onnx-float32", "onnx-int8-dynamic-onnxruntime-1.16", "tflite-float16"):
        assert name in table
    bundles = sorted(out.glob("*.efb"))
    assert len(bundles) == 3
    trust = _trust(keys_dir)
    for b in bundles:
        manifest = verify_file(b, trust).manifest
        assert manifest.name == "mlp" and manifest.version == 4
        assert manifest.target_device_classes == ("pi4",)
        assert manifest.provenance["parity"]["passed"] is True
        slot = tmp_path / "slot" / b.stem
        unpack_bundle(b, slot, trust)
        assert run_smoke_test(load_model(slot))["ran"] is True


def test_convert_without_pack_writes_artifacts_and_parity_reports(
    tmp_path: Path, mlp_files: tuple[Path, Path]
) -> None:
    model, samples = mlp_files
    out = tmp_path / "art"
    r = CliRunner().invoke(
        main,
        [
            "convert",
            str(model),
            "--samples",
            str(samples),
            "--target",
            "onnx@ir8/opset17",
            "-o",
            str(out),
        ],
    )
    assert r.exit_code == 0, r.output
    produced = out / "mlp-onnx-float32-ir8-opset17.onnx"
    assert onnx.load(str(produced)).ir_version == 8
    report = json.loads((out / "mlp-onnx-float32-ir8-opset17.parity.json").read_text())
    assert report["parity"]["outputs"][0]["max_abs_error"] <= 1e-4


def test_convert_pickled_sklearn_model_warns_and_needs_trust(tmp_path: Path) -> None:
    estimator, x = models.random_forest()
    path = tmp_path / "forest.joblib"
    joblib.dump(estimator, path)
    samples = tmp_path / "x.npy"
    np.save(samples, x)
    args = ["convert", str(path), "--samples", str(samples), "-o", str(tmp_path / "o")]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2 and "executes code" in r.stderr
    r = CliRunner().invoke(main, [*args, "--trust-pickle"])
    assert r.exit_code == 0, r.output
    assert "unpickles" in r.stderr
    assert (tmp_path / "o" / "forest-onnx-float32.onnx").exists()


def test_variant_over_tolerance_is_refused_with_exit_1_and_report(
    tmp_path: Path, keys_dir: Path, mlp_files: tuple[Path, Path]
) -> None:
    model, samples = mlp_files
    out = tmp_path / "out"
    r = CliRunner().invoke(
        main,
        [
            "convert",
            str(model),
            "--samples",
            str(samples),
            "--target",
            "onnx:int8-static",
            "--atol",
            "1e-6",
            "--pack",
            "--name",
            "mlp",
            "--version",
            "1",
            "--key",
            "rel",
            "--keys-dir",
            str(keys_dir),
            "-o",
            str(out),
        ],
    )
    assert r.exit_code == 1
    assert "REFUSED [parity]" in r.stdout
    assert "refused onnx-int8-static [parity]:" in r.stdout and "not packed" in r.stdout
    assert "1 of 1 targets refused" in r.stderr
    assert not list(out.glob("*.efb"))


def test_pack_without_name_version_key_is_a_usage_error(
    tmp_path: Path, mlp_files: tuple[Path, Path]
) -> None:
    model, _ = mlp_files
    r = CliRunner().invoke(main, ["convert", str(model), "--pack", "-o", str(tmp_path)])
    assert r.exit_code == 2 and "--name, --version, --key" in r.output


def test_bad_target_spec_is_refused_with_advice(
    tmp_path: Path, mlp_files: tuple[Path, Path]
) -> None:
    model, _ = mlp_files
    r = CliRunner().invoke(main, ["convert", str(model), "--target", "coreml", "-o", str(tmp_path)])
    assert r.exit_code == 2 and "onnx:int8-dynamic@onnxruntime-1.16" in r.stderr


def test_torchscript_model_with_input_shape(tmp_path: Path) -> None:
    import torch

    module, x = models.torch_mlp()
    path = tmp_path / "mlp.pt"
    torch.jit.save(torch.jit.trace(module, torch.from_numpy(x[:2])), str(path))
    samples = tmp_path / "x.npy"
    np.save(samples, x)
    r = CliRunner().invoke(
        main,
        [
            "convert",
            str(path),
            "--input-shape",
            "2,16",
            "--samples",
            str(samples),
            "--target",
            "tflite",
            "-o",
            str(tmp_path / "o"),
        ],
    )
    assert r.exit_code == 0, r.output
    assert (tmp_path / "o" / "mlp-tflite-float32.tflite").read_bytes()[4:8] == b"TFL3"


def test_bundle_build_refuses_int8_static_without_calibration_samples(
    tmp_path: Path, keys_dir: Path, mlp_files: tuple[Path, Path]
) -> None:
    """Without --samples the calibrating target is refused by name; float32 still builds."""
    model, _ = mlp_files
    out = tmp_path / "out"
    r = CliRunner().invoke(
        main,
        [
            "bundle",
            "build",
            str(model),
            "--target",
            "onnx:int8-static",
            "--target",
            "onnx",
            "--name",
            "mlp",
            "--version",
            "1",
            "--key",
            "rel",
            "--keys-dir",
            str(keys_dir),
            "-o",
            str(out),
        ],
    )
    assert r.exit_code == 1, r.output
    assert "REFUSED [sample]" in r.stdout
    assert "refused onnx-int8-static [sample]:" in r.stdout
    assert "no calibration samples were given: give --samples" in r.stdout
    assert [b.name for b in out.glob("*.efb")] == ["mlp-v1-onnx-float32.efb"]
