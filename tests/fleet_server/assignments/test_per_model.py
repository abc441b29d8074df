"""Several models per device on the server (SQLite and PostgreSQL): one assignment entry
per (device, model) with its own ETag, check-ins by ``?model=``, downloads of any model's
bundle, per-model running versions from install reports, and two rollouts of two models
in one group, each owning its model only."""

from __future__ import annotations

from typing import Any

from fleet_server.assignments.cache import AssignmentCache
from tests.server_fixtures import Fleet

ASSIGNMENT = "/device/v1/assignment"


def _checkin(fleet: Fleet, device: str, model: str | None = None, etag: str | None = None) -> Any:
    headers = dict(fleet.enroll_headers[device])
    if etag is not None:
        headers["If-None-Match"] = f'"{etag}"'
    return fleet.client.get(ASSIGNMENT, params={"model": model} if model else None, headers=headers)


def _report_installed(fleet: Fleet, device: str, name: str, version: int) -> None:
    r = fleet.client.post(
        "/device/v1/reports",
        headers=fleet.enroll_headers[device],
        json={
            "reports": [
                {"type": "install", "outcome": "installed", "name": name, "version": version}
            ]
        },
    )
    assert r.status_code in (200, 202), r.text


def test_each_model_has_its_own_entry_and_etag(fleet: Fleet) -> None:
    fleet.enroll("cam-1")
    det = fleet.upload_bundle(version=3, seed=1, name="detector")
    cls = fleet.upload_bundle(version=7, seed=2, name="classifier")
    fleet.assign("cam-1", det["id"])
    fleet.assign("cam-1", cls["id"])  # a second model: the first one's entry stays

    d = _checkin(fleet, "cam-1", "detector")
    c = _checkin(fleet, "cam-1", "classifier")
    assert d.status_code == c.status_code == 200
    assert (d.json()["model"], d.json()["desired"]["version"]) == ("detector", 3)
    assert (c.json()["model"], c.json()["desired"]["version"]) == ("classifier", 7)
    assert d.headers["etag"] != c.headers["etag"]

    # a new detector release changes the detector's ETag only
    det2 = fleet.upload_bundle(version=4, seed=3, name="detector")
    fleet.assign("cam-1", det2["id"])
    assert _checkin(fleet, "cam-1", "classifier", c.json()["assignment_id"]).status_code == 304
    d2 = _checkin(fleet, "cam-1", "detector", d.json()["assignment_id"])
    assert d2.status_code == 200 and d2.json()["desired"]["version"] == 4

    # without ?model= (a one-model agent): the most recently changed entry
    assert _checkin(fleet, "cam-1").json()["model"] == "detector"
    # a model nothing is assigned to: the empty entry, named for that model
    empty = _checkin(fleet, "cam-1", "segmenter").json()
    assert empty["desired"] is None and empty["model"] == "segmenter"
    # a model name that is not one is refused, with a code
    bad = _checkin(fleet, "cam-1", "../etc")
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "bad_model_name"

    # either model's bundle may be downloaded; another device's may not
    for b in (det2, cls):
        r = fleet.client.get(f"/device/v1/bundles/{b['id']}", headers=fleet.enroll_headers["cam-1"])
        assert r.status_code == 200 and len(r.content) == b["size"]
    fleet.enroll("cam-2")
    r = fleet.client.get(f"/device/v1/bundles/{cls['id']}", headers=fleet.enroll_headers["cam-2"])
    assert r.status_code == 404


def test_a_second_replica_polls_each_models_entry(fleet: Fleet) -> None:
    fleet.enroll("cam-1")
    det = fleet.upload_bundle(version=3, seed=1, name="detector")
    cls = fleet.upload_bundle(version=7, seed=2, name="classifier")
    fleet.assign("cam-1", det["id"])
    ctx = fleet.ctx
    other = AssignmentCache(ctx.engine, ctx.telemetry_policy, overlap_seconds=60)
    before = other.load("cam-1", "classifier")
    default = other.load("cam-1")
    assert before.doc["desired"] is None and default.doc["model"] == "detector"
    fleet.assign("cam-1", cls["id"])
    assert other.poll() == 2  # the classifier's entry and the device's default
    now = other.get("cam-1", "classifier")
    assert now is not None and now.doc["desired"]["bundle_id"] == cls["id"]
    newest = other.get("cam-1")
    assert newest is not None and newest.doc["model"] == "classifier"


