"""Per-channel drift of image inputs, end to end on real parts: a CNN converted and
bundled by the converters, installed and run by the agent, its window summaries fed
to the rollout gates and to the report's heat map."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from converters.pipeline import build_bundles
from converters.reference import drift_profile, image_layout
from converters.targets import Target
from device_agent.agent import Agent
from device_agent.bundle import TrustStore, verify_file
from device_agent.config import AgentConfig
from device_agent.model import LoadedModel
from device_agent.payloads import DriftProfile
from device_agent.protocol import ContractError, FeatureDrift
from device_agent.telemetry import TelemetryOptions, psi
from device_agent.telemetry.stats import binned_counts, channel_values, threshold_counts
from device_agent.telemetry.window import ModelInfo, Window
from fleet_server.ingest.contract import validate_message
from fleet_server.report.aggregate import FeatureWindow, drift_cells
from fleet_server.report.dataset import DriftCell, ReviewDataset
from fleet_server.report.plots import plot_drift
from fleet_server.report.render import render_html
from fleet_server.rollouts.gates import CohortMetrics, CohortStats, Verdict, evaluate_gate
from fleet_server.rollouts.spec import GateKind, GateSpec
from tests import models
from tests.agent_models import install

CHANNELS = ["x[c0]", "x[c1]", "x[c2]"]
RED_CAST = 0.6


@pytest.fixture(scope="module", params=["onnx", "tflite"])
def cnn_bundle(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, TrustStore]:
    """The test zoo's 3-channel CNN, converted to ONNX or TFLite float32 and signed."""
    key = Ed25519PrivateKey.generate()
    trust = TrustStore(threshold=1)
    trust.add(key.public_key(), comment="release")
    source, _ = models.zoo_source("cnn")
    out = tmp_path_factory.mktemp("bundles")
    (result,) = build_bundles(
        source,
        [Target(request.param, "float32")],
        out,
        name="cnn",
        version=1,
        signing_key=key,
        samples=models.image_batch(256, seed=0),
    )
    assert result.error is None and result.bundle is not None
    return result.bundle, trust


@pytest.fixture
def agents() -> Iterator[list[Agent]]:
    made: list[Agent] = []
    yield made
    for a in made:
        a.close()


def run_agent(
    agents: list[Agent], model: LoadedModel, images: np.ndarray, batch: int = 1
) -> dict[str, Any]:
    """Predict ``images`` through a real agent; the closed window's summary body."""
    cfg = AgentConfig()
    cfg.telemetry.sample_rate = 0.0
    agent = Agent(
        cfg,
        None,
        model=model,
        start_worker=False,
        telemetry_options=TelemetryOptions(seed=1),
        copy_inputs=False,
    )
    agents.append(agent)
    for i in range(0, len(images), batch):
        agent.predict(images[i : i + batch])
    agent.telemetry.close_all()
    return dict(agent.telemetry.recent[-1])


def red_cast(images: np.ndarray) -> np.ndarray:
    out = images.copy()
    out[:, 0] += RED_CAST
    return out


def features_of(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f["name"]: f for f in summary["drift"]["features"]}


def test_the_bundle_records_one_feature_per_channel_and_how_the_layout_was_decided(
    cnn_bundle: tuple[Path, TrustStore],
) -> None:
    bundle, trust = cnn_bundle
    manifest = verify_file(bundle, trust).manifest
    ref = manifest.provenance["drift_reference"]
    assert ref["reduction"] == "channel_values" and ref["layout"] == "NCHW"
    assert "inferred" in ref["layout_from"]
    assert ref["samples"] == 256


