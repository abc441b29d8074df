"""Findings of issue 13 about the CLI, as a new user meets them: one failing target in
`bundle build`, `bundle pack` of a torch export with external data or without drift
profile / smoke samples, and a fixed-batch torch.export program with --samples."""

from __future__ import annotations

from pathlib import Path

import joblib
import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from converters.keys import KeyStore
from device_agent.bundle import TrustStore, unpack_bundle, verify_file
from device_agent.model import load_model
from fleet_server.cli import main
from tests import models


@pytest.fixture()
def keys_dir(tmp_path: Path) -> Path:
    d = tmp_path / "keys"
    r = CliRunner().invoke(main, ["keys", "generate", "--name", "rel", "--keys-dir", str(d)])
    assert r.exit_code == 0, r.output
    return d


def test_one_target_failing_lands_in_the_table_and_the_others_are_still_built(
    tmp_path: Path, keys_dir: Path
) -> None:
    """StandardScaler + PCA + LogisticRegression at onnx:float16 used to crash the build."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = models.tabular_data()
    est = make_pipeline(StandardScaler(), PCA(n_components=3), LogisticRegression()).fit(x, y)
    model = tmp_path / "pipe.joblib"
    joblib.dump(est, model)
    samples = tmp_path / "x.npy"
    np.save(samples, x.astype(np.float32))
    out = tmp_path / "out"
    r = CliRunner().invoke(
        main,
        [
            "bundle",
            "build",
            str(model),
            "--trust-pickle",
            "--samples",
            str(samples),
            "--target",
            "onnx",
            "--target",
            "onnx:float16",
            "--target",
            "tflite",
            "--name",
            "pipe",
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
    assert (
        "Traceback" not in r.output and r.exception is None or isinstance(r.exception, SystemExit)
    )
    table = r.stdout
    assert "onnx-float16" in table and "REFUSED [" in table
    row = next(line for line in table.splitlines() if line.startswith("onnx-float16"))
    code = row.split("REFUSED [", 1)[1].split("]", 1)[0]
    assert code in ("artifact_load", "nothing_quantized", "parity", "quantization")
    assert f"refused onnx-float16 [{code}]:" in table
    assert "of 3 targets refused" in r.stderr
    built = sorted(p.name for p in out.glob("*.efb"))
    assert "pipe-v1-onnx-float32.efb" in built  # the target before still built
    assert len(built) == 3 - sum(1 for line in table.splitlines() if "REFUSED" in line)


def test_bundle_pack_inlines_onnx_external_data_so_the_device_can_load_it(
    tmp_path: Path, keys_dir: Path
) -> None:
    import torch

    module, x = models.torch_mlp()
    path = tmp_path / "model.onnx"
    torch.onnx.export(
        module,
        (torch.from_numpy(x[:2]),),
        str(path),
        dynamo=True,
        external_data=True,
        input_names=["x"],
    )
    external = onnx.load(str(path), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in external.graph.initializer)
    bundle = tmp_path / "m.efb"
    r = CliRunner().invoke(
        main,
        [
            "bundle",
            "pack",
            str(path),
            "--name",
            "m",
            "--version",
            "1",
            "-o",
            str(bundle),
            "--allow-placeholders",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "inlined external data model.onnx.data" in r.stderr
    r = CliRunner().invoke(
        main, ["bundle", "sign", str(bundle), "--key", "rel", "--keys-dir", str(keys_dir)]
    )
    assert r.exit_code == 0, r.output
    trust = TrustStore(threshold=1)
    trust.add(KeyStore(keys_dir).public_key("rel"), comment="rel")
    verify_file(bundle, trust)
    slot = tmp_path / "slot"
    unpack_bundle(bundle, slot, trust)
    (tmp_path / "model.onnx.data").unlink()  # the device has only the bundle
    loaded = load_model(slot)
    got = loaded.run({loaded.backend.input_names[0]: x[:2]})[0]
    ref = module(torch.from_numpy(x[:2])).detach().numpy()
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_bundle_pack_refuses_external_data_that_is_missing_and_says_how_to_fix(
    tmp_path: Path,
) -> None:
    import torch

    module, x = models.torch_mlp()
    path = tmp_path / "model.onnx"
    torch.onnx.export(
        module,
        (torch.from_numpy(x[:2]),),
        str(path),
        dynamo=True,
        external_data=True,
        input_names=["x"],
    )
    (tmp_path / "model.onnx.data").unlink()
    r = CliRunner().invoke(
        main,
        [
            "bundle",
            "pack",
            str(path),
            "--name",
            "m",
            "--version",
            "1",
            "-o",
            str(tmp_path / "m.efb"),
            "--allow-placeholders",
        ],
    )
    assert r.exit_code == 2
    assert "external data model.onnx.data" in r.output and "external_data=False" in r.output
    assert not (tmp_path / "m.efb").exists()


def test_bundle_pack_without_drift_profile_and_smoke_samples_needs_the_flag(
    tmp_path: Path,
) -> None:
    model, _ = models.onnx_helper_mlp()
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    args = [
        "bundle",
        "pack",
        str(path),
        "--name",
        "m",
        "--version",
        "1",
        "-o",
        str(tmp_path / "m.efb"),
    ]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2
    assert "no --drift-profile and no --smoke-samples" in r.output
    assert "edgefleet bundle build" in r.output and "--allow-placeholders" in r.output
    r = CliRunner().invoke(main, [*args, "--allow-placeholders"])
    assert r.exit_code == 0, r.output
    assert "warning: --drift-profile not given" in r.stderr
    assert "warning: --smoke-samples not given" in r.stderr


def test_fixed_batch_pt2_with_samples_gets_the_dynamic_shapes_hint(tmp_path: Path) -> None:
    import torch

    module, x = models.torch_mlp()
    path = tmp_path / "fixed.pt2"
    torch.export.save(torch.export.export(module, (torch.from_numpy(x[:1]),)), str(path))
    samples = tmp_path / "x.npy"
    np.save(samples, x)
    for extra in (["--samples", str(samples)], ["--input-shape", "4,16"]):
        r = CliRunner().invoke(main, ["convert", str(path), *extra, "-o", str(tmp_path / "o")])
        assert r.exit_code == 2, r.output
        assert "fixes the batch size" in r.output and "dynamic_shapes=" in r.output
        assert "Guard failed" not in r.output
