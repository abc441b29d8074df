"""The embedding API on real runtimes: predict, errors, atomic swap, shadow, install.

Models are real onnxruntime sessions (and a real TFLite interpreter) loaded from
real signed bundles through the same verify-unpack-load path a device takes.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_agent.agent import (
    Agent,
    InputError,
    InstallError,
    NoActiveModelError,
    PredictError,
)
from device_agent.bundle import TrustStore
from device_agent.config import AgentConfig
from device_agent.model import LoadedModel
from device_agent.payloads import SmokeSamples
from device_agent.store import TelemetryStore
from tests.agent_models import add_onnx, install, make_bundle, mlp_onnx, smoke_for
from tests.bundlesim import read_members, replace_data, write_members


@dataclasses.dataclass
class Kit:
    root: Path
    key: Ed25519PrivateKey
    trust: TrustStore
    n: int = 0

    def bundle(
        self,
        model_bytes: bytes,
        *,
        name: str = "m",
        version: int = 1,
        fmt: str = "onnx",
        smoke: SmokeSamples | None = None,
    ) -> Path:
        return make_bundle(
            self.root,
            self.key,
            model_bytes=model_bytes,
            fmt=fmt,
            name=name,
            version=version,
            smoke=smoke,
        )

    def load(
        self,
        model_bytes: bytes,
        *,
        name: str = "m",
        version: int = 1,
        fmt: str = "onnx",
        slot: str = "a",
    ) -> LoadedModel:
        self.n += 1
        path = self.bundle(model_bytes, name=name, version=version, fmt=fmt)
        return install(path, self.root / f"slots-{self.n}" / slot, self.trust, slot)


@pytest.fixture
def kit(tmp_path: Path) -> Kit:
    key = Ed25519PrivateKey.generate()
    trust = TrustStore()
    trust.add(key.public_key(), comment="test")
    return Kit(tmp_path, key, trust)


@pytest.fixture
def make_agent() -> Iterator[Callable[..., Agent]]:
    agents: list[Agent] = []

    def build(model: LoadedModel | None = None, store: Any = None, **kw: Any) -> Agent:
        cfg = kw.pop("config", None) or AgentConfig()
        kw.setdefault("start_worker", False)
        a = Agent(cfg, store, model=model, **kw)
        agents.append(a)
        return a

    yield build
    for a in agents:
        a.close()


def reference(model_bytes: bytes, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]  # type: ignore[no-any-return]


def x16(seed: int = 0, n: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 16)).astype(np.float32)


# ----------------------------------------------------------------- predict
def test_predict_onnx_returns_the_runtime_outputs(kit: Kit, make_agent: Any) -> None:
    data = mlp_onnx(0)
    agent = make_agent(kit.load(data))
    x = x16()
    (y,) = agent.predict(x)
    np.testing.assert_array_equal(y, reference(data, x))
    (y2,) = agent.predict({"x": x})
    np.testing.assert_array_equal(y2, y)
    named = agent.predict_named(x)
    assert list(named) == ["probs"] and np.array_equal(named["probs"], y)
    assert agent.output_names == ["probs"]


def test_predict_tflite_matches_onnx(kit: Kit, make_agent: Any) -> None:
    import onnx

    from converters.tflite import onnx_to_tflite

    data = mlp_onnx(3)
    tfl = onnx_to_tflite(onnx.load_from_string(data))
    model = kit.load(tfl, fmt="tflite")
    assert model.backend.name in ("ai-edge-litert", "tflite-runtime")
    agent = make_agent(model)
    x = x16(1, n=1)
    (y,) = agent.predict(x)
    np.testing.assert_allclose(y, reference(data, x), atol=1e-5)
    (yb,) = agent.predict(x16(2, n=5))  # a different batch size resizes the interpreter
    np.testing.assert_allclose(yb, reference(data, x16(2, n=5)), atol=1e-5)
    strided = np.asfortranarray(np.vstack([x, x]))[:1]
    assert not strided.flags.c_contiguous
    np.testing.assert_allclose(agent.predict(strided)[0], reference(data, x), atol=1e-5)
    (y64,) = agent.predict(x.astype(np.float64))  # converted like the backend does
    np.testing.assert_allclose(y64, y, atol=1e-6)
    agent.telemetry.close_all()
    assert agent.telemetry.recent[-1]["count"] == 4


def test_predict_before_any_install_raises_no_active_model(make_agent: Any) -> None:
    agent = make_agent()
    with pytest.raises(NoActiveModelError, match="install_file"):
        agent.predict(x16())


def test_runtime_failure_is_counted_and_wrapped_in_predict_error(kit: Kit, make_agent: Any) -> None:
    agent = make_agent(kit.load(mlp_onnx(0)))
    agent.predict(x16())
    bad = np.zeros((1, 7), np.float32)  # wrong feature count
    with pytest.raises(PredictError, match="m v1 failed") as info:
        agent.predict(bad)
    assert info.value.__cause__ is not None
    assert "onnxruntime" in type(info.value.__cause__).__module__
    assert agent.stats()["active"]["errors"] == 1
    assert agent.stats()["active"]["count"] == 2
    agent.telemetry.close_all()
    summary = agent.telemetry.recent[-1]
    assert (summary["count"], summary["errors"]) == (2, 1)


def test_single_array_for_a_multi_input_model_raises_input_error(kit: Kit, make_agent: Any) -> None:
    agent = make_agent(kit.load(add_onnx(4)))
    a = np.ones((1, 4), np.float32)
    with pytest.raises(InputError, match="pass a dict"):
        agent.predict(a)
    (y,) = agent.predict({"a": a, "b": 2 * a})
    np.testing.assert_array_equal(y, 3 * a)


# ----------------------------------------------------------------- swap
def test_swap_under_concurrency_every_result_is_from_exactly_one_model(
    kit: Kit, make_agent: Any
) -> None:
    d0, d1 = mlp_onnx(0), mlp_onnx(1)
    m0, m1 = kit.load(d0, version=1), kit.load(d1, version=2, slot="b")
    x = x16(5)
    y0, y1 = reference(d0, x), reference(d1, x)
    assert not np.allclose(y0, y1)
    agent = make_agent(m0, start_worker=True)
    stop = threading.Event()
    seen = {"m0": 0, "m1": 0}
    failures: list[str] = []

    def hammer() -> None:
        while not stop.is_set():
            try:
                (y,) = agent.predict(x)
            except Exception as e:  # noqa: BLE001 - recorded and asserted below
                failures.append(repr(e))
                return
            a, b = np.array_equal(y, y0), np.array_equal(y, y1)
            if a == b:
                failures.append(f"result matches {'both' if a else 'neither'} model")
                return
            seen["m0" if a else "m1"] += 1

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for t in threads:
        t.start()
    for i in range(30):
        old = agent.swap(m1 if i % 2 == 0 else m0)
        assert old is (m0 if i % 2 == 0 else m1)
        time.sleep(0.002)
    stop.set()
    for t in threads:
        t.join(10)
    assert failures == []
    assert seen["m0"] > 0 and seen["m1"] > 0


class GatedBackend:
    """A real backend whose ``run`` waits at a gate first, to hold a call in flight."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.name = inner.name
        self.version = inner.version
        self.input_names = inner.input_names
        self.output_names = inner.output_names
        self.inputs = inner.inputs
        self.outputs = inner.outputs
        self.fast_path = "fallback"
        self.gate = threading.Event()
        self.entered = threading.Event()

    def run(self, inputs: Any) -> list[np.ndarray]:
        self.entered.set()
        assert self.gate.wait(10)
        return self.inner.run(inputs)  # type: ignore[no-any-return]

    def fast_runner(self) -> Any:
        return self.run


