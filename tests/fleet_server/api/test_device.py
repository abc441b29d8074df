"""Device API: enrollment, check-in with ETag/304, bundle download with Range, reports.

Every test runs on a SQLite file and on a fresh PostgreSQL database.
"""

from __future__ import annotations

import hashlib
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import update

from fleet_server.db.models import EnrollmentToken
from fleet_server.db.types import utcnow

if TYPE_CHECKING:
    from tests.server_fixtures import Fleet


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _enroll(fleet: Fleet, token: str, device_id: str, device_class: str = "cam") -> object:
    return fleet.client.post(
        "/device/v1/enroll",
        json={"enrollment_token": token, "device_id": device_id, "device_class": device_class},
    )


def test_enrollment_token_is_single_use(fleet: Fleet) -> None:
    token = fleet.enrollment_token()
    first = _enroll(fleet, token, "cam-1")
    assert first.status_code == 201  # type: ignore[attr-defined]
    second = _enroll(fleet, token, "cam-2")
    assert second.status_code == 401  # type: ignore[attr-defined]
    assert second.json()["error"]["code"] == "enrollment_token_invalid"  # type: ignore[attr-defined]
    assert fleet.client.get("/api/v1/devices/cam-2", headers=fleet.admin).status_code == 404


def test_expired_enrollment_token_is_refused(fleet: Fleet) -> None:
    token = fleet.enrollment_token(ttl_seconds=3600)
    ctx = fleet.client.app.state.ctx  # type: ignore[attr-defined]
    with ctx.session() as s:
        s.execute(update(EnrollmentToken).values(expires_at=utcnow() - timedelta(seconds=1)))
        s.commit()
    r = _enroll(fleet, token, "cam-late")
    assert r.status_code == 401  # type: ignore[attr-defined]
    assert r.json()["error"]["code"] == "enrollment_token_invalid"  # type: ignore[attr-defined]


def test_unknown_enrollment_token_is_refused(fleet: Fleet) -> None:
    r = _enroll(fleet, "efe_not-a-token", "cam-x")
    assert r.status_code == 401  # type: ignore[attr-defined]


def test_enrollment_token_for_another_class_is_refused_and_not_burned(fleet: Fleet) -> None:
    token = fleet.enrollment_token(device_class="gateway")
    wrong = _enroll(fleet, token, "cam-1", device_class="cam")
    assert wrong.status_code == 401  # type: ignore[attr-defined]
    right = _enroll(fleet, token, "gw-1", device_class="gateway")
    assert right.status_code == 201  # type: ignore[attr-defined]


def test_enrolling_an_existing_device_id_conflicts(fleet: Fleet) -> None:
    fleet.enroll("cam-1")
    r = _enroll(fleet, fleet.enrollment_token(), "cam-1")
    assert r.status_code == 409  # type: ignore[attr-defined]
    assert r.json()["error"]["code"] == "conflict"  # type: ignore[attr-defined]


def test_enrollment_token_labels_are_applied(fleet: Fleet) -> None:
    token = fleet.enrollment_token(labels={"site": "north"})
    r = fleet.client.post(
        "/device/v1/enroll",
        json={
            "enrollment_token": token,
            "device_id": "cam-9",
            "device_class": "cam",
            "labels": {"floor": "2"},
        },
    )
    assert r.json()["labels"] == {"site": "north", "floor": "2"}


def test_checkin_returns_etag_and_304_when_unchanged(fleet: Fleet) -> None:
    dev = fleet.enroll("cam-1")
    first = fleet.client.get("/device/v1/assignment", headers=dev)
    assert first.status_code == 200
    doc = first.json()
    assert doc["device_id"] == "cam-1" and doc["desired"] is None
    assert first.headers["etag"] == f'"{doc["assignment_id"]}"'
    again = fleet.client.get(
        "/device/v1/assignment", headers={**dev, "If-None-Match": first.headers["etag"]}
    )
    assert again.status_code == 304
    assert again.content == b""
    stale = fleet.client.get("/device/v1/assignment", headers={**dev, "If-None-Match": '"old"'})
    assert stale.status_code == 200


