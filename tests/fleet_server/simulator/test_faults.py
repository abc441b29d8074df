"""Simulated fleet faults against the real server: a device offline during a rollout gets
its assignment when it returns; a device whose agent dies mid-install (SIGKILL) boots into
a verified model and finishes the update; a device whose clock runs far ahead refuses a
bundle that is expired by its clock and keeps serving."""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from device_agent.bundle import TrustStore
from device_agent.update.slots import Slots
from fleet_server.broker.mosquitto import SERVER_USER, LocalMosquitto
from fleet_server.client import AdminClient
from fleet_server.demo.services import ServerProcess
from fleet_server.images.build import agent_config_text
from fleet_server.images.recipe import load_class
from fleet_server.simulator.clock import SimClock
from fleet_server.simulator.fleet import ClassPlan, Fleet
from fleet_server.simulator.streams import N_FEATURES
from tests.bundlesim import BundleSim, tiny_onnx_model

CLASS = "x86_64-gateway"


@dataclass
class SmallFleet:
    admin: AdminClient
    fleet: Fleet
    trust_path: Path
    roll: Callable[[int], None]
    database: Path


@pytest.fixture
def small_fleet(tmp_path: Path, sim: BundleSim) -> Iterator[SmallFleet]:
    """Server, broker and three enrolled (not yet started) devices with a shared SimClock."""
    trust_path = tmp_path / "trust.json"
    sim.trust("release").save(trust_path)
    broker = LocalMosquitto(tmp_path / "broker")
    broker.add_user(SERVER_USER, "pw")
    broker.start()
    token = "sim-admin-" + secrets.token_urlsafe(24)
    server = ServerProcess(
        tmp_path / "server",
        {
            "environment": "development",
            "database_url": f"sqlite:///{tmp_path / 'db.sqlite'}",
            "bundle_dir": str(tmp_path / "bundles"),
            "trust_store": str(trust_path),
            "admin_bootstrap_token": token,
            "mqtt_host": "127.0.0.1",
            "mqtt_port": str(broker.port),
            "mqtt_username": SERVER_USER,
            "mqtt_password": "pw",
            "assignment_cache_seconds": "0.5",
            "telemetry_window_seconds": "1",
        },
    )
    fleet: Fleet | None = None
    try:
        server.start()
        admin = AdminClient(server.url, token)
        image = tmp_path / "image"
        image.mkdir()
        (image / "agent.toml").write_text(
            agent_config_text(load_class(CLASS), server.url, "127.0.0.1", broker.port)
        )
        (image / "trust.json").write_bytes(trust_path.read_bytes())
        fleet = Fleet(
            tmp_path / "fleet",
            server_url=server.url,
            mqtt_host="127.0.0.1",
            mqtt_port=broker.port,
            window_seconds=1.0,
            poll_seconds=0.5,
            clock=SimClock(),
        )
        fleet.provision([ClassPlan(CLASS, 3, image)])
        tokens = {
            d.device_id: admin.post("/enrollment-tokens", json={"device_class": CLASS})["token"]
            for d in fleet.devices
        }
        fleet.enroll(lambda d: tokens[d.device_id])
        for d in fleet.devices:
            broker.add_user(d.device_id, d.credential())
        broker.reload()
        group = admin.post("/groups", json={"name": "gw", "device_class": CLASS})["id"]

        def roll(version: int) -> None:
            model = tiny_onnx_model(version, n_in=N_FEATURES)  # the simulator's 8 features
            bundle = admin.upload_bundle(sim.publish(version=version, model_bytes=model))
            admin.post(
                "/rollouts",
                json={
                    "name": f"v{version}",
                    "bundle_id": bundle["id"],
                    "group": group,
                    "strategy": "all_at_once",
                    "gates": [],
                    "start": True,
                    "stages": [{"percent": 100, "soak_seconds": 0}],
                },
            )

        yield SmallFleet(admin, fleet, trust_path, roll, tmp_path / "db.sqlite")
    finally:
        if fleet is not None:
            fleet.stop()
        server.stop()
        broker.stop()