def test_a_red_colour_cast_shows_on_channel_0_only(
    cnn_bundle: tuple[Path, TrustStore], tmp_path: Path, agents: list[Agent]
) -> None:
    bundle, trust = cnn_bundle
    model = install(bundle, tmp_path / "slot", trust)
    assert model.profile is not None and [f.name for f in model.profile.features] == CHANNELS
    fresh = models.image_batch(200, seed=7)  # the reference's distribution, other images

    same = features_of(run_agent(agents, model, fresh))
    cast = run_agent(agents, install(bundle, tmp_path / "slot2", trust), red_cast(fresh))
    shifted = features_of(cast)

    assert list(same) == list(shifted) == CHANNELS
    # 16 x 16 = 256 positions per image and channel, all binned
    assert all(sum(f["counts"]) == 200 * 256 for f in shifted.values())
    assert all(f["psi"] < 0.1 for f in same.values()), same
    assert shifted["x[c0]"]["psi"] > 1.0
    assert shifted["x[c1]"]["psi"] < 0.1 and shifted["x[c2]"]["psi"] < 0.1
    # the channel statistics: the red mean moved by the cast, the others did not
    assert shifted["x[c0]"]["mean"] - same["x[c0]"]["mean"] == pytest.approx(RED_CAST, abs=1e-4)
    for name in ("x[c1]", "x[c2]"):
        assert shifted[name]["mean"] == pytest.approx(same[name]["mean"], abs=1e-6)
        assert shifted[name]["std"] == pytest.approx(same[name]["std"], abs=1e-6)
    assert cast["drift"]["psi_max"] == shifted["x[c0]"]["psi"]
    # the server's contract accepts the summary and keeps the channel statistics
    message = {
        "device_id": "cam-1",
        "records": [{"seq": 1, "kind": "summary", "ts": cast["window_end"], "body": cast}],
    }
    checked = validate_message(json.dumps(message).encode(), "cam-1")
    assert checked.rejected == {}
    record = checked.records[0]
    assert record is not None
    drift = record.body.drift  # type: ignore[union-attr]
    assert drift is not None and drift.features[0].mean == shifted["x[c0]"]["mean"]


def test_batched_calls_bin_the_same_values_as_single_calls(
    cnn_bundle: tuple[Path, TrustStore], tmp_path: Path, agents: list[Agent]
) -> None:
    bundle, trust = cnn_bundle
    images = red_cast(models.image_batch(64, seed=3))
    one = features_of(run_agent(agents, install(bundle, tmp_path / "a", trust), images))
    eight = features_of(run_agent(agents, install(bundle, tmp_path / "b", trust), images, 8))
    for name in CHANNELS:
        assert one[name]["counts"] == eight[name]["counts"]
        assert one[name]["mean"] == pytest.approx(eight[name]["mean"], rel=1e-9)


def test_the_gates_breach_on_the_red_channel_and_count_images_not_pixels(
    cnn_bundle: tuple[Path, TrustStore], tmp_path: Path, agents: list[Agent]
) -> None:
    bundle, trust = cnn_bundle
    control_sum = run_agent(
        agents, install(bundle, tmp_path / "a", trust), models.image_batch(150, seed=11)
    )
    canary_sum = run_agent(
        agents, install(bundle, tmp_path / "b", trust), red_cast(models.image_batch(150, seed=12))
    )

    def cohort(s: dict[str, Any]) -> CohortStats:
        return CohortStats(
            devices=1,
            inferences=s["count"],
            drift_psi=s["drift"]["psi_max"],
            drift_samples=s["count"],
            feature_counts={f["name"]: tuple(f["counts"]) for f in s["drift"]["features"]},
        )

    canary, control = cohort(canary_sum), cohort(control_sum)
    assert canary.feature_samples == 150  # images, not 150 x 256 pixel values
    metrics = CohortMetrics(canary=canary, control=control)
    vs_control = GateSpec(GateKind.DRIFT_PSI, 0.2, min_samples=100, against="control")
    got = evaluate_gate(vs_control, metrics, live_control=True)
    assert got.verdict is Verdict.BREACH and "(x[c0])" in got.detail
    assert got.canary_samples == 150
    vs_reference = GateSpec(GateKind.DRIFT_PSI, 0.2, min_samples=100)
    assert evaluate_gate(vs_reference, metrics, live_control=True).verdict is Verdict.BREACH
    # the same gate on the unshifted cohort passes; with too few images it waits
    calm = CohortMetrics(canary=control, control=control)
    assert evaluate_gate(vs_control, calm, live_control=True).verdict is Verdict.PASS
    few = GateSpec(GateKind.DRIFT_PSI, 0.2, min_samples=151, against="control")
    assert evaluate_gate(few, metrics, live_control=True).verdict is Verdict.WAIT
    # tabular features keep counting rows (a batched call adds one per row)
    tabular = CohortStats(inferences=10, feature_counts={"f0": (30, 50), "f1": (60, 20)})
    assert tabular.feature_samples == 80


