"""The server and a real Mosquitto: assignment-changed notices, and telemetry
ingested by the worker the app runs, queried back through the admin API."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from fastapi.testclient import TestClient

from device_agent.protocol import notify_topic, telemetry_topic
from fleet_server.app import create_app
from tests.brokers import (
    DEVICE_ACL,
    SERVER_USER,
    MessageCollector,
    MosquittoBroker,
    publish_once,
)
from tests.server_fixtures import Fleet, make_settings, server_keys

if TYPE_CHECKING:
    from tests.bundlesim import BundleSim


USERS = {"cam-1": "pw-1", "cam-2": "pw-2", SERVER_USER: "pw-server"}


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    b = MosquittoBroker(tmp_path / "broker", users=USERS, acl=DEVICE_ACL)
    b.start()
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture
def mqtt_fleet(
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
    )
    with TestClient(create_app(settings)) as client:
        yield Fleet(client=client, sim=bundle_sim, tmp=tmp_path)


def test_assignment_change_is_notified_to_that_device_only(
    mqtt_fleet: Fleet, broker: MosquittoBroker
) -> None:
    fleet = mqtt_fleet
    fleet.enroll("cam-1")
    fleet.enroll("cam-2")
    bundle = fleet.upload_bundle()
    with (
        MessageCollector(
            broker,
            [notify_topic("cam-1")],
            username="cam-1",
            password=USERS["cam-1"],
            client_id="cam-1",
        ) as mine,
        MessageCollector(
            broker,
            [notify_topic("cam-1")],
            username="cam-2",
            password=USERS["cam-2"],
            client_id="cam-2-snoop",
        ) as snoop,
    ):
        fleet.assign("cam-1", bundle["id"])
        assert mine.wait_for(lambda m: len(m) >= 1, timeout=10)
        etag = fleet.client.get(
            "/device/v1/assignment", headers=fleet.enroll_headers["cam-1"]
        ).headers["etag"]
        assert mine.snapshot()[0].json() == {"assignment_id": etag.strip('"')}
        time.sleep(0.3)  # give a forbidden delivery the chance to arrive
        assert snoop.snapshot() == []  # the broker ACL keeps other devices out


def test_telemetry_published_by_a_device_is_ingested_and_queryable(
    mqtt_fleet: Fleet, broker: MosquittoBroker
) -> None:
    fleet = mqtt_fleet
    fleet.enroll("cam-1")
    hist = [0] * 19  # successful inferences only: totals count - errors
    hist[9] = 86
    hist[10] = 10
    body = {
        "window_start": 0,
        "window_end": 60,
        "name": "tiny",
        "version": 3,
        "slot": "a",
        "rollout_id": None,
        "count": 100,
        "errors": 4,
        "latency_ms": {"p50": 7, "p95": 12, "p99": 15, "mean": 8},
        "latency_hist": hist,
        "drift": None,
        "shadow": None,
        "dropped": {"samples": 0, "summaries": 0},
    }
    payload = {
        "device_id": "cam-1",
        "records": [{"seq": 1, "kind": "summary", "ts": time.time(), "body": body}],
    }
    publish_once(
        broker,
        "cam-1",
        USERS["cam-1"],
        telemetry_topic("cam-1", "summary"),
        json.dumps(payload).encode(),
    )
    deadline = time.monotonic() + 15
    summary: dict[str, object] = {}
    while time.monotonic() < deadline:
        r = fleet.client.get(
            "/api/v1/telemetry", headers=fleet.admin, params={"name": "tiny", "version": 3}
        )
        summary = r.json()["summary"]
        if summary["inferences"]:
            break
        time.sleep(0.1)
    assert summary["inferences"] == 100 and summary["errors"] == 4
    assert summary["error_rate"] == pytest.approx(0.04)
    p95 = summary["latency_ms"]["p95"]  # type: ignore[index]
    assert 10 <= p95 <= 20  # bucket (10, 20] ms


def test_server_refuses_to_start_in_production_with_default_secrets(tmp_path: Path) -> None:
    from fleet_server.settings import SettingsError, load_settings

    with pytest.raises(SettingsError, match="token_pepper"):
        load_settings(environment="production", database_url=f"sqlite:///{tmp_path}/x.db")
    secrets = {"token_pepper": "p" * 32, "admin_bootstrap_token": "t" * 32}
    with pytest.raises(SettingsError, match="ca_dir"):  # plain device traffic: development
        load_settings(environment="production", database_url="sqlite:///x.db", **secrets)
    ok = load_settings(
        environment="production", database_url="sqlite:///x.db", ca_dir=tmp_path, **secrets
    )
    assert ok.environment == "production"


def test_embedded_broker_with_a_fleet_ca_is_refused_with_what_to_use(tmp_path: Path) -> None:
    """The embedded broker has no TLS listener checking client certificates: devices given
    an mqtts endpoint would never connect, so the combination is refused at start."""
    from fleet_server.settings import SettingsError, load_settings

    with pytest.raises(SettingsError, match="broker = mosquitto"):
        load_settings(database_url="sqlite:///x.db", broker="embedded", ca_dir=tmp_path)
    assert load_settings(database_url="sqlite:///x.db", broker="embedded").ca_dir is None
    with_ca = load_settings(database_url="sqlite:///x.db", broker="mosquitto", ca_dir=tmp_path)
    assert with_ca.ca_dir == tmp_path


def test_settings_file_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fleet_server.settings import SettingsError, load_settings

    f = tmp_path / "server.toml"
    f.write_text('[server]\ndatabase_url = "sqlite:///from-file.db"\nmqtt_port = 1999\n')
    monkeypatch.setenv("EDGEFLEET_SERVER_MQTT_PORT", "2883")
    s = load_settings(f)
    assert s.database_url == "sqlite:///from-file.db" and s.mqtt_port == 2883
    f.write_text("[server]\nbogus = 1\n")
    with pytest.raises(SettingsError, match="bogus"):
        load_settings(f)
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(tmp_path / "missing.toml")


def test_metrics_endpoint_counts_checkins(fleet: Fleet) -> None:
    dev = fleet.enroll("cam-1")
    etag = fleet.client.get("/device/v1/assignment", headers=dev).headers["etag"]
    for _ in range(3):
        fleet.client.get("/device/v1/assignment", headers={**dev, "If-None-Match": etag})
    text = fleet.client.get("/metrics").text
    assert 'edgefleet_checkins_total{result="not_modified"} 3.0' in text
    assert 'edgefleet_checkins_total{result="changed"} 1.0' in text
    assert fleet.client.get("/healthz").json()["status"] == "ok"
