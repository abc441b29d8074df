"""The update path driving the real embedding :class:`~device_agent.agent.Agent`, wired
by :class:`~device_agent.daemon.AgentDaemon` (its loop is not started; the test drives
the updater), against a real HTTP server."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from device_agent.agent import PredictError
from device_agent.config import AgentConfig
from device_agent.daemon import AgentDaemon
from tests.bundlesim import BundleSim, replace_data, rewrite, tiny_onnx_model
from tests.httpfixtures import SMOKE_INPUT, BundleServer, publish, reference_outputs


@pytest.fixture
def server() -> Iterator[BundleServer]:
    srv = BundleServer().start()
    yield srv
    srv.stop()


@pytest.fixture
def daemon(tmp_path: Path, sim: BundleSim, server: BundleServer) -> Iterator[AgentDaemon]:
    trust = tmp_path / "trust.json"
    sim.trust("release").save(trust)
    cfg = AgentConfig.from_dict(
        {
            "device": {
                "id": "dev-a",
                "state_dir": str(tmp_path / "state"),
                "trust_store": str(trust),
            },
            "server": {"url": server.url},
            "update": {
                "probation_seconds": 30.0,
                "probation_min_predictions": 10,
                "probation_max_error_rate": 0.2,
            },
        }
    )
    d = AgentDaemon(cfg)
    d.updater.boot()
    d.updater.install_file(publish(sim, version=1, seed=1), probation=False)
    yield d
    d.agent.close()
    d.store.close()
    d.updater.unlock()


def served(d: AgentDaemon) -> np.ndarray:
    return np.asarray(d.agent.predict(SMOKE_INPUT)[0])


def test_tampered_assignment_is_refused_and_agent_keeps_serving_old_model(
    daemon: AgentDaemon, server: BundleServer, sim: BundleSim, tmp_path: Path
) -> None:
    good = publish(sim, version=2, seed=2)
    server.offer(
        rewrite(
            good, tmp_path / "t.efb", lambda ms: replace_data(ms, "model.onnx", tiny_onnx_model(6))
        ),
        version=2,
    )
    daemon.updater.check()
    assert np.allclose(served(daemon), reference_outputs(1), atol=1e-6)
    assert server.reports[-1]["error_code"] == "hash_mismatch"
    events = [r.body for r in daemon.store.pending(100, kinds=["events"])]
    assert any(
        e.get("outcome") == "refused" and e.get("error_code") == "hash_mismatch" for e in events
    )


def test_shadow_runs_in_the_agent_but_only_the_active_model_is_served(
    daemon: AgentDaemon, server: BundleServer, sim: BundleSim
) -> None:
    v1 = next(Path(sim.root).glob("smoked-tiny-1-1-*/*.efb"))
    server.offer(v1, version=1, shadow=publish(sim, version=2, seed=2), shadow_version=2)
    daemon.updater.check()
    shadow = daemon.agent.shadow
    assert shadow is not None and shadow.version == 2
    assert daemon.agent.model is not None and daemon.agent.model.version == 1
    assert np.allclose(served(daemon), reference_outputs(1), atol=1e-6)


def test_probation_with_real_agent_error_counts_rolls_back(
    daemon: AgentDaemon, server: BundleServer, sim: BundleSim
) -> None:
    server.offer(publish(sim, version=2, seed=2), version=2)
    assert daemon.updater.check().value == "probation"
    assert np.allclose(served(daemon), reference_outputs(2), atol=1e-6)
    for _ in range(12):
        with pytest.raises(PredictError):
            daemon.agent.predict(np.zeros((1, 9), np.float32))
    deadline = time.monotonic() + 10
    while daemon.updater.tick().value != "idle":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert daemon.updater.history[-4:] == [
        "probation_failed",
        "rolling_back",
        "rolled_back",
        "idle",
    ]
    assert np.allclose(served(daemon), reference_outputs(1), atol=1e-6)
    assert server.reports[-1]["outcome"] == "rolled_back"
    assert "error rate" in server.reports[-1]["message"]


def test_telemetry_policy_in_the_assignment_is_applied(
    daemon: AgentDaemon, server: BundleServer, sim: BundleSim
) -> None:
    doc = server.offer(publish(sim, version=2, seed=2), version=2)
    doc["telemetry"] = {"sample_rate": 0.25, "window_seconds": 30}
    daemon.updater.check()
    cfg = daemon.agent.telemetry.config
    assert (cfg.sample_rate, cfg.window_seconds) == (0.25, 30.0)
    doc["telemetry"] = {"sample_rate": 7.0}  # out of range: refused, nothing changes
    doc["assignment_id"] = "changed"
    daemon.updater.check()
    assert (cfg.sample_rate, cfg.window_seconds) == (0.25, 30.0)
