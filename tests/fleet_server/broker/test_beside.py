"""`broker = mosquitto | embedded`: the server starts a broker beside itself and admits
devices to it as they enroll (and no longer once revoked)."""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path

import httpx
import paho.mqtt.client as mqtt
import pytest

from device_agent.protocol import telemetry_topic
from fleet_server.client import AdminClient
from fleet_server.demo.services import ServerProcess
from tests.bundlesim import BundleSim


def _connect(port: int, user: str, password: str, version: int) -> tuple[mqtt.Client, object]:
    result: list[object] = []
    c = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=f"{user}-{time.time()}",
        protocol=mqtt.MQTTv311 if version == 4 else mqtt.MQTTv5,
    )
    c.username_pw_set(user, password)
    c.on_connect = lambda _c, _u, _f, rc, _p: result.append(rc)
    c.connect("127.0.0.1", port)
    c.loop_start()
    deadline = time.monotonic() + 5
    while not result and time.monotonic() < deadline:
        time.sleep(0.05)
    return c, (result[0] if result else None)


@pytest.mark.parametrize("kind", ["mosquitto", "embedded"])
def test_enrolled_device_reaches_the_broker_and_a_revoked_one_does_not(
    kind: str, tmp_path: Path, sim: BundleSim
) -> None:
    trust = tmp_path / "trust.json"
    sim.trust("release").save(trust)
    token = "srv-admin-" + secrets.token_urlsafe(24)
    server = ServerProcess(
        tmp_path / "server",
        {
            "environment": "development",
            "database_url": f"sqlite:///{tmp_path / 'db.sqlite'}",
            "bundle_dir": str(tmp_path / "bundles"),
            "trust_store": str(trust),
            "admin_bootstrap_token": token,
            "broker": kind,
            "broker_dir": str(tmp_path / "broker"),
        },
    )
    clients: list[mqtt.Client] = []
    try:
        server.start()
        admin = AdminClient(server.url, token)
        enroll_token = admin.post("/enrollment-tokens", json={"device_class": "gw"})["token"]
        enrolled = httpx.post(
            f"{server.url}/device/v1/enroll",
            json={"enrollment_token": enroll_token, "device_class": "gw", "device_id": "gw-1"},
            timeout=30,
        ).json()
        users = json.loads((tmp_path / "broker" / "users.json").read_text())
        assert "gw-1" in users and enrolled["credential"] not in json.dumps(users)
        where = json.loads((tmp_path / "broker" / "broker.json").read_text())
        assert where["kind"] == kind and httpx.get(f"{server.url}/healthz").json()["ingesting"]
        port, version = where["port"], where["mqtt_version"]
        device, rc = _connect(port, "gw-1", enrolled["credential"], version)
        clients.append(device)
        assert rc is not None and not rc.is_failure, rc  # type: ignore[attr-defined]
        record = {
            "seq": 1,
            "kind": "summary",
            "ts": time.time(),
            "body": {"name": "m", "version": 1, "count": 10, "errors": 0},
        }
        device.publish(
            telemetry_topic("gw-1", "summary"),
            json.dumps({"device_id": "gw-1", "records": [record]}),
            qos=1,
        ).wait_for_publish(5)
        deadline = time.monotonic() + 10
        stored = 0
        while time.monotonic() < deadline and not stored:
            stored = httpx.get(f"{server.url}/healthz").json()["ingest"]["stored"]
            time.sleep(0.2)
        assert stored == 1

        admin.post("/devices/gw-1/revoke")
        again, rc = _connect(port, "gw-1", enrolled["credential"], version)
        clients.append(again)
        assert rc is not None and rc.is_failure, rc  # type: ignore[attr-defined]
    finally:
        for c in clients:
            c.loop_stop()
            c.disconnect()
        server.stop()
