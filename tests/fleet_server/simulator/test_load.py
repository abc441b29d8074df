"""The light load simulator against a real server (PostgreSQL, Mosquitto, uvicorn):
20 devices enroll through the API, check in with ETags, download their bundle in Range
requests, report the install, and send summary windows whose rows reach the database
with strictly increasing sequence numbers."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

from fleet_server.simulator.load import LoadConfig, LoadFleet
from tests.brokers import SERVER_USER, MosquittoBroker
from tests.bundlesim import BundleSim, tiny_onnx_model
from tests.server_fixtures import (
    ADMIN_TOKEN,
    LiveServer,
    auth,
    pg_url,  # noqa: F401
    server_keys,
    start_server,
    stop_server,
)

DEVICES = 20


@pytest.fixture
def stack(tmp_path: Path, pg_url: str) -> Iterator[tuple[LiveServer, MosquittoBroker, str]]:  # noqa: F811
    password = secrets.token_urlsafe(12)
    # devices connect without a password (the simulator's credential is not checked here);
    # the server logs in as SERVER_USER
    broker = MosquittoBroker(tmp_path / "broker", persistence=False).start()
    sim = BundleSim(tmp_path / "repo")
    keys_dir, kid, trust = server_keys(tmp_path, sim)
    server = start_server(
        {
            "database_url": pg_url,
            "bundle_dir": str(tmp_path / "bundles"),
            "admin_bootstrap_token": ADMIN_TOKEN,
            "trust_store": str(trust),
            "signing_key_dir": str(keys_dir),
            "signing_key": kid,
            "mqtt_host": "127.0.0.1",
            "mqtt_port": str(broker.port),
            "mqtt_username": SERVER_USER,
            "mqtt_password": password,
            "telemetry_window_seconds": "1",
            "last_seen_flush_seconds": "0.5",
        },
        tmp_path / "server.log",
    )
    bundle = sim.publish(version=1, model_bytes=tiny_onnx_model(0, n_in=16, n_out=16))
    with open(bundle, "rb") as f:
        r = httpx.post(
            f"{server.url}/api/v1/bundles",
            headers=auth(ADMIN_TOKEN),
            files={"file": (bundle.name, f, "application/octet-stream")},
            timeout=30,
        )
    assert r.status_code == 201, r.text
    try:
        yield server, broker, r.json()["id"]
    finally:
        stop_server(server.proc)
        broker.stop()


def _psycopg_dsn(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


def test_simulated_devices_check_in_download_report_and_send_telemetry(
    stack: tuple[LiveServer, MosquittoBroker, str],
    pg_url: str,  # noqa: F811
) -> None:
    server, broker, bundle_id = stack
    cfg = LoadConfig(
        server.url,
        "127.0.0.1",
        broker.port,
        poll_seconds=0.5,
        window_seconds=1.0,
        inferences_per_window=10,
        range_bytes=2048,
    )

    async def run() -> LoadFleet:
        fleet = LoadFleet(cfg)
        devices = await fleet.enroll(ADMIN_TOKEN, DEVICES, device_class="sim-gw")
        assert len(devices) == DEVICES
        admin = auth(ADMIN_TOKEN)
        for d in devices:
            r = await fleet.http.put(
                f"/api/v1/devices/{d.device_id}/assignment",
                headers=admin,
                json={"desired_bundle_id": bundle_id},
            )
            assert r.status_code == 200, r.text
        await fleet.connect()
        fleet.start()
        # until every device installed and sent two windows more (a busy CI machine is slow)
        deadline = asyncio.get_running_loop().time() + 90
        while asyncio.get_running_loop().time() < deadline and (
            fleet.stats.installs < DEVICES or fleet.stats.published < 3 * DEVICES
        ):
            await asyncio.sleep(0.5)
        await asyncio.sleep(2)  # a few more polls, answered 304
        await fleet.stop()
        return fleet

    fleet = asyncio.run(run())
    st = fleet.stats
    ids = {d.device_id for d in fleet.devices}
    assert st.checkin_errors == 0 and st.download_errors == 0 and st.publish_errors == 0
    assert len(st.first_checkin) == DEVICES
    assert len(st.checkin_304) >= DEVICES  # later polls answered from the ETag
    assert st.downloads == DEVICES and st.installs == DEVICES
    assert st.download_bytes / DEVICES > 2 * cfg.range_bytes  # several Range requests each
    assert all(d.model is not None and d.model["bundle_id"] == bundle_id for d in fleet.devices)

    with psycopg.connect(_psycopg_dsn(pg_url)) as conn:
        seen = {r[0] for r in conn.execute("SELECT id FROM devices WHERE last_seen_at IS NOT NULL")}
        assert seen == ids
        reports = {
            r[0]
            for r in conn.execute(
                "SELECT device_id FROM device_reports WHERE type = 'install' "
                "AND outcome = 'installed'"
            )
        }
        assert reports == ids
        rows = conn.execute(
            "SELECT device_id, seq, version, count FROM telemetry_summaries ORDER BY device_id, seq"
        ).fetchall()
        events = conn.execute(
            "SELECT device_id, seq FROM telemetry_events WHERE type = 'install'"
        ).fetchall()
    assert {r[0] for r in rows} == ids
    assert {r[0] for r in events} == ids
    assert all(r[2] == 1 and r[3] == 10 for r in rows)
    # seq strictly increases per device across kinds: no two rows share one
    per_device: dict[str, list[int]] = {}
    for device_id, seq in [(r[0], r[1]) for r in rows] + list(events):
        per_device.setdefault(device_id, []).append(seq)
    assert all(len(s) == len(set(s)) for s in per_device.values())