def test_the_report_heat_map_has_a_row_per_channel(
    cnn_bundle: tuple[Path, TrustStore], tmp_path: Path, agents: list[Agent]
) -> None:
    bundle, trust = cnn_bundle
    model = install(bundle, tmp_path / "slot", trust)
    assert model.profile is not None
    references = {"cnn v1": {f.name: f.proportions for f in model.profile.features}}
    rows = []
    for group, images in (
        ("studio", models.image_batch(120, seed=21)),
        ("warm-lights", red_cast(models.image_batch(120, seed=22))),
    ):
        s = run_agent(agents, install(bundle, tmp_path / group, trust), images)
        counts = {f["name"]: f["counts"] for f in s["drift"]["features"]}
        rows.append(FeatureWindow(group, "cnn v1", s["count"], counts))
    cells, missing = drift_cells(rows, references)
    assert missing == []
    by = {(c.group, c.feature): c.psi for c in cells}
    assert sorted({c.feature for c in cells}) == CHANNELS
    assert by[("warm-lights", "x[c0]")] > 1.0
    assert max(by[("warm-lights", "x[c1]")], by[("warm-lights", "x[c2]")]) < 0.1
    assert max(by[("studio", f)] for f in CHANNELS) < 0.1

    now = datetime(2026, 12, 1, tzinfo=timezone.utc)
    svg = plot_drift(ReviewDataset(generated_at=now, since=now, until=now, drift=tuple(cells)))
    assert svg is not None
    labels = [t.split("<")[0] for t in svg.split(">") if t.startswith("x[c")]
    assert labels == CHANNELS  # one labelled row per channel, top to bottom
    page = render_html(ReviewDataset(generated_at=now, since=now, until=now, drift=tuple(cells)))
    assert all(name in page for name in CHANNELS)


def test_heat_map_rows_follow_channel_numbers() -> None:
    now = datetime(2026, 12, 1, tzinfo=timezone.utc)
    names = [f"img[c{c}]" for c in range(12)]
    cells = tuple(DriftCell("g", n, 0.01 * i) for i, n in enumerate(sorted(names)))
    svg = plot_drift(ReviewDataset(generated_at=now, since=now, until=now, drift=cells))
    assert svg is not None
    assert [t.split("<")[0] for t in svg.split(">") if t.startswith("img[c")] == names


# ----------------------------------------------------------------- layout and statistics
def test_nhwc_and_nchw_give_the_same_channel_values() -> None:
    rng = np.random.default_rng(0)
    nchw = rng.normal(size=(5, 3, 40, 40)).astype(np.float32)  # 1600 positions: every 7th
    nhwc = np.ascontiguousarray(nchw.transpose(0, 2, 3, 1))
    a, b = channel_values(nchw, "NCHW"), channel_values(nhwc, "NHWC")
    assert a.shape == (3, 5, 229)
    assert np.array_equal(a, b)
    assert np.array_equal(a[1, 2], nchw[2, 1].ravel()[::7])
    with pytest.raises(ValueError):
        channel_values(nchw[0], "NCHW")


def test_a_channels_last_profile_names_channels_from_the_last_axis() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(64, 12, 12, 3)).astype(np.float32)
    x[..., 2] += 5.0
    profile = drift_profile("img", x, None, None, "regression")
    assert profile.layout == "NHWC" and [f.name for f in profile.features] == [
        "img[c0]",
        "img[c1]",
        "img[c2]",
    ]
    assert profile.features[2].mean == pytest.approx(float(x[..., 2].mean()), rel=1e-6)
    assert DriftProfile.from_json(json.loads(json.dumps(profile.to_json()))) == profile


