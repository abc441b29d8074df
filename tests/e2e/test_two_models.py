"""End to end: a device running two models, each rolled out and rolled back on its own.

A real server process, a real Mosquitto with per-device ACLs, and real agents (one
``AgentDaemon`` per simulated device) whose device class declares two models,
``condition`` and ``quality``: each has its own A/B slots, update state machine,
assignment (``GET /device/v1/assignment?model=``), telemetry and rollouts.

* both models' first releases roll out at the same time, each to every device;
* ``quality`` v2 goes through a staged canary and completes, while nothing of
  ``condition`` moves (no install of it is reported);
* ``condition`` v2 (its classes cyclically shifted) is rolled back by the prediction-shift
  gate at its first stage: every device runs v1's model again (re-published above v2),
  while ``quality`` stays on v2 on every device;
* the admin API shows each model per device; the local endpoint serves both by name.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from converters.keys import KeyStore
from device_agent.bundle import TrustStore
from device_agent.serving.client import ServingClient
from fleet_server.broker.mosquitto import SERVER_USER, LocalMosquitto
from fleet_server.client import AdminClient
from fleet_server.demo.services import ServerProcess
from fleet_server.images.build import agent_config_text
from fleet_server.images.recipe import load_class
from fleet_server.simulator.fleet import ClassPlan, Fleet
from tests.e2e.test_canary_judgement import _bundle as condition_bundle
from tests.e2e.test_rollouts import CLASS

DEVICES = 4
MODELS = ("condition", "quality")
STAGES = [
    {"percent": 50, "min_devices": 1, "soak_seconds": 3},
    {"percent": 100, "min_devices": 1, "soak_seconds": 0},
]
GATES = [
    {"kind": "install_failure_rate", "threshold": 0.2, "min_samples": 1},
    {"kind": "error_rate", "threshold": 0.05, "min_samples": 100},
    {
        "kind": "prediction_shift",
        "threshold": 0.25,
        "min_samples": 150,
        "against": "control",
        "metric": "psi",
    },
]


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
        "condition-v1": condition_bundle(root, key, 1, "healthy", 11),
        "condition-v2": condition_bundle(root, key, 2, "permuted", 11),
        "quality-v1": condition_bundle(root, key, 1, "healthy", 5, name="quality"),
        "quality-v2": condition_bundle(root, key, 2, "healthy", 6, name="quality"),
    }


@dataclass
class Setup:
    admin: AdminClient
    fleet: Fleet
    group: str
    ids: dict[str, str]


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
        # a rollback re-publishes the previous model above the candidate's version
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
        ids = {
            k: admin.upload_bundle(release[k])["id"]
            for k in ("condition-v1", "condition-v2", "quality-v1", "quality-v2")
        }
        image = tmp_path / "image"
        image.mkdir()
        dc = replace(load_class(CLASS), models=MODELS)  # the class declares both models
        (image / "agent.toml").write_text(
            agent_config_text(dc, server.url, "127.0.0.1", broker.port)
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
        yield Setup(admin, fleet, group, ids)
    finally:
        if fleet is not None:
            fleet.stop()
        if server is not None:
            server.stop()
        broker.stop()


def _versions(s: Setup) -> dict[str, list[int | None]]:
    """Per model, the version each device's agent serves."""
    out: dict[str, list[int | None]] = {m: [] for m in MODELS}
    for d in s.fleet.devices:
        agents = d.daemon.agents if d.daemon is not None else {}
        for m in MODELS:
            model = agents[m].model if m in agents else None
            out[m].append(model.version if model is not None else None)
    return out


def _predict(s: Setup, n: int = 10) -> None:
    """What apps on the devices do: call each model on the device's input stream."""
    for d in s.fleet.devices:
        if d.daemon is None:
            continue
        x = d.stream.next_batch(n)
        for agent in d.daemon.agents.values():
            if agent.model is None:
                continue
            for i in range(n):
                # a swap may race a call; the app carries on
                with contextlib.suppress(Exception):
                    agent.predict(x[i : i + 1])


def _drive(s: Setup, until: Any, timeout: float, what: str) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        _predict(s)
        got = until()
        if got:
            return got
        time.sleep(0.25)
    raise AssertionError(f"{what} did not happen in {timeout} s: {_versions(s)}")


def _rollout(s: Setup, key: str, stages: list[dict[str, Any]], gates: list[Any], **kw: Any) -> str:
    body = {
        "name": key,
        "bundle_id": s.ids[key],
        "group": s.group,
        "strategy": "staged_canary" if len(stages) > 1 else "all_at_once",
        "stages": stages,
        "gates": gates,
        "failure_policy": "rollback",
        "start": True,
        **kw,
    }
    return str(s.admin.post("/rollouts", json=body)["id"])


