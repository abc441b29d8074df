"""End to end: canaries judged by labelled accuracy and against the model they replace.

A real server process, a real Mosquitto with per-device ACLs, and real agents (one
``AgentDaemon`` per simulated device: its own state directory, A/B slots, telemetry
store and MQTT connection). The devices' apps post the true class of their
predictions (``predict_with_id`` then ``label``), and every updated device keeps the
model it replaced running on a sample of inputs:

* a retrained model (same task, new seed) passes the accuracy and agreement gates and
  completes;
* a model that is worse on labelled samples (under-trained: about 78 % right where its
  predecessor is about 100 %) is rolled back by the accuracy gate;
* a label-permutation model (the previous one with its classes cyclically shifted) is
  rolled back at the first stage by agreement, while on balanced inputs it passes the
  distribution gates (prediction-shift PSI against the control, input drift against its
  reference profile).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from converters.keys import KeyStore
from device_agent.bundle import TrustStore
from fleet_server.broker.mosquitto import SERVER_USER, LocalMosquitto
from fleet_server.cli.rollout_view import render_status
from fleet_server.client import AdminClient
from fleet_server.demo.services import ServerProcess
from fleet_server.images.build import agent_config_text
from fleet_server.images.recipe import load_class
from fleet_server.simulator.device import SimDevice
from fleet_server.simulator.fleet import ClassPlan, Fleet
from fleet_server.simulator.streams import CENTERS, CLASSES, N_FEATURES, sample
from tests.e2e.test_rollouts import CLASS, Setup, _converge, _decisions

DEVICES = 8
STAGES = [
    {"percent": 50, "min_devices": 1, "soak_seconds": 4},
    {"percent": 100, "min_devices": 1, "soak_seconds": 0},
]
INSTALLS = {"kind": "install_failure_rate", "threshold": 0.2, "min_samples": 1}
ACCURACY = {"kind": "accuracy", "threshold": 0.02, "min_samples": 300}
AGREEMENT = {"kind": "shadow_agreement", "threshold": 0.7, "min_samples": 400}
DISTRIBUTION = [
    {"kind": "error_rate", "threshold": 0.05, "min_samples": 150},
    {"kind": "drift_psi", "threshold": 0.25, "min_samples": 150, "against": "reference"},
    {
        "kind": "prediction_shift",
        "threshold": 0.1,
        "min_samples": 150,
        "against": "control",
        "metric": "psi",
    },
]


def balanced(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Inputs with every class equally frequent (where a permutation leaves the
    prediction distribution as it was)."""
    y = rng.integers(0, len(CLASSES), size=n)
    x = CENTERS[y] + rng.normal(0.0, 1.0, size=(n, N_FEATURES)).astype(np.float32)
    return x.astype(np.float32), y


def _module(kind: str, seed: int) -> Any:
    import torch
    from torch import nn

    from fleet_server.demo.model import train

    if kind == "worse":
        return train(seed, steps=2)[0]  # under-trained: right about 78 % of the time
    model = train(seed, steps=150)[0]
    if kind == "permuted":  # predicts class (c + 1) % 3 where the model says c
        k = len(CLASSES)
        shift = nn.Linear(k, k, bias=False)
        with torch.no_grad():
            shift.weight.copy_(torch.roll(torch.eye(k), 1, dims=0))
        model = nn.Sequential(model, shift)
        model.eval()
    return model


def _bundle(
    root: Path, key: Any, version: int, kind: str, seed: int, name: str = "condition"
) -> Path:
    from converters.pipeline import build_bundles
    from converters.source import from_torch
    from converters.targets import parse_target

    module = _module(kind, seed)
    calib, _ = balanced(512, np.random.default_rng(seed + 1))
    source = from_torch(
        module, calib[:8], input_names=["x"], output_names=["probs"], task="classification"
    )
    (result,) = build_bundles(
        source,
        [parse_target("onnx:float32", (CLASS,))],
        root / "bundles",
        name=name,
        version=version,
        signing_key=key,
        samples=calib,
        reference_samples=calib,
    )
    assert result.bundle is not None, result.error
    return result.bundle


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("release")
    keys = KeyStore(root / "keys")
    info = keys.generate("release")
    trust = TrustStore()
    trust.add(keys.public_key(info.keyid))
    trust.save(root / "trust.json")
    key = keys.private_key(info.keyid)
    return {
        "root": root,
        "keyid": info.keyid,
        "trust": root / "trust.json",
        "v1": _bundle(root, key, 1, "healthy", 11),
        "v2": _bundle(root, key, 2, "healthy", 22),  # retrained
        "v3": _bundle(root, key, 3, "worse", 33),
        "v5": _bundle(root, key, 5, "permuted", 22),  # v2 with its classes shifted
    }