@pytest.mark.parametrize(
    "shape,origin,layout",
    [
        ((8, 3, 32, 32), "onnx", "NCHW"),
        ((8, 1, 28, 28), "torch", "NCHW"),
        ((8, 32, 32, 3), "onnx", "NHWC"),
        (("batch", 224, 224, 3), "tflite", "NHWC"),
        ((8, 3, 4, 4), "onnx", "NCHW"),
        ((8, 64, 16, 16), "tflite", "NHWC"),
        ((8, 3, 32, 32), "tflite", "NCHW"),
    ],
)
def test_image_layout_inference(shape: tuple[Any, ...], origin: str, layout: str) -> None:
    got, how = image_layout(shape, origin)
    assert got == layout and "inferred" in how


def test_threshold_counts_equal_the_searchsorted_binning_at_the_edges() -> None:
    rng = np.random.default_rng(2)
    edges = np.sort(rng.normal(size=9))
    v = np.concatenate(
        [rng.normal(size=5000), edges, np.nextafter(edges, -np.inf), np.nextafter(edges, np.inf)]
    )
    for values in (v, v.astype(np.float32)):
        assert threshold_counts(values, edges).tolist() == binned_counts(values, edges).tolist()
    strided = rng.normal(size=(4, 3, 50)).astype(np.float32)[:, 1]
    expected = binned_counts(strided.ravel(), edges).tolist()
    assert threshold_counts(strided, edges).tolist() == expected


def test_older_summaries_without_channel_statistics_are_accepted() -> None:
    FeatureDrift(name="f0", counts=[1, 2], psi=0.1, ks=0.1)
    FeatureDrift(name="x[c0]", counts=[1, 2], mean=0.5, std=0.2)
    with pytest.raises(ContractError):
        FeatureDrift(name="x[c0]", counts=[1], std=-1.0)
    with pytest.raises(ContractError):
        FeatureDrift(name="x[c0]", counts=[1], mean=float("nan"))
    assert psi([1, 1], [1, 1]) == 0.0


@pytest.mark.parametrize("side", [16, 40])  # small images joined first; large ones cut first
def test_window_counts_and_moments_match_a_direct_computation(side: int) -> None:
    rng = np.random.default_rng(3)
    ref = rng.normal(size=(32, side, side, 3)).astype(np.float32)
    profile = drift_profile("x", ref, None, None, "regression")
    assert profile.layout == "NHWC"
    calls = [rng.normal(0.2, 1.1, size=(1, side, side, 3)).astype(np.float32) for _ in range(50)]
    window = Window(ModelInfo("m", 1, "a", ("x",), ("y",), profile), 0.0, 60.0, None, None)
    window.add_batch(np.full(50, 1000, np.int64), calls, [None] * 50)
    got = window.drift_json()
    assert got is not None and window.drift_failures == 0
    values = channel_values(np.concatenate(calls), "NHWC")
    for c, f in enumerate(got["features"]):
        edges = np.asarray(profile.features[c].edges)
        assert f["counts"] == binned_counts(values[c].ravel(), edges).tolist()
        assert f["mean"] == pytest.approx(float(values[c].astype(np.float64).mean()), rel=1e-9)
        assert f["std"] == pytest.approx(float(values[c].astype(np.float64).std()), rel=1e-6)


def test_channels_nothing_was_binned_for_get_no_drift_figure() -> None:
    """An agent that predates per-channel features sends zero counts for them: the
    report shows no figure for those rows instead of a PSI of 0 ("no drift")."""
    ref = {"cnn v1": {"x[c0]": [0.5, 0.5], "x[c1]": [0.5, 0.5]}}
    rows = [
        FeatureWindow("old-agents", "cnn v1", 50, {"x[c0]": [0, 0], "x[c1]": [0, 0]}),
        FeatureWindow("new-agents", "cnn v1", 50, {"x[c0]": [90, 10], "x[c1]": [50, 50]}),
    ]
    cells, _ = drift_cells(rows, ref)
    assert {(c.group, c.feature) for c in cells} == {
        ("new-agents", "x[c0]"),
        ("new-agents", "x[c1]"),
    }