def _final(s: Setup, rollout_id: str) -> Any:
    r = s.admin.get(f"/rollouts/{rollout_id}")
    return r if r["status"] in ("succeeded", "rolled_back", "aborted", "paused") else None


def test_two_models_roll_out_and_back_independently(setup: Setup) -> None:
    s = setup
    once = [{"percent": 100, "soak_seconds": 1}]
    first = [_rollout(s, "condition-v1", once, []), _rollout(s, "quality-v1", once, [])]
    for rid in first:
        final = _drive(s, lambda rid=rid: _final(s, rid), 120, f"rollout {rid}")
        assert final["status"] == "succeeded", final["state"]
    _drive(
        s,
        lambda: _versions(s) == {"condition": [1] * DEVICES, "quality": [1] * DEVICES},
        60,
        "both models v1 on every device",
    )

    # each device has one assignment entry per model, with its own ETag
    d0 = s.fleet.devices[0].device_id
    info = s.admin.get(f"/devices/{d0}")
    assert set(info["models"]) == set(MODELS)
    entries = {m: info["models"][m]["assignment"] for m in MODELS}
    assert {m: e["model"] for m, e in entries.items()} == {m: m for m in MODELS}
    assert entries["condition"]["assignment_id"] != entries["quality"]["assignment_id"]

    # quality v2 through a staged canary; condition does not move
    condition_before = {
        d.device_id: d.daemon.updaters["condition"].reports[:] for d in s.fleet.devices
    }
    quality = _rollout(s, "quality-v2", STAGES, GATES, previous_bundle_id=s.ids["quality-v1"])
    final = _drive(s, lambda: _final(s, quality), 150, "the quality v2 rollout")
    assert final["status"] == "succeeded", final["state"]
    _drive(
        s,
        lambda: _versions(s) == {"condition": [1] * DEVICES, "quality": [2] * DEVICES},
        60,
        "quality v2 everywhere, condition still v1",
    )
    for d in s.fleet.devices:
        # at most the commit of v1 after its probation: nothing else of condition happened
        after = d.daemon.updaters["condition"].reports[len(condition_before[d.device_id]) :]
        assert all((r["name"], r["version"]) == ("condition", 1) for r in after), after

    # condition v2 shifts its classes: rolled back at stage 1; quality stays on v2
    bad = _rollout(s, "condition-v2", STAGES, GATES, previous_bundle_id=s.ids["condition-v1"])
    final = _drive(s, lambda: _final(s, bad), 150, "the condition v2 rollout")
    assert final["status"] == "rolled_back", final["state"]
    page = s.admin.get("/audit", params={"target_id": bad, "limit": 200})
    (rollback,) = [e for e in page["items"] if e["action"] == "rollout.rollback"]
    assert rollback["details"]["stage"] == 0
    breached = {g["kind"] for g in rollback["details"]["gates"] if g["verdict"] == "breach"}
    assert breached == {"prediction_shift"}, rollback["details"]["gates"]
    # v1 again, re-published above v2 (the devices' version floor only goes up)
    back = final["state"]["rollback_bundle"]
    assert back["name"] == "condition" and back["version"] > 2
    _drive(
        s,
        lambda: (
            _versions(s) == {"condition": [back["version"]] * DEVICES, "quality": [2] * DEVICES}
        ),
        90,
        "condition back on v1's model, quality still v2",
    )
    # some canary ran condition v2 before the rollback: it was on a device, not only assigned
    assert any(
        r.get("name") == "condition" and r.get("version") == 2 and r.get("outcome") == "installed"
        for d in s.fleet.devices
        for r in d.daemon.updaters["condition"].reports
    )
    # quality never moved during condition's rollout and rollback
    for d in s.fleet.devices:
        assert all(r.get("name") == "quality" for r in d.daemon.updaters["quality"].reports)
    # the server's view, from each model's install reports (sent after probation)
    want = {"condition": back["version"], "quality": 2}
    _drive(
        s,
        lambda: all(
            {m: v["version"] for m, v in s.admin.get(f"/devices/{d.device_id}")["models"].items()}
            == want
            for d in s.fleet.devices
        ),
        60,
        "the server showing condition and quality per device",
    )

    # the device's local endpoint serves both models by name
    device = s.fleet.devices[0]
    assert device.daemon is not None and device.daemon.serving is not None
    x = device.stream.next_batch(1)
    for name, version in (("condition", back["version"]), ("quality", 2)):
        with ServingClient(device.daemon.serving.socket_path, model=name) as client:
            meta = client.metadata()
            assert (meta["name"], meta["versions"]) == (name, [str(version)])
            (probs,) = client.predict(x)
            expected = device.daemon.agents[name].predict(x)[0]
            np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-6)
