"""End to end: real server process(es), a real Mosquitto with per-device ACLs, real agents.

On SQLite, on PostgreSQL, and with two server replicas sharing PostgreSQL:

* a healthy canary advances stage by stage to 100%;
* a canary model that raises errors in the field is rolled back automatically by the
  error-rate gate, and the devices return to the previous model;
* a rollout during which the inputs drift is rolled back by the drift gate;
* the audit log holds each automatic decision with the numbers behind it;
* with two replicas, only one evaluates rollouts and both ingest telemetry.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import paho.mqtt.client as mqtt
import pytest

from converters.keys import KeyStore
from device_agent.bundle import TrustStore
from device_agent.protocol import telemetry_topic
from fleet_server.broker.embedded import EmbeddedBroker
from fleet_server.broker.mosquitto import SERVER_USER, LocalMosquitto
from fleet_server.client import AdminClient
from fleet_server.demo.services import ServerProcess
from fleet_server.images.build import agent_config_text
from fleet_server.images.recipe import load_class
from fleet_server.simulator.fleet import ClassPlan, Fleet
from fleet_server.simulator.streams import N_FEATURES
from tests.pg import fresh_database

CLASS = "x86_64-gateway"
DEVICES = 12
STAGES = [
    {"percent": 50, "min_devices": 1, "soak_seconds": 3},
    {"percent": 100, "min_devices": 1, "soak_seconds": 0},
]
GATES = [
    {"kind": "install_failure_rate", "threshold": 0.2, "min_samples": 1},
    {"kind": "error_rate", "threshold": 0.05, "min_samples": 150},
    {"kind": "drift_psi", "threshold": 0.5, "min_samples": 150, "against": "reference"},
]


def _torch_mlp(seed: int, n_in: int = N_FEATURES) -> Any:
    import torch
    from torch import nn

    from fleet_server.demo.model import train

    if n_in == N_FEATURES:
        return train(seed, steps=150)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(n_in, 16), nn.ReLU(), nn.Linear(16, 3), nn.Softmax(dim=-1))
    model.eval()
    return model, np.random.default_rng(seed).normal(size=(256, n_in)).astype(np.float32)


def _bundle(workdir: Path, key: Any, version: int, seed: int, n_in: int = N_FEATURES) -> Path:
    from converters.pipeline import build_bundles
    from converters.source import from_torch
    from converters.targets import parse_target

    module, calib = _torch_mlp(seed, n_in)
    source = from_torch(
        module, calib[:8], input_names=["x"], output_names=["probs"], task="classification"
    )
    (result,) = build_bundles(
        source,
        [parse_target("onnx:float32", (CLASS,))],
        workdir / "bundles",
        name="condition",
        version=version,
        signing_key=key,
        samples=calib,
        reference_samples=calib,
    )
    assert result.bundle is not None, result.error
    return result.bundle


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Keys, trust store and the four bundles every backend uses."""
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
        "v1": _bundle(root, key, 1, 11),
        "v2": _bundle(root, key, 2, 22),
        # retrained on a feature set the application does not send yet: installs and
        # passes its own smoke test, then every prediction in the field fails
        "v3": _bundle(root, key, 3, 33, n_in=N_FEATURES + 1),
        "v5": _bundle(root, key, 5, 55),
    }


@dataclass
class Setup:
    broker: LocalMosquitto | EmbeddedBroker
    servers: list[ServerProcess]
    admin: AdminClient
    fleet: Fleet
    group: str
    ids: dict[str, str]


