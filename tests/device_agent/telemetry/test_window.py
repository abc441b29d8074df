"""Telemetry windows: drift statistics, latency histograms, rollover, stratified
samples and field masking, checked by hand and through a real SQLite store."""

from __future__ import annotations

import hashlib
import json
import math
import sqlite3
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_agent.agent import Agent
from device_agent.bundle import TrustStore
from device_agent.config import AgentConfig
from device_agent.model import LoadedModel
from device_agent.payloads import DriftProfile, FeatureProfile, OutputProfile
from device_agent.protocol import LATENCY_BUCKETS_MS
from device_agent.store import TelemetryStore
from device_agent.telemetry import (
    ModelInfo,
    StratifiedSampler,
    TelemetryOptions,
    Window,
    allocate,
    ks_binned,
    psi,
)
from tests.agent_models import cnn_onnx, install, make_bundle, make_profile, mlp_onnx, softmax_onnx


@pytest.fixture
def load(tmp_path: Path) -> Any:
    key = Ed25519PrivateKey.generate()
    trust = TrustStore()
    trust.add(key.public_key(), comment="test")
    count = [0]

    def _load(data: bytes, profile: DriftProfile | None = None) -> LoadedModel:
        count[0] += 1
        b = make_bundle(tmp_path / "src", key, model_bytes=data, version=count[0], profile=profile)
        return install(b, tmp_path / f"slot{count[0]}" / "a", trust, "a")

    return _load


@pytest.fixture
def agents() -> Iterator[list[Agent]]:
    made: list[Agent] = []
    yield made
    for a in made:
        a.close()


def agent_for(
    agents: list[Agent],
    model: LoadedModel,
    store: Any = None,
    *,
    sample_rate: float = 0.01,
    window: float = 60.0,
    drop: tuple[str, ...] = (),
    hashed: tuple[str, ...] = (),
    **kw: Any,
) -> Agent:
    cfg = AgentConfig()
    cfg.telemetry.sample_rate = sample_rate
    cfg.telemetry.window_seconds = window
    cfg.telemetry.drop_fields = list(drop)
    cfg.telemetry.hash_fields = list(hashed)
    kw.setdefault("start_worker", False)
    kw.setdefault("telemetry_options", TelemetryOptions(seed=1))
    a = Agent(cfg, store, model=model, **kw)
    agents.append(a)
    return a


def bodies(store: TelemetryStore, kind: str) -> list[dict[str, Any]]:
    return [r.body for r in store.pending(100000, kinds=[kind])]


# ----------------------------------------------------------------- pure statistics
def test_psi_and_ks_match_hand_computed_values() -> None:
    # observed 50/30/20 against 40/40/20
    expected_psi = 0.1 * math.log(0.5 / 0.4) + (-0.1) * math.log(0.3 / 0.4)
    assert psi([50, 30, 20], [0.4, 0.4, 0.2]) == pytest.approx(expected_psi)
    assert ks_binned([50, 30, 20], [0.4, 0.4, 0.2]) == pytest.approx(0.1)
    assert psi([25, 25, 50], [0.25, 0.25, 0.5]) == pytest.approx(0.0)
    assert psi([0, 0, 0], [0.4, 0.4, 0.2]) is None


def test_psi_clips_empty_bins_at_epsilon_instead_of_going_infinite() -> None:
    eps = 1e-4
    expected = (1 - 0.5) * math.log(1 / 0.5) + (eps - 0.5) * math.log(eps / 0.5)
    assert psi([100, 0], [0.5, 0.5]) == pytest.approx(expected)
    assert math.isfinite(psi([100, 0], [1.0, 0.0]) or 0.0)


def test_window_bins_features_and_predictions_exactly_as_the_profile_says() -> None:
    profile = DriftProfile(
        input="x",
        features=(
            FeatureProfile("f0", 0, (0.0,), (0.5, 0.5)),
            FeatureProfile("f1", 1, (-1.0, 1.0), (0.25, 0.5, 0.25)),
        ),
        output=OutputProfile("probs", "classification", (0.5, 0.5), classes=2),
    )
    info = ModelInfo.describe("m", 1, "a", ["x"], ["probs"], profile)
    w = Window(info, 0.0, 60.0, None, None)
    xs = [[-1, -2], [-0.5, 0], [0.5, 1], [0.0, 5]]
    ps = [[0.9, 0.1], [0.2, 0.8], [0.3, 0.7], [0.6, 0.4]]
    classes = w.add_batch(
        np.full(4, 1_000_000, np.int64),
        [{"x": np.asarray([v], np.float32)} for v in xs],
        [[np.asarray([p], np.float32)] for p in ps],
    )
    assert classes.tolist() == [0, 1, 1, 0]
    drift = w.summary(60.0, {})["drift"]
    f0, f1 = drift["features"]
    assert f0["counts"] == [2, 2]  # 0.0 falls right of the edge 0.0
    assert f1["counts"] == [1, 1, 2]
    assert f0["psi"] == pytest.approx(0.0) and f0["ks"] == pytest.approx(0.0)
    assert f1["psi"] == pytest.approx(0.5 * math.log(2))
    assert f1["ks"] == pytest.approx(0.25)
    assert drift["psi_max"] == pytest.approx(0.5 * math.log(2))
    assert drift["prediction"] == {"counts": [2, 2], "psi": pytest.approx(0.0)}


