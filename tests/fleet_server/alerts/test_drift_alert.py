"""The issue's "must show": a drifting group crosses its threshold and the server POSTs
the alert to a webhook. Devices publish window summaries over a real Mosquitto, the
server's ingestion worker stores them, the server's own alert loop evaluates the rule
and its delivery thread POSTs to a real HTTP server; the alert names the group, model,
window, figures and where the window's sampled inputs are, and that export answers."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from device_agent.payloads import encode_array
from device_agent.protocol import LATENCY_BUCKETS_MS, telemetry_topic
from fleet_server.app import create_app
from tests.brokers import DEVICE_ACL, SERVER_USER, MosquittoBroker, publish_once
from tests.fleet_server.alerts.receiver import WebhookReceiver
from tests.server_fixtures import Fleet, make_settings, server_keys

if TYPE_CHECKING:
    from tests.bundlesim import BundleSim

USERS = {"cam-1": "pw-1", "cam-2": "pw-2", "cam-9": "pw-9", SERVER_USER: "pw-server"}


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    b = MosquittoBroker(tmp_path / "broker", users=USERS, acl=DEVICE_ACL)
    b.start()
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture
def fleet(
    tmp_path: Path, db_url: str, bundle_sim: BundleSim, broker: MosquittoBroker
) -> Iterator[Fleet]:
    keys_dir, kid, trust_path = server_keys(tmp_path, bundle_sim)
    settings = make_settings(
        tmp_path,
        db_url,
        trust_store=trust_path,
        signing_key_dir=keys_dir,
        signing_key=kid,
        run_scheduler=False,
        mqtt_host=broker.host,
        mqtt_port=broker.port,
        mqtt_username=SERVER_USER,
        mqtt_password=USERS[SERVER_USER],
        alert_interval_seconds=0.5,
        public_url="http://fleet.example:8000",
    )
    with TestClient(create_app(settings)) as client:
        yield Fleet(client=client, sim=bundle_sim, tmp=tmp_path)


class Devices:
    """Devices publishing numbered records under their own ids (broker ACL enforced)."""

    def __init__(self, broker: MosquittoBroker) -> None:
        self.broker = broker
        self.seq: dict[str, int] = {}

    def publish(self, device: str, kind: str, bodies: list[dict[str, Any]]) -> None:
        records = []
        for body in bodies:
            self.seq[device] = self.seq.get(device, 0) + 1
            records.append({"seq": self.seq[device], "kind": kind, "ts": time.time(), "body": body})
        payload = json.dumps({"device_id": device, "records": records}).encode()
        publish_once(self.broker, device, USERS[device], telemetry_topic(device, kind), payload)

    def window(self, device: str, psi: float, count: int) -> None:
        hist = [0] * (len(LATENCY_BUCKETS_MS) + 1)
        hist[8] = count
        body = {
            "window_start": time.time() - 60,
            "window_end": time.time(),
            "name": "tiny",
            "version": 3,
            "slot": "a",
            "rollout_id": None,
            "count": count,
            "errors": 0,
            "latency_ms": {"p50": 4, "p95": 4, "p99": 4, "mean": 4},
            "latency_hist": hist,
            "drift": {
                "features": [
                    {"name": "f0", "psi": psi, "counts": [count // 2, count - count // 2]}
                ],
                "psi_max": psi,
            },
            "shadow": None,
            "dropped": {"samples": 0, "summaries": 0},
        }
        self.publish(device, "summary", [body])

    def samples(self, device: str, n: int) -> None:
        bodies = [
            {
                "name": "tiny",
                "version": 3,
                "predicted": i % 3,
                "inputs": {"x": encode_array(np.full((1, 4), float(i), dtype=np.float32))},
                "outputs": {"probs": encode_array(np.array([[0.1, 0.2, 0.7]], dtype=np.float32))},
            }
            for i in range(n)
        ]
        self.publish(device, "samples", bodies)


def _rule(fleet: Fleet, name: str) -> dict[str, Any]:
    r = fleet.client.get(f"/api/v1/alerts/rules/{name}", headers=fleet.admin)
    assert r.status_code == 200, r.text
    return dict(r.json())


def _wait_value(fleet: Fleet, name: str, ok: Any, timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    rule = _rule(fleet, name)
    while time.monotonic() < deadline:
        rule = _rule(fleet, name)
        if rule["value"] is not None and ok(rule["value"]):
            return rule
        time.sleep(0.2)
    raise AssertionError(f"rule {name} never reached the expected value: {rule}")


def test_a_drifting_group_crossing_its_threshold_is_posted_to_the_webhook(
    fleet: Fleet, broker: MosquittoBroker
) -> None:
    r = fleet.client.post(
        "/api/v1/groups",
        headers=fleet.admin,
        json={"name": "gateways", "selector": {"site": "north"}},
    )
    assert r.status_code == 201, r.text
    fleet.enroll("cam-1", labels={"site": "north"})
    fleet.enroll("cam-2", labels={"site": "north"})
    fleet.enroll("cam-9", labels={"site": "south"})  # another group: its drift must not count
    devices = Devices(broker)
    with WebhookReceiver() as hook:
        r = fleet.client.post(
            "/api/v1/alerts/rules",
            headers=fleet.admin,
            json={
                "name": "gateways-drift",
                "kind": "drift",
                "group": "gateways",
                "model": "tiny",
                "threshold": 0.2,
                "window_seconds": 600,
                "min_samples": 100,
                "webhooks": [hook.url],
            },
        )
        assert r.status_code == 201, r.text
        assert r.json()["clear_threshold"] == pytest.approx(0.16)

        # calm: the group's windows are near the reference; the other group drifts
        devices.window("cam-1", psi=0.05, count=300)
        devices.window("cam-2", psi=0.05, count=300)
        devices.window("cam-9", psi=0.9, count=5000)
        calm = _wait_value(fleet, "gateways-drift", lambda v: v == pytest.approx(0.05))
        assert calm["status"] == "ok"
        time.sleep(1.5)  # a few more rounds
        assert hook.requests == 0

        # the group drifts: the inference-weighted PSI crosses 0.2
        devices.samples("cam-1", 5)
        devices.samples("cam-9", 4)  # not in the group: not part of its samples
        devices.window("cam-1", psi=0.6, count=900)  # one message: one round sees all of it
        [alert] = hook.wait_for(1)
        expected_psi = (0.05 * 600 + 0.6 * 900) / 1500
        assert alert["status"] == "firing"
        assert alert["alert"] == "gateways-drift" and alert["kind"] == "drift"
        assert alert["group"] == "gateways" and alert["model"] == "tiny"
        assert alert["value"] == pytest.approx(expected_psi)
        assert alert["threshold"] == 0.2 and alert["comparison"] == "above"
        assert alert["window"]["seconds"] == 600
        assert alert["figures"]["inferences"] == 1500
        assert alert["figures"]["devices_reporting"] == 2
        assert alert["figures"]["samples_stored"] == 5
        assert alert["samples"]["count"] == 5
        url = alert["samples"]["export_url"]
        assert url.startswith("http://fleet.example:8000/api/v1/samples/export?model=tiny")
        assert "--group gateways" in alert["samples"]["export_command"]
        assert hook.headers[0]["X-Edgefleet-Alert-Id"] == str(alert["id"])

        # the export URL of the alert gives the window's samples of the group
        path = url.removeprefix("http://fleet.example:8000")
        got = fleet.client.get(path, headers=fleet.admin)
        assert got.status_code == 200, got.text
        table = pq.read_table(io.BytesIO(got.content))
        assert table.num_rows == 5 and set(table.column("device_id").to_pylist()) == {"cam-1"}

        # no repeat storm: more rounds in breach send nothing more
        time.sleep(2.0)
        assert hook.requests == 1

    # recorded: the alert list (delivered), the audit log, /metrics
    alerts = fleet.client.get("/api/v1/alerts", headers=fleet.admin).json()["items"]
    assert [(a["status"], a["delivery"], a["attempts"]) for a in alerts] == [
        ("firing", "delivered", 1)
    ]
    audit = fleet.client.get(
        "/api/v1/audit", headers=fleet.admin, params={"action": "alert.firing"}
    ).json()["items"]
    firing = [e for e in audit if e["action"] == "alert.firing"]
    assert len(firing) == 1 and firing[0]["details"]["group"] == "gateways"
    metrics = fleet.client.get("/metrics").text
    assert (
        'edgefleet_alert_firing{group="gateways",kind="drift",model="tiny",'
        'rule="gateways-drift"} 1.0' in metrics
    )
    assert (
        'edgefleet_alert_figure{figure="drift_psi",group="gateways",model="tiny",window="600s"}'
        in metrics
    )