@pytest.fixture(params=["sqlite", "postgresql", "postgresql-2-replicas", "sqlite-embedded-broker"])
def setup(
    request: pytest.FixtureRequest, tmp_path: Path, release: dict[str, Any]
) -> Iterator[Setup]:
    pg = None if request.param.startswith("sqlite") else fresh_database("edgefleet_e2e")
    db = f"sqlite:///{tmp_path / 'server.db'}" if pg is None else pg.__enter__()
    replicas = 2 if request.param.endswith("replicas") else 1
    embedded = request.param.endswith("embedded-broker")
    broker: LocalMosquitto | EmbeddedBroker = (
        EmbeddedBroker(tmp_path / "broker") if embedded else LocalMosquitto(tmp_path / "broker")
    )
    broker.add_user(SERVER_USER, "server-secret")
    broker.start()
    admin_token = "e2e-admin-" + secrets.token_urlsafe(24)
    settings = {
        "environment": "development",
        "database_url": db,
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
        "mqtt_version": "4" if embedded else "5",
    }
    servers: list[ServerProcess] = []
    fleet: Fleet | None = None
    try:
        for i in range(replicas):
            servers.append(ServerProcess(tmp_path / f"server-{i}", settings).start())
        admin = AdminClient(servers[0].url, admin_token)
        ids = {v: admin.upload_bundle(release[v])["id"] for v in ("v1", "v2", "v3", "v5")}
        image = tmp_path / "image"
        image.mkdir()
        (image / "agent.toml").write_text(
            agent_config_text(load_class(CLASS), servers[0].url, "127.0.0.1", broker.port)
        )
        (image / "trust.json").write_bytes(release["trust"].read_bytes())
        fleet = Fleet(
            tmp_path / "fleet",
            server_url=servers[0].url,
            mqtt_host="127.0.0.1",
            mqtt_port=broker.port,
            window_seconds=1.0,
            poll_seconds=1.0,
        )
        # devices' own probation would catch an erroring model within seconds; let it
        # tolerate errors here so what is under test is the server's gate
        fleet.overrides["update"] = {"probation_seconds": 2.0, "probation_max_error_rate": 1.0}
        fleet.provision([ClassPlan(CLASS, DEVICES, image)])
        for i, d in enumerate(fleet.devices):  # spread devices over the replicas
            if replicas > 1 and i % 2:
                text = d.config_path.read_text().replace(servers[0].url, servers[1].url)
                d.config_path.write_text(text)
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
        yield Setup(broker, servers, admin, fleet, group, ids)
    finally:
        if fleet is not None:
            fleet.stop()
        for s in servers:
            s.stop()
        broker.stop()
        if pg is not None:
            pg.__exit__(None, None, None)


def _rollout(
    s: Setup,
    version: str,
    previous: str | None,
    strategy: str = "staged_canary",
    stages: list[dict[str, Any]] = STAGES,
    gates: list[dict[str, Any]] = GATES,
) -> str:
    body: dict[str, Any] = {
        "name": f"condition {version}",
        "bundle_id": s.ids[version],
        "group": s.group,
        "strategy": strategy,
        "stages": stages,
        "gates": gates,
        "failure_policy": "rollback",
        "start": True,
    }
    if previous:
        body["previous_bundle_id"] = s.ids[previous]
    return str(s.admin.post("/rollouts", json=body)["id"])


def _run_until_final(s: Setup, rollout_id: str, timeout: float = 120) -> dict[str, Any]:
    final: dict[str, Any] = {}

    def done(_: float) -> bool:
        r = s.admin.get(f"/rollouts/{rollout_id}")
        if r["status"] in ("succeeded", "rolled_back", "aborted", "paused"):
            final.update(r)
            return True
        return False

    s.fleet.drive(timeout, calls_per_second=40.0, on_tick=done)
    assert final, f"rollout {rollout_id} did not finish in {timeout}s"
    return final


def _converge(s: Setup, version: int, timeout: float = 60) -> None:
    s.fleet.drive(
        timeout, calls_per_second=20.0, on_tick=lambda _: set(s.fleet.versions()) == {version}
    )
    assert set(s.fleet.versions()) == {version}, s.fleet.versions()


def _decisions(s: Setup, rollout_id: str) -> list[dict[str, Any]]:
    page = s.admin.get("/audit", params={"target_id": rollout_id, "limit": 200})
    return [
        e
        for e in page["items"]
        if e["action"].startswith("rollout.") and e.get("actor", "").startswith("engine")
    ] or [
        e
        for e in page["items"]
        if e["action"] in ("rollout.advance", "rollout.rollback", "rollout.complete")
    ]