def test_swap_returns_only_after_in_flight_calls_on_the_old_model_finished(
    kit: Kit, make_agent: Any
) -> None:
    d0, d1 = mlp_onnx(0), mlp_onnx(1)
    m0 = kit.load(d0)
    gated = GatedBackend(m0.backend)
    old = dataclasses.replace(m0, backend=gated)
    new = kit.load(d1, version=2, slot="b")
    x = x16(7)
    agent = make_agent(old)
    results: dict[str, Any] = {}
    in_flight = threading.Thread(target=lambda: results.update(old=agent.predict(x)[0]))
    in_flight.start()
    assert gated.entered.wait(5)
    swapper = threading.Thread(target=lambda: results.update(swapped=agent.swap(new)))
    swapper.start()
    deadline = time.monotonic() + 5
    while agent.model is not new and time.monotonic() < deadline:
        time.sleep(0.005)
    assert agent.model is new
    # new calls already run on the new model while the old call is still in flight
    np.testing.assert_array_equal(agent.predict(x)[0], reference(d1, x))
    time.sleep(0.2)
    assert swapper.is_alive() and "swapped" not in results  # old model not released yet
    gated.gate.set()
    in_flight.join(5)
    swapper.join(5)
    np.testing.assert_array_equal(results["old"], reference(d0, x))
    assert results["swapped"] is old