@pytest.fixture
def setup(tmp_path: Path, release: dict[str, Any]) -> Iterator[Setup]:
    broker = LocalMosquitto(tmp_path / "broker")
    broker.add_user(SERVER_USER, "server-secret")
    broker.start()
    admin_token = "e2e-admin-" + secrets.token_urlsafe(24)
    settings = {
        "environment": "development",
        "database_url": f"sqlite:///{tmp_path / 'server.db'}",
        "bundle_dir": str(tmp_path / "bundles"),
        "trust_store": str(release["trust"]),
        "signing_key_dir": str(release["root"] / "keys"),
        "signing_key": release["keyid"],
        "admin_bootstrap_token": admin_token,
        "mqtt_host": "127.0.0.1",
        "mqtt_port": str(broker.port),
        "mqtt_username": SERVER_USER,
        "mqtt_password": "server-secret",
        "telemetry_window_seconds": "1",
        "rollout_interval_seconds": "1",
        "assignment_cache_seconds": "0.5",
    }
    server: ServerProcess | None = None
    fleet: Fleet | None = None
    try:
        server = ServerProcess(tmp_path / "server", settings).start()
        admin = AdminClient(server.url, admin_token)
        ids = {v: admin.upload_bundle(release[v])["id"] for v in ("v1", "v2", "v3", "v5")}
        image = tmp_path / "image"
        image.mkdir()
        (image / "agent.toml").write_text(
            agent_config_text(load_class(CLASS), server.url, "127.0.0.1", broker.port)
        )
        (image / "trust.json").write_bytes(release["trust"].read_bytes())
        fleet = Fleet(
            tmp_path / "fleet",
            server_url=server.url,
            mqtt_host="127.0.0.1",
            mqtt_port=broker.port,
            window_seconds=1.0,
            poll_seconds=1.0,
        )
        fleet.overrides["telemetry"]["compare_previous_rate"] = 0.5
        fleet.provision([ClassPlan(CLASS, DEVICES, image)])
        tokens = {
            d.device_id: admin.post("/enrollment-tokens", json={"device_class": CLASS})["token"]
            for d in fleet.devices
        }
        fleet.enroll(lambda d: tokens[d.device_id])
        for d in fleet.devices:
            broker.add_user(d.device_id, d.credential())
        broker.reload()
        fleet.start()
        group = admin.post("/groups", json={"name": "gateways", "device_class": CLASS})["id"]
        yield Setup(broker, [server], admin, fleet, group, ids)
    finally:
        if fleet is not None:
            fleet.stop()
        if server is not None:
            server.stop()
        broker.stop()


def _app_calls(d: SimDevice, n: int, rng: np.random.Generator, inputs: str) -> None:
    """What an app on the device does: predict with an id, later post the true class."""
    agent = d.agent
    if agent is None or agent.model is None:
        return
    x, y = balanced(n, rng) if inputs == "balanced" else sample(n, rng)
    for i in range(n):
        try:
            pid, _ = agent.predict_with_id(x[i : i + 1])
            agent.label(pid, int(y[i]))
        except Exception:  # noqa: BLE001 - a swap may race a label; the app carries on
            pass


def _run(s: Setup, rollout_id: str | None, inputs: str, timeout: float = 150) -> dict[str, Any]:
    """Drive the devices' apps (about 40 labelled predictions/s each) until the rollout
    ends (returns it), or for ``timeout`` seconds when there is none."""
    rngs = {d.device_id: np.random.default_rng(i) for i, d in enumerate(s.fleet.devices)}
    start = last = time.monotonic()
    while time.monotonic() - start < timeout:
        online = [d for d in s.fleet.devices if d.online]
        s.fleet.each(lambda d: _app_calls(d, 10, rngs[d.device_id], inputs), online)
        if rollout_id is not None and time.monotonic() - last >= 1.0:
            last = time.monotonic()
            r = s.admin.get(f"/rollouts/{rollout_id}")
            if r["status"] in ("succeeded", "rolled_back", "aborted", "paused"):
                return dict(r)
        time.sleep(0.25)
    if rollout_id is None:
        return {}
    raise AssertionError(f"rollout {rollout_id} did not finish in {timeout} s")