def test_latency_histogram_uses_protocol_buckets_and_percentiles_are_close() -> None:
    info = ModelInfo.describe("m", 1, "a", ["x"], ["y"], None)
    w = Window(info, 0.0, 60.0, None, None)
    lat = np.asarray([500_000] * 90 + [20_000_000] * 10, np.int64)  # 0.5 ms and 20 ms
    w.add_batch(lat, [None] * 100, [None] * 100)
    s = w.summary(60.0, {"samples": 0, "summaries": 0})
    assert len(s["latency_hist"]) == len(LATENCY_BUCKETS_MS) + 1
    assert s["latency_hist"][LATENCY_BUCKETS_MS.index(0.5)] == 90
    assert s["latency_hist"][LATENCY_BUCKETS_MS.index(20)] == 10
    assert sum(s["latency_hist"]) == 100
    assert s["latency_ms"]["mean"] == pytest.approx(2.45)
    assert s["latency_ms"]["p50"] == pytest.approx(0.5, rel=0.01)
    assert s["latency_ms"]["p95"] == pytest.approx(20.0, rel=0.01)
    assert s["latency_ms"]["p99"] == pytest.approx(20.0, rel=0.01)
    assert s["count"] == 100 and s["drift"] is None and s["shadow"] is None


# ----------------------------------------------------------------- drift end to end
def test_drift_is_small_on_reference_inputs_and_large_when_inputs_shift(
    load: Any, agents: list[Agent], tmp_path: Path
) -> None:
    import onnxruntime as ort

    data = mlp_onnx(0)
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(4000, 16)).astype(np.float32)
    preds = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"x": ref})[0]
    store = TelemetryStore(tmp_path / "t.db", max_bytes=8 << 20)
    agent = agent_for(agents, load(data, make_profile(ref, preds)), store)
    for row in rng.normal(size=(2000, 16)).astype(np.float32):
        agent.predict(row[None, :])
    agent.telemetry.close_all()
    for row in rng.normal(loc=2.0, size=(2000, 16)).astype(np.float32):
        agent.predict(row[None, :])
    agent.telemetry.close_all()
    same, shifted = bodies(store, "summary")
    assert same["count"] == shifted["count"] == 2000
    assert all(sum(f["counts"]) == 2000 for f in same["drift"]["features"])
    assert same["drift"]["psi_max"] < 0.1 and same["drift"]["ks_max"] < 0.1
    assert shifted["drift"]["psi_max"] > 1.0 and shifted["drift"]["ks_max"] > 0.5
    assert sum(same["drift"]["prediction"]["counts"]) == 2000
    assert same["drift"]["prediction"]["psi"] < 0.1
    assert shifted["drift"]["prediction"]["psi"] > same["drift"]["prediction"]["psi"]
    store.close()


def test_channel_mean_drift_on_a_cnn(load: Any, agents: list[Agent]) -> None:
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(64, 3, 32, 32)).astype(np.float32)
    agent = agent_for(
        agents,
        load(cnn_onnx(0), make_profile(ref, None, reduction="channel_mean")),
        copy_inputs=False,
    )
    for _ in range(40):
        agent.predict(rng.normal(loc=0.5, size=(1, 3, 32, 32)).astype(np.float32))
    agent.telemetry.close_all()
    drift = agent.telemetry.recent[-1]["drift"]
    assert [f["name"] for f in drift["features"]] == ["f0", "f1", "f2"]
    assert all(sum(f["counts"]) == 40 for f in drift["features"])
    # every channel mean moved past the top reference edge: KS is 1 - p(last bin)
    assert drift["ks_max"] > 0.85 and drift["psi_max"] > 2.0