def test_a_kept_predict_error_does_not_hold_the_old_model(kit: Kit, make_agent: Any) -> None:
    agent = make_agent(kit.load(mlp_onnx(0)))
    try:
        agent.predict(np.zeros((1, 3), np.float32))
    except PredictError as e:
        kept = e  # an application that stores the error keeps its traceback alive
    t0 = time.monotonic()
    agent.swap(kit.load(mlp_onnx(1), version=2, slot="b"), drain_timeout=5)
    assert time.monotonic() - t0 < 2
    assert kept.__traceback__ is not None


def test_swap_writes_the_old_models_partial_window(
    kit: Kit, make_agent: Any, tmp_path: Path
) -> None:
    store = TelemetryStore(tmp_path / "t.db", max_bytes=4 << 20)
    agent = make_agent(kit.load(mlp_onnx(0)), store=store)
    for _ in range(5):
        agent.predict(x16())
    agent.swap(kit.load(mlp_onnx(1), version=2, slot="b"))
    summaries = [r.body for r in store.pending(100, kinds=["summary"])]
    assert [(s["version"], s["count"], s["slot"]) for s in summaries] == [(1, 5, "a")]
    assert summaries[0]["rollout_id"] is None
    agent.set_rollout_id("r-42")
    agent.predict(x16())
    agent.close()
    last = [r.body for r in store.pending(100, kinds=["summary"])][-1]
    assert (last["version"], last["count"], last["rollout_id"]) == (2, 1, "r-42")
    store.close()


# ----------------------------------------------------------------- shadow
def test_shadow_serves_the_active_output_and_records_agreement(kit: Kit, make_agent: Any) -> None:
    d0, d1 = mlp_onnx(0), mlp_onnx(1)
    agent = make_agent(kit.load(d0))
    candidate = kit.load(d1, version=2, slot="b")
    assert agent.set_shadow(candidate) is None
    xs = x16(11, n=300)
    for i in range(300):
        (y,) = agent.predict(xs[i : i + 1])
        np.testing.assert_array_equal(y, reference(d0, xs[i : i + 1]))
    agent.telemetry.close_all()
    shadow = agent.telemetry.recent[-1]["shadow"]
    expected = float(np.mean(reference(d0, xs).argmax(1) == reference(d1, xs).argmax(1)))
    assert 0 < expected < 1  # the two models really disagree sometimes
    assert shadow["name"] == "m" and shadow["version"] == 2
    assert shadow["count"] == 300 and shadow["errors"] == 0
    assert shadow["agreement"] == pytest.approx(expected)
    assert shadow["latency_ms"]["p50"] > 0
    assert agent.set_shadow(None) is candidate


def test_shadow_identical_candidate_agrees_fully_and_failures_are_counted(
    kit: Kit, make_agent: Any
) -> None:
    agent = make_agent(kit.load(mlp_onnx(0)))
    agent.set_shadow(kit.load(mlp_onnx(0), version=2, slot="b"))
    for i in range(50):
        agent.predict(x16(i))
    agent.telemetry.tick()
    agent.set_shadow(kit.load(add_onnx(4), version=3, slot="b"))  # cannot run these inputs
    for i in range(20):
        agent.predict(x16(i))
    agent.telemetry.close_all()
    shadow = agent.telemetry.recent[-1]["shadow"]
    assert (shadow["version"], shadow["count"], shadow["errors"]) == (3, 20, 20)
    assert shadow["agreement"] == 0.0


