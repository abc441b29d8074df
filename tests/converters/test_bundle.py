"""Source model + targets -> signed bundles a device verifies, installs and smoke-tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from converters.errors import ParityError
from converters.parity import Tolerance
from converters.pipeline import build_bundles, convert
from converters.reference import bin_profile, drift_profile, features
from converters.targets import Target
from device_agent.bundle import TrustStore, unpack_bundle, verify_file
from device_agent.model import SmokeTestError, load_model, run_smoke_test
from device_agent.payloads import DriftProfile
from tests import models


@pytest.fixture(scope="module")
def release_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def trust(release_key: Ed25519PrivateKey) -> TrustStore:
    store = TrustStore(threshold=1)
    store.add(release_key.public_key(), comment="release")
    return store


CASES = [
    (
        "cnn",
        [
            Target("onnx", "float32"),
            Target("onnx", "int8-static"),
            Target("tflite", "float16"),
            Target("tflite", "int8-dynamic"),
        ],
    ),
    ("mlp", [Target("onnx", "float16"), Target("tflite", "float32")]),
    ("pipeline", [Target("onnx", "float32", runtime_version="1.16")]),
    ("forest", [Target("onnx", "float32")]),
    ("forest_regressor", [Target("onnx", "float32")]),
    ("onnx_mlp", [Target("onnx", "int8-dynamic"), Target("tflite", "float32")]),
]


@pytest.mark.parametrize("name,targets", CASES, ids=[c[0] for c in CASES])
def test_bundles_verify_install_and_pass_their_smoke_test(
    tmp_path: Path,
    release_key: Ed25519PrivateKey,
    trust: TrustStore,
    name: str,
    targets: list[Target],
) -> None:
    source, x = models.zoo_source(name)
    steps: list[str] = []
    results = build_bundles(
        source,
        targets,
        tmp_path / "out",
        name=f"zoo-{name.replace('_', '-')}",
        version=3,
        signing_key=release_key,
        samples=x,
        progress=steps.append,
    )
    assert [r.error for r in results] == [None] * len(targets)
    assert any("packing" in s for s in steps) and any("parity" in s for s in steps)
    for result in results:
        assert result.bundle is not None and result.artifact is not None
        verified = verify_file(result.bundle, trust)
        manifest = verified.manifest
        assert manifest.format == result.target.format
        prov = manifest.provenance
        assert prov["parity"]["passed"] is True
        assert prov["parity"]["variant"] == result.target.name
        assert prov["source"]["sha256"] == source.sha256
        assert prov["target"]["precision"] == result.target.precision
        slot = tmp_path / "slots" / result.target.name
        unpack_bundle(result.bundle, slot, trust)
        loaded = load_model(slot)
        assert loaded.smoke is not None and loaded.profile is not None
        report = run_smoke_test(loaded)
        assert report["ran"] is True
        if result.target.precision.startswith("int8") and source.is_classifier:
            assert loaded.smoke.check == "top1"
        # the installed model computes what the parity check measured
        out = loaded.run({loaded.backend.input_names[0]: x[:4]})[0]
        ref = source.reference({source.inputs[0].name: x[:4]})[0]
        if result.target.precision == "float32":
            assert float(np.max(np.abs(out - ref.reshape(out.shape)))) <= 1e-4


def test_smoke_test_catches_a_model_that_computes_something_else(
    tmp_path: Path, release_key: Ed25519PrivateKey, trust: TrustStore
) -> None:
    source, x = models.zoo_source("mlp")
    artifact = convert(source, Target("onnx"), samples=x)
    other, _ = models.zoo_source("onnx_mlp")  # different weights, different classes
    artifact2 = convert(models.zoo_source("cnn")[0], Target("onnx"), samples=models.image_batch(8))
    assert artifact2.smoke.inputs  # sanity: a different model's smoke samples exist
    # Pack the MLP with smoke samples whose expected outputs were tampered with.
    tampered = artifact.smoke
    bad_expected = {k: np.roll(v, 1, axis=-1) for k, v in tampered.expected.items()}
    artifact.smoke = type(tampered)(
        inputs=tampered.inputs, expected=bad_expected, check="allclose", atol=1e-4, rtol=1e-3
    )
    from converters.pipeline import pack_artifact

    path = pack_artifact(
        artifact, tmp_path / "b.efb", name="mlp", version=1, signing_key=release_key
    )
    unpack_bundle(path, tmp_path / "slot", trust)
    with pytest.raises(SmokeTestError):
        run_smoke_test(load_model(tmp_path / "slot"))
    assert other.outputs[0].name == "probs"


def test_failing_target_does_not_stop_the_others_and_is_not_packed(
    tmp_path: Path, release_key: Ed25519PrivateKey
) -> None:
    source, x = models.zoo_source("cnn")
    targets = [Target("onnx", "int8-static"), Target("onnx", "float32")]
    results = build_bundles(
        source,
        targets,
        tmp_path,
        name="cnn",
        version=1,
        signing_key=release_key,
        samples=x,
        tolerances={"onnx-int8-static": Tolerance(atol=1e-3)},
    )
    refused, packed = results
    assert isinstance(refused.error, ParityError) and refused.bundle is None
    assert not refused.error.report.passed
    assert packed.error is None and packed.bundle is not None and packed.bundle.exists()
    assert sorted(p.name for p in tmp_path.glob("*.efb")) == ["cnn-v1-onnx-float32.efb"]


def test_drift_profile_of_image_input_is_per_channel(tmp_path: Path) -> None:
    source, x = models.zoo_source("cnn")
    artifact = convert(source, Target("onnx"), samples=x)
    profile = artifact.profile
    assert profile.reduction == "channel_values" and profile.layout == "NCHW"
    assert [f.name for f in profile.features] == ["x[c0]", "x[c1]", "x[c2]"]
    assert profile.sample_count == len(x)
    for c, feat in enumerate(profile.features):
        assert feat.mean == pytest.approx(float(x[:, c].mean()), rel=1e-5)
        assert feat.std == pytest.approx(float(x[:, c].std()), rel=1e-4)
        assert abs(sum(feat.proportions) - 1.0) < 1e-9
        assert len(feat.proportions) == len(feat.edges) + 1
        assert list(feat.edges) == sorted(feat.edges)
    assert profile.output is not None and profile.output.kind == "classification"
    assert profile.output.classes == models.CNN_CLASSES
    # round-trips through the device's parser
    assert DriftProfile.from_json(json.loads(json.dumps(profile.to_json()))) == profile


def test_drift_profile_uses_training_samples_when_given() -> None:
    source, x = models.zoo_source("pipeline")
    calib = x[:50]
    artifact = convert(source, Target("onnx"), samples=calib, reference_samples=x)
    assert artifact.parity.samples == 50
    assert artifact.profile.sample_count == len(x)
    assert len(artifact.profile.features) == models.TABULAR_FEATURES
    # reference proportions reproduce the agent's binning rule on the same data
    feats, _ = features(x)
    f0 = artifact.profile.features[0]
    counts = np.bincount(
        np.searchsorted(f0.edges, feats[:, 0], side="right"), minlength=len(f0.edges) + 1
    )
    np.testing.assert_allclose(counts / counts.sum(), f0.proportions)


def test_regressor_output_profile_is_quantile_bins() -> None:
    source, x = models.zoo_source("forest_regressor")
    artifact = convert(source, Target("onnx"), samples=x)
    out = artifact.profile.output
    assert out is not None and out.kind == "regression"
    assert len(out.edges) >= 5 and abs(sum(out.proportions) - 1) < 1e-9


def test_constant_feature_gets_a_single_bin() -> None:
    edges, props = bin_profile(np.full(100, 3.0))
    assert edges == (3.0,) and props == (0.0, 1.0)
    profile = drift_profile("x", np.zeros((10, 2)), None, None, "regression")
    assert all(sum(f.proportions) == 1.0 for f in profile.features)


def test_smoke_samples_pick_clear_margins_for_classifiers() -> None:
    source, x = models.zoo_source("mlp")
    artifact = convert(source, Target("onnx", "int8-dynamic"), samples=x, allow_parity_failure=True)
    smoke = artifact.smoke
    assert smoke.check == "top1" and smoke.min_top1_agreement == 1.0
    probs = artifact.smoke.expected[source.outputs[0].name]
    s = np.sort(probs, axis=-1)
    all_probs = source.reference({"x": x})[0]
    all_sorted = np.sort(all_probs, axis=-1)
    assert np.min(s[:, -1] - s[:, -2]) >= np.median(all_sorted[:, -1] - all_sorted[:, -2])


def test_unquantized_int8_bundle_is_packed_only_on_request_and_labelled_float32(
    tmp_path: Path, release_key: Ed25519PrivateKey, trust: TrustStore
) -> None:
    source, x = models.zoo_source("forest_regressor")
    kwargs = dict(name="forest", version=1, signing_key=release_key, samples=x)
    refused = build_bundles(source, [Target("onnx", "int8-dynamic")], tmp_path / "a", **kwargs)
    assert refused[0].code == "nothing_quantized" and refused[0].bundle is None
    packed = build_bundles(
        source, [Target("onnx", "int8-dynamic")], tmp_path / "b", allow_unquantized=True, **kwargs
    )
    assert packed[0].bundle is not None
    manifest = verify_file(packed[0].bundle, trust).manifest
    assert manifest.labels["precision"] == "float32"
    assert manifest.labels["requested_precision"] == "int8-dynamic"
    assert manifest.labels["quantized"] == "no"
    assert manifest.provenance["quantization"]["packed_unquantized"] is True


def test_manifest_parity_records_held_out_batch_1_samples_and_bounds(
    tmp_path: Path, release_key: Ed25519PrivateKey
) -> None:
    source, x = models.zoo_source("cnn")
    results = build_bundles(
        source,
        [Target("onnx", "int8-static"), Target("tflite", "float32")],
        tmp_path,
        name="cnn",
        version=1,
        signing_key=release_key,
        samples=x,
    )
    for r in results:
        assert r.bundle is not None, r.message
        from converters.bundle import read_header

        parity = read_header(r.bundle)[0].provenance["parity"]
        assert parity["batch_sizes"] == [1]
        assert parity["samples"] == (32 if r.target.precision == "int8-static" else 64)
        assert "other_batch_sizes" in parity and "8" in parity["other_batch_sizes"]
        assert parity["tolerance"] and parity["outputs"][0]["batch"] == 1
        if r.target.precision == "int8-static":
            assert parity["calibration_samples"] == 32
            assert "held out for validation" in parity["samples_origin"]
            assert "top1_wilson95" in parity["outputs"][0]
        else:
            assert "bound_at_worst_element" in parity["outputs"][0]