def test_rollouts_end_to_end(setup: Setup) -> None:
    s = setup
    final = _run_until_final(
        s, _rollout(s, "v1", None, "all_at_once", [{"percent": 100, "soak_seconds": 1}], [])
    )
    assert final["status"] == "succeeded"
    _converge(s, 1)

    # a healthy canary advances stage by stage to 100%
    healthy = _rollout(s, "v2", "v1")
    final = _run_until_final(s, healthy)
    assert final["status"] == "succeeded", final["state"]
    _converge(s, 2)
    advances = [e for e in _decisions(s, healthy) if e["action"] == "rollout.advance"]
    assert advances and all(
        g["verdict"] == "pass" and g["canary_samples"] >= 1
        for e in advances
        for g in e["details"]["gates"]
        if g["kind"] != "install_failure_rate" or g["verdict"] != "wait"
    )

    # a canary model that raises errors is rolled back by the error-rate gate
    erroring = _rollout(s, "v3", "v2")
    final = _run_until_final(s, erroring)
    assert final["status"] == "rolled_back", final["state"]
    (rollback,) = [e for e in _decisions(s, erroring) if e["action"] == "rollout.rollback"]
    breached = {g["kind"]: g for g in rollback["details"]["gates"] if g["verdict"] == "breach"}
    assert set(breached) == {"error_rate"}, rollback["details"]
    gate = breached["error_rate"]
    assert gate["canary_value"] > 0.5 and gate["control_value"] == 0.0, gate
    assert gate["canary_samples"] >= 150 and gate["threshold"] == 0.05, gate
    _converge(s, 4)  # v2's model again, republished as v4 so anti-rollback accepts it
    errors_before = sum(d.errors for d in s.fleet.devices)
    s.fleet.drive(2, calls_per_second=20.0)
    assert sum(d.errors for d in s.fleet.devices) == errors_before

    # a rollout during which the inputs drift is rolled back by the drift gate
    step = np.zeros(N_FEATURES, dtype=np.float32)
    step[:3] = 0.5
    drifting = _rollout(s, "v5", None)
    for d in s.fleet.devices:
        d.stream.drift_per_step = step
    final = _run_until_final(s, drifting)
    assert final["status"] == "rolled_back", final["state"]
    (rollback,) = [e for e in _decisions(s, drifting) if e["action"] == "rollout.rollback"]
    assert "drift_psi" in [
        g["kind"] for g in rollback["details"]["gates"] if g["verdict"] == "breach"
    ], rollback["details"]
    _converge(s, 6)

    if len(s.servers) == 2:
        health = [httpx.get(f"{srv.url}/healthz").json() for srv in s.servers]
        leaders = [h for h in health if h["rollout_rounds"] > 0]
        assert len(leaders) == 1, health
        assert all(h["ingest"]["stored"] > 0 for h in health), health
        metrics = [httpx.get(f"{srv.url}/metrics").text for srv in s.servers]
        assert all('edgefleet_ingest{counter="stored"}' in m for m in metrics)
        assert sum("edgefleet_rollout_rounds 0.0" not in m for m in metrics) == 1


@pytest.mark.parametrize("kind", [LocalMosquitto, EmbeddedBroker])
def test_broker_refuses_a_device_publishing_under_another_id(tmp_path: Path, kind: type) -> None:
    """The ACL the one-machine brokers run with: own topics only, checked against the broker."""
    broker = kind(tmp_path / "broker")
    broker.add_user(SERVER_USER, "server-pw")
    broker.add_user("dev-a", "pw-a")
    broker.add_user("dev-b", "pw-b")
    broker.start()
    received: list[str] = []
    clients = []
    try:

        def client(user: str, pw: str) -> mqtt.Client:
            c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{user}-{time.time()}")
            c.username_pw_set(user, pw)
            c.on_message = lambda _c, _u, m: received.append(m.topic)
            c.connect("127.0.0.1", broker.port)
            c.loop_start()
            clients.append(c)
            return c

        watcher = client(SERVER_USER, "server-pw")
        watcher.subscribe("edgefleet/v1/devices/#", qos=1)
        time.sleep(0.3)
        a = client("dev-a", "pw-a")
        a.publish(telemetry_topic("dev-b", "summary"), b"{}", qos=1).wait_for_publish(5)
        a.publish(telemetry_topic("dev-a", "summary"), b"{}", qos=1).wait_for_publish(5)
        deadline = time.monotonic() + 5
        while telemetry_topic("dev-a", "summary") not in received and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        assert telemetry_topic("dev-a", "summary") in received
        assert telemetry_topic("dev-b", "summary") not in received
        refused: list[object] = []
        intruder = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="intruder")
        intruder.username_pw_set("dev-a", "not-the-password")
        intruder.on_connect = lambda _c, _u, _f, rc, _p: refused.append(rc)
        intruder.connect("127.0.0.1", broker.port)
        intruder.loop_start()
        clients.append(intruder)
        deadline = time.monotonic() + 5
        while not refused and time.monotonic() < deadline:
            time.sleep(0.05)
        assert refused and refused[0].is_failure, refused  # type: ignore[attr-defined]
    finally:
        for c in clients:
            c.loop_stop()
            c.disconnect()
        broker.stop()