# ----------------------------------------------------------------- windows
def test_windows_roll_over_on_aligned_boundaries(
    load: Any, agents: list[Agent], tmp_path: Path
) -> None:
    clock = [1003.0]
    store = TelemetryStore(tmp_path / "t.db", max_bytes=4 << 20)
    agent = agent_for(agents, load(mlp_onnx(0)), store, window=10.0, wall=lambda: clock[0])
    x = np.zeros((1, 16), np.float32)

    def calls(n: int) -> None:
        for _ in range(n):
            agent.predict(x)

    calls(3)
    agent.telemetry.tick(1009.0)
    assert bodies(store, "summary") == []
    calls(2)
    agent.telemetry.tick(1010.2)
    calls(4)
    agent.telemetry.tick(1021.0)
    agent.telemetry.tick(1055.0)  # an idle window writes nothing and is skipped
    calls(1)
    agent.telemetry.close_all(1057.0)
    got = [(s["window_start"], s["window_end"], s["count"]) for s in bodies(store, "summary")]
    assert got == [(1003.0, 1010.0, 5), (1010.0, 1020.0, 4), (1050.0, 1057.0, 1)]
    store.close()


def test_the_worker_thread_closes_windows_by_itself(
    load: Any, agents: list[Agent], tmp_path: Path
) -> None:
    store = TelemetryStore(tmp_path / "t.db", max_bytes=4 << 20)
    cfg_agent = agent_for(agents, load(mlp_onnx(0)), store, window=0.2, start_worker=True)
    cfg_agent.config.telemetry.flush_interval_seconds = 0.05
    for _ in range(10):
        cfg_agent.predict(np.zeros((1, 16), np.float32))
    deadline = time.monotonic() + 10
    while not bodies(store, "summary") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sum(s["count"] for s in bodies(store, "summary")) == 10
    store.close()


def test_calls_beyond_the_buffer_bound_still_count_their_latency(
    load: Any, agents: list[Agent]
) -> None:
    ref = np.random.default_rng(0).normal(size=(100, 16)).astype(np.float32)
    agent = agent_for(
        agents,
        load(mlp_onnx(0), make_profile(ref, None)),
        telemetry_options=TelemetryOptions(wake_batch=4, max_buffered=8),
    )
    for _ in range(20):
        agent.predict(ref[:1])
    agent.telemetry.close_all()
    s = agent.telemetry.recent[-1]
    assert s["count"] == 20 and sum(s["latency_hist"]) == 20
    assert sum(s["drift"]["features"][0]["counts"]) == 8  # only the buffered calls


# ----------------------------------------------------------------- sampling
def test_allocate_splits_equally_and_gives_spare_to_rare_classes() -> None:
    assert allocate(100, {0: 500, 1: 500, 2: 3}) == {0: 49, 1: 48, 2: 3}
    assert allocate(3, {0: 10, 1: 10, 2: 10, 3: 10}, {0: 900, 1: 5, 2: 50, 3: 45}) == {
        0: 0,
        1: 1,
        2: 1,
        3: 1,
    }
    assert allocate(10, {0: 2}) == {0: 2}


def test_stratified_sampler_keeps_every_prediction_of_a_rare_class() -> None:
    rng = np.random.default_rng(0)
    s = StratifiedSampler(0.01, 400, 4, rng)
    classes = np.asarray([0] * 10000 + [3] * 5)
    rng.shuffle(classes)
    for start in range(0, len(classes), 256):
        chunk = classes[start : start + 256]

        def item(i: int, start: int = start) -> int:
            return start + i

        s.offer(chunk, item)
    picked = s.take(len(classes))
    by_class = {c: [i for k, i in picked if k == c] for c in (0, 3)}
    assert len(by_class[3]) == 5  # a uniform 1 % sample would expect 0.05 of them
    assert all(classes[i] == 3 for i in by_class[3])
    assert len(picked) in (100, 101)
    assert len(set(by_class[0])) == len(by_class[0])  # without replacement


def test_samples_are_stratified_by_predicted_class_end_to_end(
    load: Any, agents: list[Agent], tmp_path: Path
) -> None:
    store = TelemetryStore(tmp_path / "t.db", max_bytes=8 << 20)
    agent = agent_for(agents, load(softmax_onnx(4)), store, sample_rate=0.02)
    common = np.asarray([[5, 0, 0, 0]], np.float32)
    rare = np.asarray([[0, 0, 0, 5]], np.float32)
    order = np.zeros(5000, bool)
    order[np.random.default_rng(3).choice(5000, 10, replace=False)] = True
    for is_rare in order:
        agent.predict(rare if is_rare else common)
    agent.telemetry.close_all()
    samples = bodies(store, "samples")
    predicted = [s["predicted"] for s in samples]
    assert predicted.count(3) == 10
    assert predicted.count(0) == 64  # the common class is capped at its share
    s3 = next(s for s in samples if s["predicted"] == 3)
    x = np.frombuffer(__import__("base64").b64decode(s3["inputs"]["x"]["data"]), np.float32)
    assert x.tolist() == [0, 0, 0, 5]
    assert set(s3) == {"name", "version", "predicted", "inputs", "outputs"}
    store.close()