def test_assignment_change_changes_etag(fleet: Fleet) -> None:
    dev = fleet.enroll("cam-1")
    etag = fleet.client.get("/device/v1/assignment", headers=dev).headers["etag"]
    bundle = fleet.upload_bundle(version=3)
    fleet.assign("cam-1", bundle["id"])
    r = fleet.client.get("/device/v1/assignment", headers={**dev, "If-None-Match": etag})
    assert r.status_code == 200
    desired = r.json()["desired"]
    assert desired["bundle_id"] == bundle["id"] and desired["version"] == 3
    assert desired["sha256"] == bundle["sha256"] and desired["size"] == bundle["size"]
    assert desired["url"] == f"/device/v1/bundles/{bundle['id']}"
    assert r.headers["etag"] != etag


def test_bundle_download_full_and_ranges(fleet: Fleet) -> None:
    dev = fleet.enroll("cam-1")
    bundle = fleet.upload_bundle()
    fleet.assign("cam-1", bundle["id"])
    url = f"/device/v1/bundles/{bundle['id']}"
    full = fleet.client.get(url, headers=dev)
    assert full.status_code == 200
    assert hashlib.sha256(full.content).hexdigest() == bundle["sha256"]
    part = fleet.client.get(url, headers={**dev, "Range": "bytes=100-"})
    assert part.status_code == 206
    assert part.content == full.content[100:]
    assert part.headers["content-range"] == f"bytes 100-{len(full.content) - 1}/{len(full.content)}"
    mid = fleet.client.get(url, headers={**dev, "Range": "bytes=10-19"})
    assert mid.status_code == 206 and mid.content == full.content[10:20]
    beyond = fleet.client.get(url, headers={**dev, "Range": f"bytes={len(full.content) + 5}-"})
    assert beyond.status_code == 416


def test_device_cannot_fetch_a_bundle_not_assigned_to_it(fleet: Fleet) -> None:
    a = fleet.enroll("cam-a")
    b = fleet.enroll("cam-b")
    bundle_a = fleet.upload_bundle(version=2, seed=1)
    fleet.assign("cam-a", bundle_a["id"])
    url = f"/device/v1/bundles/{bundle_a['id']}"
    assert fleet.client.get(url, headers=a).status_code == 200
    denied = fleet.client.get(url, headers=b)
    assert denied.status_code == 404
    assert denied.json()["error"]["code"] == "not_found"
    assert fleet.client.get(url).status_code == 401


def test_device_sees_only_its_own_assignment(fleet: Fleet) -> None:
    a = fleet.enroll("cam-a")
    b = fleet.enroll("cam-b")
    bundle = fleet.upload_bundle()
    fleet.assign("cam-a", bundle["id"])
    assert fleet.client.get("/device/v1/assignment", headers=a).json()["device_id"] == "cam-a"
    other = fleet.client.get("/device/v1/assignment", headers=b).json()
    assert other["device_id"] == "cam-b" and other["desired"] is None


def test_wrong_or_revoked_device_credential_is_refused(fleet: Fleet) -> None:
    dev = fleet.enroll("cam-1")
    assert fleet.client.get("/device/v1/assignment", headers=auth("efd_wrong")).status_code == 401
    assert fleet.client.get("/device/v1/assignment").status_code == 401
    assert fleet.client.get("/device/v1/assignment", headers=dev).status_code == 200
    r = fleet.client.post("/api/v1/devices/cam-1/revoke", headers=fleet.admin)
    assert r.status_code == 200
    refused = fleet.client.get("/device/v1/assignment", headers=dev)
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "invalid_token"


def test_operator_token_is_not_a_device_credential(fleet: Fleet) -> None:
    assert fleet.client.get("/device/v1/assignment", headers=fleet.admin).status_code == 401