def _rollout(s: Setup, version: str, previous: str, gates: list[dict[str, Any]]) -> str:
    body = {
        "name": f"condition {version}",
        "bundle_id": s.ids[version],
        # named, not left to the server: it would pick what most devices last reported
        "previous_bundle_id": previous,
        "group": s.group,
        "strategy": "staged_canary",
        "stages": STAGES,
        "gates": gates,
        "failure_policy": "rollback",
        "start": True,
    }
    return str(s.admin.post("/rollouts", json=body)["id"])


def _gate_line(s: Setup, rollout_id: str, name: str) -> str:
    """The gate's line in ``rollout status``."""
    lines = render_status(s.admin.get(f"/rollouts/{rollout_id}/status"))
    (line,) = [x for x in lines if x.strip().startswith(name + " ")]
    return line


def _gates(decision: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {g["kind"]: g for g in decision["details"]["gates"]}


def test_canaries_are_judged_by_labels_and_by_the_model_they_replace(setup: Setup) -> None:
    s = setup
    first = s.admin.post(
        "/rollouts",
        json={
            "name": "condition v1",
            "bundle_id": s.ids["v1"],
            "group": s.group,
            "strategy": "all_at_once",
            "stages": [{"percent": 100, "soak_seconds": 1}],
            "gates": [],
            "start": True,
        },
    )["id"]
    assert _run(s, first, "field")["status"] == "succeeded"
    _converge(s, 1)

    # a retrained model: as accurate, agrees with its predecessor; completes
    retrained = _rollout(s, "v2", s.ids["v1"], [INSTALLS, ACCURACY, AGREEMENT])
    final = _run(s, retrained, "field")
    assert final["status"] == "succeeded", final["state"]
    _converge(s, 2)
    advance = next(e for e in _decisions(s, retrained) if e["action"] == "rollout.advance")
    g = _gates(advance)
    assert g["accuracy"]["verdict"] == "pass" and g["accuracy"]["canary_samples"] >= 300
    assert g["shadow_agreement"]["verdict"] == "pass", g["shadow_agreement"]
    assert g["shadow_agreement"]["canary_value"] > 0.95

    # worse on labelled samples: the accuracy gate rolls it back
    worse = _rollout(s, "v3", s.ids["v2"], [INSTALLS, ACCURACY])
    final = _run(s, worse, "field")
    assert final["status"] == "rolled_back", final["state"]
    (rollback,) = [e for e in _decisions(s, worse) if e["action"] == "rollout.rollback"]
    g = _gates(rollback)
    assert {k for k, v in g.items() if v["verdict"] == "breach"} == {"accuracy"}
    acc = g["accuracy"]
    assert acc["canary_value"] < 0.9 < 0.97 < acc["control_value"], acc
    assert acc["canary_samples"] >= 300 and acc["control_samples"] >= 300
    line = _gate_line(s, worse, "accuracy")
    assert "BREACH" in line and "drop at most 0.02" in line and "labels, control " in line
    (labels,) = [
        x for x in render_status(s.admin.get(f"/rollouts/{worse}/status")) if "labels  " in x
    ]
    assert "canary" in labels and "control" in labels and "(by class " in labels, labels
    _converge(s, 4)  # v2 again, re-published above v3
    republished = final["state"]["rollback_bundle"]["bundle_id"]
    # the apps' inputs become balanced before the next rollout, so no window of the
    # field's (imbalanced) inputs lands in its first stage's control figures
    _run(s, None, "balanced", timeout=3)

    # classes cyclically shifted: distribution gates pass on balanced inputs, agreement
    # with the model it replaces (run beside it on each canary) rolls it back at stage 1
    permuted = _rollout(s, "v5", republished, [INSTALLS, *DISTRIBUTION, AGREEMENT])
    final = _run(s, permuted, "balanced")
    assert final["status"] == "rolled_back", final["state"]
    (rollback,) = [e for e in _decisions(s, permuted) if e["action"] == "rollout.rollback"]
    assert rollback["details"]["stage"] == 0  # the first stage
    g = _gates(rollback)
    assert {k for k, v in g.items() if v["verdict"] == "breach"} == {"shadow_agreement"}
    assert g["shadow_agreement"]["canary_value"] < 0.2, g["shadow_agreement"]
    for kind in ("prediction_shift", "drift_psi", "error_rate"):
        assert g[kind]["verdict"] == "pass", (kind, g[kind]["detail"])
    assert g["prediction_shift"]["canary_value"] < 0.1
    line = _gate_line(s, permuted, "shadow_agreement")
    assert "BREACH" in line and "at least 0.7" in line and "comparisons" in line
    _converge(s, 6)