def test_offline_device_catches_up_and_crashed_install_resumes(small_fleet: SmallFleet) -> None:
    fleet, roll = small_fleet.fleet, small_fleet.roll
    online, offline, crashing = fleet.devices
    fleet.start([online, crashing])
    roll(2)
    fleet.drive(30, on_tick=lambda _: (online.version(), crashing.version()) == (2, 2))
    assert (online.version(), crashing.version(), offline.version()) == (2, 2, None)

    # the crash: v3 is assigned while the device is off; its agent dies mid-install
    crashing.stop()
    roll(3)
    status = crashing.crash_during_install("staging")
    assert status == -9, "the agent was to be killed when it reached 'staging'"
    record = json.loads((crashing.root / "state" / "update.json").read_text())
    assert record["state"] == "staging"
    slots = Slots(crashing.root / "state")
    active = slots.active()
    assert active is not None and active.version == 2  # still the verified v2
    slots.verify(active.slot, TrustStore.load(small_fleet.trust_path))

    # the offline device comes back; the crashed one boots and finishes its update
    fleet.start([offline, crashing])
    fleet.drive(45, on_tick=lambda _: set(fleet.versions()) == {3})
    assert fleet.versions() == {3: 3}


def test_device_clock_far_ahead_refuses_a_bundle_expired_by_its_clock(
    small_fleet: SmallFleet,
) -> None:
    fleet, roll = small_fleet.fleet, small_fleet.roll
    fleet.start()
    roll(2)
    fleet.drive(30, on_tick=lambda _: set(fleet.versions()) == {2})
    assert fleet.versions() == {2: 3}

    skewed = fleet.devices[0]
    skewed.stop()
    clock = SimClock()
    clock.advance(60 * 86400)  # its clock runs two months ahead: v3 (valid 30 days) expired
    skewed.clock = clock
    skewed.start()
    roll(3)
    fleet.drive(
        30,
        on_tick=lambda _: (
            [d.version() for d in fleet.devices[1:]] == [3, 3]
            and (skewed.root / "state" / "update.json").read_text().count("expired") > 0
        ),
    )
    assert [d.version() for d in fleet.devices] == [2, 3, 3]
    record = json.loads((skewed.root / "state" / "update.json").read_text())
    assert record["error"]["code"] == "expired", record["error"]
    import sqlite3

    with sqlite3.connect(small_fleet.database) as db:  # the refusal reached the server
        rows = db.execute(
            "SELECT outcome, version, error_code FROM device_reports "
            "WHERE device_id = ? AND error_code = 'expired'",
            (skewed.device_id,),
        ).fetchall()
    assert rows and all(v == 3 for _o, v, _c in rows), rows


def test_shadow_candidate_that_disagrees_is_stopped_by_the_agreement_gate(
    small_fleet: SmallFleet, sim: BundleSim
) -> None:
    """Devices run the candidate silently beside the active model; the server reads their
    agreement and rolls the shadow rollout back; the active model served throughout."""
    fleet, admin = small_fleet.fleet, small_fleet.admin
    fleet.start()
    small_fleet.roll(2)
    fleet.drive(30, on_tick=lambda _: set(fleet.versions()) == {2})
    assert fleet.versions() == {2: 3}
    group = admin.get("/groups")["items"][0]["id"]
    # another model of the same shape: it disagrees with v2 on many inputs
    other = admin.upload_bundle(
        sim.publish(version=3, model_bytes=tiny_onnx_model(99, n_in=N_FEATURES))
    )
    rollout = admin.post(
        "/rollouts",
        json={
            "name": "shadow v3",
            "bundle_id": other["id"],
            "group": group,
            "strategy": "shadow",
            "stages": [{"percent": 100, "soak_seconds": 2}],
            "failure_policy": "rollback",
            "gates": [{"kind": "shadow_agreement", "threshold": 0.9, "min_samples": 100}],
            "start": True,
        },
    )
    final: dict[str, object] = {}

    def done(_: float) -> bool:
        final.update(admin.get(f"/rollouts/{rollout['id']}"))
        return final["status"] in ("rolled_back", "succeeded", "paused")

    fleet.drive(60, calls_per_second=40.0, on_tick=done)
    assert final["status"] == "rolled_back", final
    audit = admin.get("/audit", params={"target_id": rollout["id"], "limit": 100})["items"]
    (decision,) = [e for e in audit if e["action"] == "rollout.rollback"]
    (gate,) = decision["details"]["gates"]
    assert gate["kind"] == "shadow_agreement" and gate["verdict"] == "breach", gate
    assert gate["canary_value"] < 0.9 and gate["canary_samples"] >= 100, gate
    # v3 never served; withdrawing a shadow needs no re-published bundle: v2 keeps serving
    fleet.drive(3)
    assert fleet.versions() == {2: 3}
    assert all(
        json.loads((d.root / "state" / "active.json").read_text())["version"] == 2
        for d in fleet.devices
    )