def test_install_report_updates_device_and_is_stored(fleet: Fleet) -> None:
    dev = fleet.enroll("cam-1")
    bundle = fleet.upload_bundle(version=4)
    r = fleet.client.post(
        "/device/v1/reports",
        headers=dev,
        json={
            "reports": [
                {
                    "type": "install",
                    "outcome": "installed",
                    "name": "tiny",
                    "version": 4,
                    "error_code": None,
                    "message": "ok",
                    "state": "committed",
                    "ts": 1760000000.0,
                }
            ]
        },
    )
    assert r.status_code == 200 and r.json() == {"accepted": 1}
    d = fleet.client.get("/api/v1/devices/cam-1", headers=fleet.admin).json()
    assert d["current_version"] == 4 and d["current_bundle_id"] == bundle["id"]
    assert d["last_seen_at"] is not None


def test_device_health_follows_its_install_reports(fleet: Fleet) -> None:
    dev = fleet.enroll("cam-1")
    fleet.upload_bundle(version=4)

    def report(outcome: str, code: str | None) -> dict[str, Any]:
        r = fleet.client.post(
            "/device/v1/reports",
            headers=dev,
            json={
                "reports": [
                    {
                        "type": "install",
                        "outcome": outcome,
                        "name": "tiny",
                        "version": 4,
                        "error_code": code,
                        "message": "",
                        "state": "idle",
                        "ts": 1760000000.0,
                    }
                ]
            },
        )
        assert r.status_code == 200
        return dict(fleet.client.get("/api/v1/devices/cam-1", headers=fleet.admin).json())

    assert report("installed", None)["health"] == "ok"
    assert report("refused", "expired")["health"] == "degraded"
    assert report("installed", None)["health"] == "ok"


def test_malformed_report_is_a_validation_error(fleet: Fleet) -> None:
    dev = fleet.enroll("cam-1")
    r = fleet.client.post("/device/v1/reports", headers=dev, json={"reports": [{"type": "bogus"}]})
    assert r.status_code == 422
    assert r.json()["error"]["code"] == "validation_error"


def test_uploaded_bundle_signed_by_unknown_key_is_rejected(fleet: Fleet, tmp_path: Path) -> None:
    path = fleet.sim.publish(signers=("stranger",))
    with open(path, "rb") as f:
        r = fleet.client.post(
            "/api/v1/bundles",
            headers=fleet.admin,
            files={"file": ("b.efb", f, "application/octet-stream")},
        )
    assert r.status_code == 422
    assert r.json()["error"]["code"] == "bundle_rejected"
    assert not list((tmp_path / "bundles").glob("*.efb"))


def test_uploading_the_same_bundle_twice_conflicts(fleet: Fleet) -> None:
    path = fleet.sim.publish(version=5, created=utcnow().replace(microsecond=0))
    for expected in (201, 409):
        with open(path, "rb") as f:
            r = fleet.client.post(
                "/api/v1/bundles",
                headers=fleet.admin,
                files={"file": ("b.efb", f, "application/octet-stream")},
            )
        assert r.status_code == expected, r.text


def test_rollback_report_counts_against_the_bundle_rolled_back_from(fleet: Fleet) -> None:
    dev = fleet.enroll("cam-1")
    r = fleet.client.post(
        "/device/v1/reports",
        headers=dev,
        json={
            "reports": [
                {
                    "type": "install",
                    "outcome": "rolled_back",
                    "name": "tiny",
                    "version": 2,
                    "rolled_back_from": {"name": "tiny", "version": 3, "bundle_id": "b-x"},
                    "error_code": "probation_failed",
                    "ts": 1760000000.0,
                }
            ]
        },
    )
    assert r.status_code == 200
    d = fleet.client.get("/api/v1/devices/cam-1", headers=fleet.admin).json()
    assert d["current_version"] == 2
    v3 = fleet.client.get(
        "/api/v1/telemetry", headers=fleet.admin, params={"name": "tiny", "version": 3}
    ).json()
    assert v3["installs"]["outcomes"] == {"rolled_back": 1}