# ----------------------------------------------------------------- install
def test_install_file_verifies_installs_smoke_tests_and_swaps(
    kit: Kit, make_agent: Any, tmp_path: Path
) -> None:
    x = x16(3, n=4)
    d1, d2 = mlp_onnx(0), mlp_onnx(1)
    state = tmp_path / "state"
    agent = make_agent()
    m1 = agent.install_file(
        kit.bundle(d1, version=1, smoke=smoke_for(d1, x)), kit.trust, state_dir=state
    )
    assert (m1.slot, m1.version, agent.model) == ("a", 1, m1)
    m2 = agent.install_file(
        kit.bundle(d2, version=2, smoke=smoke_for(d2, x)), kit.trust, state_dir=state
    )
    assert (m2.slot, m2.version, agent.model) == ("b", 2, m2)
    np.testing.assert_array_equal(agent.predict(x)[0], reference(d2, x))
    assert json.loads((state / "active.json").read_text())["slot"] == "b"
    # a new agent (an application restart) installs nothing and serves the active slot
    again = make_agent()
    with pytest.raises(InstallError):  # v1 is older than the installed v2
        again.install_file(kit.bundle(d1, version=1), kit.trust, state_dir=state)
    assert again.model is not None and again.model.version == 2


def test_install_file_refuses_tampered_rolled_back_and_smoke_failing_bundles(
    kit: Kit, make_agent: Any, tmp_path: Path
) -> None:
    x = x16(3, n=4)
    d2 = mlp_onnx(1)
    agent = make_agent()
    slots = tmp_path / "state"
    agent.install_file(
        kit.bundle(d2, version=2, smoke=smoke_for(d2, x)), kit.trust, state_dir=slots
    )
    good = agent.model

    tampered_src = kit.bundle(mlp_onnx(5), version=3)
    members = read_members(tampered_src)
    tampered = write_members(
        tmp_path / "tampered.efb", replace_data(members, "model.onnx", mlp_onnx(6))
    )
    with pytest.raises(InstallError) as e1:
        agent.install_file(tampered, kit.trust, state_dir=slots)
    assert e1.value.code == "hash_mismatch"

    with pytest.raises(InstallError) as e2:
        agent.install_file(kit.bundle(mlp_onnx(7), version=1), kit.trust, state_dir=slots)
    assert e2.value.code == "rollback"

    wrong = SmokeSamples(inputs={"x": x}, expected={"probs": reference(d2, x)})  # not m4's
    with pytest.raises(InstallError, match="smoke") as e3:
        agent.install_file(
            kit.bundle(mlp_onnx(8), version=4, smoke=wrong), kit.trust, state_dir=slots
        )
    assert e3.value.code == "smoke_test_failed"

    assert agent.model is good  # the old model kept serving throughout
    np.testing.assert_array_equal(agent.predict(x)[0], reference(d2, x))


# ----------------------------------------------------------------- inputs kept for telemetry
def test_inputs_are_copied_so_later_writes_do_not_change_telemetry(
    kit: Kit, make_agent: Any
) -> None:
    from tests.agent_models import make_profile

    ref = np.random.default_rng(0).normal(size=(500, 16)).astype(np.float32)
    model = kit.load(mlp_onnx(0))
    model.profile = make_profile(ref, None)
    agent = make_agent(model)
    buf = np.full((1, 16), -100.0, np.float32)  # lowest bin of every feature
    for _ in range(10):
        agent.predict(buf)
        buf[:] = 100.0  # the application reuses its buffer right after the call
        buf[:] = -100.0
    buf[:] = 100.0
    agent.telemetry.close_all()
    feats = agent.telemetry.recent[-1]["drift"]["features"]
    assert all(f["counts"][0] == 10 and sum(f["counts"]) == 10 for f in feats)
