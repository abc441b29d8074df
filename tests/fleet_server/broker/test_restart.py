"""The broker beside the server across restarts, and a second server that must not touch it.

* Restarting the server brings its broker back on the same port: a device keeps its
  address, is connected again within one reconnect interval, and the records it sent
  while the server was down arrive.
* A second ``edgefleet server`` on a busy HTTP port refuses before it starts anything,
  and one pointed at a running server's broker_dir refuses too: the running server's
  broker files are left as they were.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from device_agent.protocol import telemetry_topic
from device_agent.transport import Backoff
from device_agent.transport.mqtt import MqttTransport
from fleet_server.client import AdminClient
from fleet_server.demo.services import ServerProcess
from tests.bundlesim import BundleSim
from tests.fleet_server.ingest.test_parse import summary_body

RECONNECT_MAX = 2.0


def settings(tmp_path: Path, kind: str, trust: Path, token: str) -> dict[str, str]:
    return {
        "environment": "development",
        "database_url": f"sqlite:///{tmp_path / 'db.sqlite'}",
        "bundle_dir": str(tmp_path / "bundles"),
        "trust_store": str(trust),
        "admin_bootstrap_token": token,
        "broker": kind,
        "broker_dir": str(tmp_path / "broker"),
    }


def wait_until(cond: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def payload(device_id: str, seq: int) -> bytes:
    record = {"seq": seq, "kind": "summary", "ts": time.time(), "body": summary_body()}
    return json.dumps({"device_id": device_id, "records": [record]}).encode()


def test_server_restart_keeps_the_broker_port_and_records_sent_meanwhile_arrive(
    tmp_path: Path, sim: BundleSim
) -> None:
    """Mosquitto only: the embedded broker keeps nothing across a restart (records a
    device sends before the new ingestion worker subscribes are dropped)."""
    kind = "mosquitto"
    trust = tmp_path / "trust.json"
    sim.trust("release").save(trust)
    token = "srv-admin-" + secrets.token_urlsafe(24)
    conf = settings(tmp_path, kind, trust, token)
    server = ServerProcess(tmp_path / "server", conf).start()
    device: MqttTransport | None = None
    try:
        admin = AdminClient(server.url, token)
        enroll_token = admin.post("/enrollment-tokens", json={"device_class": "gw"})["token"]
        enrolled = httpx.post(
            f"{server.url}/device/v1/enroll",
            json={"enrollment_token": enroll_token, "device_class": "gw", "device_id": "gw-1"},
            timeout=30,
        ).json()
        mqtt = enrolled["mqtt"]  # the device learns its broker at enrollment
        port = json.loads((tmp_path / "broker" / "broker.json").read_text())["port"]
        assert (mqtt["host"], mqtt["port"]) == ("127.0.0.1", port)
        device = MqttTransport(
            "gw-1",
            mqtt["host"],
            mqtt["port"],
            username="gw-1",
            password=enrolled["credential"],
            mqtt_version=mqtt["mqtt_version"],
            backoff=Backoff(initial=0.2, maximum=RECONNECT_MAX),
        ).start()
        assert device.wait_connected(10)

        def health() -> dict[str, object]:
            return dict(httpx.get(f"{server.url}/healthz", timeout=5).json())

        assert wait_until(lambda: health()["broker"]["connected_devices"] == 1, 10)  # type: ignore[index]
        topic = telemetry_topic("gw-1", "summary")
        for seq in range(1, 11):
            device.publish(topic, payload("gw-1", seq)).wait(10)
        assert wait_until(lambda: health()["ingest"]["stored"] == 10, 15)  # type: ignore[index]

        server.stop()
        assert wait_until(lambda: not device.connected, 10)
        handles = [device.publish(topic, payload("gw-1", seq)) for seq in range(11, 21)]

        server = ServerProcess(tmp_path / "server", conf, port=server.port).start()
        up = time.monotonic()
        assert json.loads((tmp_path / "broker" / "broker.json").read_text())["port"] == port
        assert device.wait_connected(RECONNECT_MAX + 3), "the device did not come back"
        reconnect = time.monotonic() - up
        assert all(h.wait(10) for h in handles)
        stored = lambda: health()["ingest"]["stored"]  # type: ignore[index]  # noqa: E731
        assert wait_until(lambda: stored() == 10, 15), json.dumps(health())
        assert wait_until(lambda: health()["broker"]["connected_devices"] == 1, 10)  # type: ignore[index]
        assert health()["broker"]["connected"] is True  # type: ignore[index]
        print(f"{kind}: device connected again {reconnect:.2f}s after the server answered")
    finally:
        if device is not None:
            device.stop()
        server.stop()


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.suffix not in (".log", ".db") and p.name != "mosquitto.db"
    }


def test_second_server_touches_no_file_of_the_running_servers_broker(
    tmp_path: Path, sim: BundleSim
) -> None:
    trust = tmp_path / "trust.json"
    sim.trust("release").save(trust)
    token = "srv-admin-" + secrets.token_urlsafe(24)
    conf = settings(tmp_path, "mosquitto", trust, token)
    server = ServerProcess(tmp_path / "server", conf).start()
    try:
        before = _digest(tmp_path / "broker")
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_SERVER_")}
        env.update({f"EDGEFLEET_SERVER_{k.upper()}": v for k, v in conf.items()})
        edgefleet = str(Path(sys.executable).parent / "edgefleet")
        busy = subprocess.run(
            [edgefleet, "server", "--port", str(server.port)],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert busy.returncode == 2 and f"cannot listen on 127.0.0.1:{server.port}" in busy.stderr
        other = ServerProcess(tmp_path / "server-2", conf)
        with pytest.raises(RuntimeError, match="in use by a running server"):
            other.start(timeout=180)
        assert _digest(tmp_path / "broker") == before
        assert httpx.get(f"{server.url}/healthz").json()["broker"]["connected"] is True
    finally:
        server.stop()