def test_the_device_shows_each_model_and_clearing_one_needs_its_name(fleet: Fleet) -> None:
    fleet.enroll("cam-1")
    det = fleet.upload_bundle(version=3, seed=1, name="detector")
    cls = fleet.upload_bundle(version=7, seed=2, name="classifier")
    fleet.assign("cam-1", det["id"])
    fleet.assign("cam-1", cls["id"])
    _report_installed(fleet, "cam-1", "detector", 3)
    _report_installed(fleet, "cam-1", "classifier", 7)
    info = fleet.client.get("/api/v1/devices/cam-1", headers=fleet.admin).json()
    assert {m: (v["version"], v["assignment"]["model"]) for m, v in info["models"].items()} == {
        "detector": (3, "detector"),
        "classifier": (7, "classifier"),
    }
    r = fleet.client.put(
        "/api/v1/devices/cam-1/assignment",
        headers=fleet.admin,
        json={"desired_bundle_id": None, "model": "classifier"},
    )
    assert r.status_code == 200, r.text
    assert r.json()["models"]["classifier"]["assignment"]["desired"] is None
    assert r.json()["models"]["detector"]["assignment"]["desired"]["version"] == 3
    # a bundle of one model cannot be assigned as another
    r = fleet.client.put(
        "/api/v1/devices/cam-1/assignment",
        headers=fleet.admin,
        json={"desired_bundle_id": det["id"], "model": "classifier"},
    )
    assert r.status_code == 400 and "detector" in r.text


def test_two_rollouts_of_two_models_in_one_group_each_own_their_model(fleet: Fleet) -> None:
    for i in range(3):
        fleet.enroll(f"cam-{i}")
    det = fleet.upload_bundle(version=3, seed=1, name="detector")
    cls = fleet.upload_bundle(version=7, seed=2, name="classifier")
    g = fleet.client.post(
        "/api/v1/groups", headers=fleet.admin, json={"name": "cams", "device_class": "cam"}
    )
    assert g.status_code == 201, g.text
    rollouts = []
    for b in (det, cls):
        r = fleet.client.post(
            "/api/v1/rollouts",
            headers=fleet.admin,
            json={
                "name": b["name"],
                "bundle_id": b["id"],
                "group": g.json()["id"],
                "strategy": "all_at_once",
                "stages": [{"percent": 100, "soak_seconds": 0}],
                "gates": [],
                "start": True,
            },
        )
        assert r.status_code == 201, r.text
        rollouts.append(r.json()["id"])
    for i in range(3):
        d = _checkin(fleet, f"cam-{i}", "detector").json()
        c = _checkin(fleet, f"cam-{i}", "classifier").json()
        # the classifier's rollout, created later, did not take the detector over
        assert (d["desired"]["bundle_id"], d["rollout_id"]) == (det["id"], rollouts[0])
        assert (c["desired"]["bundle_id"], c["rollout_id"]) == (cls["id"], rollouts[1])
    # a device enrolled later gets both models from their rollouts
    fleet.enroll("cam-9")
    assert _checkin(fleet, "cam-9", "detector").json()["desired"]["bundle_id"] == det["id"]
    assert _checkin(fleet, "cam-9", "classifier").json()["desired"]["bundle_id"] == cls["id"]
    # progress is per model: installs of the classifier do not count for the detector
    for i in range(3):
        _report_installed(fleet, f"cam-{i}", "classifier", 7)
    status = fleet.client.get(f"/api/v1/rollouts/{rollouts[0]}/status", headers=fleet.admin).json()
    by_state = status["devices"]["by_state"]
    assert "on candidate" not in by_state, by_state


def test_a_rollout_with_nothing_to_run_clears_its_own_model_only(fleet: Fleet) -> None:
    fleet.enroll("cam-1")
    det = fleet.upload_bundle(version=3, seed=1, name="detector")
    cls = fleet.upload_bundle(version=7, seed=2, name="classifier")
    fleet.assign("cam-1", det["id"])
    g = fleet.client.post(
        "/api/v1/groups", headers=fleet.admin, json={"name": "cams", "device_class": "cam"}
    )
    # a canary rollout of the classifier with no previous model: the device is outside the
    # first stage's cohort or inside it; either way only the classifier's entry is written
    r = fleet.client.post(
        "/api/v1/rollouts",
        headers=fleet.admin,
        json={
            "name": "classifier",
            "bundle_id": cls["id"],
            "group": g.json()["id"],
            "strategy": "staged_canary",
            "stages": [
                {"percent": 1, "min_devices": 0, "soak_seconds": 60},
                {"percent": 100, "soak_seconds": 0},
            ],
            "gates": [],
            "start": True,
        },
    )
    assert r.status_code == 201, r.text
    r = fleet.client.post(f"/api/v1/rollouts/{r.json()['id']}/abort", headers=fleet.admin, json={})
    assert r.status_code == 200, r.text
    d = _checkin(fleet, "cam-1", "detector").json()
    c = _checkin(fleet, "cam-1", "classifier").json()
    assert d["desired"]["bundle_id"] == det["id"]
    assert c["desired"] is None and c["model"] == "classifier"
    info = fleet.client.get("/api/v1/devices/cam-1", headers=fleet.admin).json()
    assert set(info["models"]) == {"detector", "classifier"}
