"""HTTP-level behaviour against real `edgefleet server` processes: check-in with
ETag/304 and ranged bundle download over a socket, source-model builds, and two
replicas sharing one database (an assignment changed on one is served by the other)."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from tests.bundlesim import tiny_onnx_model
from tests.server_fixtures import ADMIN_TOKEN, server_keys, start_server, stop_server

if TYPE_CHECKING:
    from tests.bundlesim import BundleSim
    from tests.server_fixtures import Fleet, LiveServer


ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def _enroll(url: str, device_id: str) -> dict[str, str]:
    t = httpx.post(f"{url}/api/v1/enrollment-tokens", headers=ADMIN, json={}).json()["token"]
    r = httpx.post(
        f"{url}/device/v1/enroll",
        json={"enrollment_token": t, "device_id": device_id, "device_class": "cam"},
    )
    assert r.status_code == 201, r.text
    return {"Authorization": f"Bearer {r.json()['credential']}"}


def _upload(url: str, sim: BundleSim, version: int) -> dict[str, Any]:
    from datetime import datetime, timedelta, timezone

    path = sim.publish(
        version=version,
        seed=version,
        created=datetime.now(timezone.utc).replace(microsecond=0) - timedelta(hours=1),
    )
    with open(path, "rb") as f:
        r = httpx.post(f"{url}/api/v1/bundles", headers=ADMIN, files={"file": (path.name, f)})
    assert r.status_code == 201, r.text
    return dict(r.json())


def test_checkin_304_and_resumed_download_over_http(
    live_server: LiveServer, bundle_sim: BundleSim
) -> None:
    url = live_server.url
    dev = _enroll(url, "cam-1")
    bundle = _upload(url, bundle_sim, 2)
    httpx.put(
        f"{url}/api/v1/devices/cam-1/assignment",
        headers=ADMIN,
        json={"desired_bundle_id": bundle["id"]},
    ).raise_for_status()
    with httpx.Client(base_url=url, headers=dev) as c:
        first = c.get("/device/v1/assignment")
        assert first.status_code == 200
        desired = first.json()["desired"]
        assert (
            c.get(
                "/device/v1/assignment", headers={"If-None-Match": first.headers["etag"]}
            ).status_code
            == 304
        )
        head = c.get(desired["url"], headers={"Range": "bytes=0-999"})
        assert head.status_code == 206 and len(head.content) == 1000
        rest = c.get(desired["url"], headers={"Range": "bytes=1000-"})
        assert rest.status_code == 206
        data = head.content + rest.content
        assert len(data) == desired["size"]
        assert hashlib.sha256(data).hexdigest() == desired["sha256"]


def test_two_replicas_share_assignments_and_one_leads(
    tmp_path: Path, pg_url: str, bundle_sim: BundleSim
) -> None:
    keys_dir, kid, trust = server_keys(tmp_path, bundle_sim)
    common = {
        "database_url": pg_url,
        "bundle_dir": str(tmp_path / "bundles"),
        "admin_bootstrap_token": ADMIN_TOKEN,
        "trust_store": str(trust),
        "signing_key_dir": str(keys_dir),
        "signing_key": kid,
        "assignment_cache_seconds": "0.2",
        "rollout_interval_seconds": "0.2",
    }
    a = start_server(common, tmp_path / "a.log")
    try:
        b = start_server(common, tmp_path / "b.log")
        try:
            dev = _enroll(a.url, "cam-1")
            etag = httpx.get(f"{b.url}/device/v1/assignment", headers=dev).headers["etag"]
            bundle = _upload(a.url, bundle_sim, 3)
            httpx.put(
                f"{a.url}/api/v1/devices/cam-1/assignment",
                headers=ADMIN,
                json={"desired_bundle_id": bundle["id"]},
            ).raise_for_status()
            deadline = time.monotonic() + 10
            status = 304
            while time.monotonic() < deadline:
                r = httpx.get(
                    f"{b.url}/device/v1/assignment", headers={**dev, "If-None-Match": etag}
                )
                status = r.status_code
                if status == 200:
                    assert r.json()["desired"]["bundle_id"] == bundle["id"]
                    break
                time.sleep(0.1)
            assert status == 200, "replica b kept serving the stale assignment"
            # both run the scheduler loop; only the holder of the database lock evaluates
            time.sleep(1.0)
            rounds = sorted(httpx.get(f"{s.url}/healthz").json()["rollout_rounds"] for s in (a, b))
            assert rounds[0] == 0 and rounds[1] > 0, rounds
        finally:
            stop_server(b.proc)
    finally:
        stop_server(a.proc)


def test_source_model_is_converted_signed_and_registered(fleet: Fleet, tmp_path: Path) -> None:
    src = tmp_path / "model.onnx"
    src.write_bytes(tiny_onnx_model(seed=3))
    with open(src, "rb") as f:
        r = fleet.client.post(
            "/api/v1/models/tiny/sources",
            headers=fleet.admin,
            files={"file": ("model.onnx", f, "application/octet-stream")},
            data={"version": "5", "target": ["onnx:float32=cam"]},
        )
    assert r.status_code == 201, r.text
    result = r.json()["results"][0]
    assert result["error"] is None, result
    bundle = result["bundle"]
    assert bundle["version"] == 5 and bundle["device_classes"] == ["cam"]
    assert bundle["source"] == "converted" and len(bundle["signed_by"]) == 1


def test_source_model_of_unsupported_type_is_refused(fleet: Fleet, tmp_path: Path) -> None:
    r = fleet.client.post(
        "/api/v1/models/tiny/sources",
        headers=fleet.admin,
        files={"file": ("model.pkl", b"not a model", "application/octet-stream")},
        data={"version": "5", "target": ["onnx"]},
    )
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "bad_request"