def _file_bytes(db: Path) -> bytes:
    out = b""
    for p in (db, db.with_name(db.name + "-wal")):
        if p.exists():
            out += p.read_bytes()
    return out


def test_dropped_and_hashed_fields_never_reach_the_sqlite_file(
    load: Any, agents: list[Agent], tmp_path: Path
) -> None:
    db = tmp_path / "t.db"
    store = TelemetryStore(db, max_bytes=4 << 20)
    secret = 4321.25
    agent = agent_for(
        agents, load(softmax_onnx(4)), store, sample_rate=1.0, drop=("probs",), hashed=("x[1]",)
    )
    x = np.asarray([[1234.5, secret, 0.0, 0.0]], np.float32)
    for _ in range(5):
        agent.predict(x)
    agent.telemetry.close_all()
    store.close()
    rows = sqlite3.connect(db).execute("SELECT body FROM telemetry_samples").fetchall()
    assert len(rows) == 5
    digest = "sha256:" + hashlib.sha256(struct.pack("<f", secret)).hexdigest()
    for (raw,) in rows:
        body = json.loads(raw)
        assert "probs" not in body["outputs"]
        assert body["inputs"]["x"]["values"] == [1234.5, digest, 0.0, 0.0]
        assert body["predicted"] == 1
    raw_file = _file_bytes(db)
    assert b"4321.25" not in raw_file and struct.pack("<f", secret) not in raw_file
    assert digest.encode() in raw_file


def test_a_hashed_tensor_is_stored_only_as_its_digest(
    load: Any, agents: list[Agent], tmp_path: Path
) -> None:
    db = tmp_path / "t.db"
    store = TelemetryStore(db, max_bytes=4 << 20)
    agent = agent_for(agents, load(softmax_onnx(4)), store, sample_rate=1.0, hashed=("x",))
    x = np.asarray([[1234.5, 4321.25, 7.0, 9.0]], np.float32)
    agent.predict(x)
    agent.telemetry.close_all()
    store.close()
    (raw,) = sqlite3.connect(db).execute("SELECT body FROM telemetry_samples").fetchone()
    body = json.loads(raw)
    assert body["inputs"]["x"] == "sha256:" + hashlib.sha256(x.tobytes()).hexdigest()
    assert "probs" in body["outputs"]
    raw_file = _file_bytes(db)
    assert x.tobytes() not in raw_file and b"1234.5" not in raw_file
    assert __import__("base64").b64encode(x.tobytes()) not in raw_file


def test_a_field_naming_nothing_stores_no_samples_and_reports_why(
    load: Any, agents: list[Agent], tmp_path: Path
) -> None:
    store = TelemetryStore(tmp_path / "t.db", max_bytes=4 << 20)
    agent = agent_for(agents, load(softmax_onnx(4)), store, sample_rate=1.0, drop=("ssn",))
    agent.predict(np.ones((1, 4), np.float32))
    agent.telemetry.close_all()
    assert bodies(store, "samples") == []
    (event,) = bodies(store, "events")
    assert event["outcome"] == "samples_disabled" and "'ssn'" in event["message"]
    assert bodies(store, "summary")[0]["count"] == 1
    store.close()


def test_a_record_the_store_refuses_is_dropped_and_counted_not_retried(
    load: Any, agents: list[Agent], tmp_path: Path
) -> None:
    store = TelemetryStore(tmp_path / "t.db", max_bytes=4 << 20, max_record_bytes=4096)
    agent = agent_for(agents, load(cnn_onnx(0)), store, sample_rate=1.0, copy_inputs=False)
    agent.predict(np.zeros((1, 3, 32, 32), np.float32))  # its sample is about 16 KiB
    agent.telemetry.close_all()
    assert agent.telemetry.invalid_records == 1
    assert bodies(store, "samples") == []
    assert bodies(store, "summary")[0]["count"] == 1
    agent.telemetry.tick()
    assert agent.telemetry.invalid_records == 1
    store.close()


def test_records_are_kept_and_written_later_when_the_store_fails(
    load: Any, agents: list[Agent], tmp_path: Path
) -> None:
    store = TelemetryStore(tmp_path / "t.db", max_bytes=4 << 20)
    agent = agent_for(agents, load(mlp_onnx(0)), store)
    agent.predict(np.zeros((1, 16), np.float32))
    store.close()  # the store is gone: writes raise
    agent.telemetry.close_all()
    assert agent.telemetry.write_failures == 1
    reopened = TelemetryStore(tmp_path / "t.db", max_bytes=4 << 20)
    agent.telemetry.sink = reopened
    agent.telemetry.tick()
    (summary,) = bodies(reopened, "summary")
    assert summary["count"] == 1
    reopened.close()
