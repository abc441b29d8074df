"""Rollouts through the admin API: creation, cohorts, operator actions, rollback
re-publishing, the scheduler's automatic decisions, and the audit trail."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from fleet_server.db.models import AuditEntry
from fleet_server.rollouts import bucket

if TYPE_CHECKING:
    from tests.server_fixtures import Fleet


DEVICES = [f"cam-{i:02d}" for i in range(12)]


def _setup(
    fleet: Fleet, **rollout: Any
) -> tuple[dict[str, Any], dict[str, dict[str, str]], dict[str, Any], dict[str, Any]]:
    creds = {d: fleet.enroll(d, labels={"site": "north"}) for d in DEVICES}
    fleet.enroll("other-1", labels={"site": "south"})
    v2 = fleet.upload_bundle(version=2, seed=1)
    v3 = fleet.upload_bundle(version=3, seed=2)
    g = fleet.client.post(
        "/api/v1/groups", headers=fleet.admin, json={"name": "north", "selector": {"site": "north"}}
    )
    assert g.status_code == 201, g.text
    for d in DEVICES:
        fleet.assign(d, v2["id"])
    body = {
        "name": "v3 to north",
        "bundle_id": v3["id"],
        "group": "north",
        "stages": [
            {"percent": 50, "min_devices": 1, "soak_seconds": 0},
            {"percent": 100, "min_devices": 1, "soak_seconds": 0},
        ],
        "gates": [{"kind": "install_failure_rate", "threshold": 0.2, "min_samples": 1}],
        **rollout,
    }
    r = fleet.client.post("/api/v1/rollouts", headers=fleet.admin, json=body)
    assert r.status_code == 201, r.text
    return r.json(), creds, v2, v3


def _desired(fleet: Fleet, creds: dict[str, str]) -> Any:
    return fleet.client.get("/device/v1/assignment", headers=creds).json()["desired"]


def test_rollout_starts_with_deterministic_canary_cohort(fleet: Fleet) -> None:
    rollout, creds, v2, v3 = _setup(fleet, start=True)
    assert rollout["status"] == "running" and rollout["stage"] == 0
    assert rollout["spec"]["previous"]["bundle_id"] == v2["id"]
    for d in DEVICES:
        expected = v3 if bucket(rollout["id"], d) < 0.5 else v2
        assert _desired(fleet, creds[d])["bundle_id"] == expected["id"], d
    canary = sum(1 for d in DEVICES if bucket(rollout["id"], d) < 0.5)
    assert rollout["canary_devices"] == canary
    assert rollout["control_devices"] == len(DEVICES) - canary


def test_pause_resume_promote_abort_are_audited(fleet: Fleet) -> None:
    rollout, creds, v2, v3 = _setup(fleet, start=True)
    url = f"/api/v1/rollouts/{rollout['id']}"
    assert (
        fleet.client.post(f"{url}/pause", headers=fleet.admin, json={"reason": "look"}).json()[
            "status"
        ]
        == "paused"
    )
    again = fleet.client.post(f"{url}/pause", headers=fleet.admin, json={})
    assert again.status_code == 409 and again.json()["error"]["code"] == "invalid_transition"
    assert (
        fleet.client.post(f"{url}/resume", headers=fleet.admin, json={}).json()["status"]
        == "running"
    )
    promoted = fleet.client.post(f"{url}/promote", headers=fleet.admin, json={}).json()
    assert promoted["stage"] == 1
    assert all(_desired(fleet, creds[d])["bundle_id"] == v3["id"] for d in DEVICES)
    aborted = fleet.client.post(f"{url}/abort", headers=fleet.admin, json={})
    assert aborted.json()["status"] == "aborted"
    with fleet.ctx.session() as s:
        entries = s.scalars(
            select(AuditEntry).where(AuditEntry.target_id == rollout["id"]).order_by(AuditEntry.id)
        )
        actions = [a.action for a in entries]
    assert actions == [
        "rollout.create",
        "rollout.start",
        "rollout.pause",
        "rollout.resume",
        "rollout.promote",
        "rollout.abort",
    ]


def test_operator_rollback_republishes_previous_model_above_candidate(fleet: Fleet) -> None:
    rollout, creds, v2, v3 = _setup(fleet, start=True)
    r = fleet.client.post(
        f"/api/v1/rollouts/{rollout['id']}/rollback", headers=fleet.admin, json={"reason": "bad"}
    )
    assert r.status_code == 200, r.text
    state = r.json()["state"]
    assert r.json()["status"] == "rolled_back"
    rb = state["rollback_bundle"]
    assert rb["name"] == "tiny" and rb["version"] == 4  # above candidate v3
    for d in DEVICES:
        desired = _desired(fleet, creds[d])
        assert desired["bundle_id"] == rb["bundle_id"] and desired["version"] == 4
    bundle = fleet.client.get(f"/api/v1/bundles/{rb['bundle_id']}", headers=fleet.admin).json()
    assert bundle["source"] == "rollback"
    assert bundle["manifest"]["files"] == v2_manifest_files(fleet, v2["id"])


def v2_manifest_files(fleet: Fleet, bundle_id: str) -> Any:
    return fleet.client.get(f"/api/v1/bundles/{bundle_id}", headers=fleet.admin).json()["manifest"][
        "files"
    ]


def test_scheduler_advances_healthy_rollout_and_audits_numbers(fleet: Fleet) -> None:
    rollout, creds, v2, v3 = _setup(fleet, start=True)
    canary = [d for d in DEVICES if bucket(rollout["id"], d) < 0.5]
    for d in canary:
        fleet.client.post(
            "/device/v1/reports",
            headers=creds[d],
            json={
                "reports": [
                    {"type": "install", "outcome": "installed", "name": "tiny", "version": 3}
                ]
            },
        )
    decisions = fleet.scheduler.tick()
    assert [d.action.value for d in decisions] == ["advance"]
    r = fleet.client.get(f"/api/v1/rollouts/{rollout['id']}", headers=fleet.admin).json()
    assert r["stage"] == 1
    assert all(_desired(fleet, creds[d])["bundle_id"] == v3["id"] for d in DEVICES)
    with fleet.ctx.session() as s:
        entry = s.scalars(select(AuditEntry).where(AuditEntry.action == "rollout.advance")).one()
    assert entry.actor == "system:rollout-engine"
    gate = entry.details["gates"][0]
    assert entry.details["metrics"]["canary"]["installs"] == len(canary)
    assert gate["name"] == "install_failure_rate"


def test_scheduler_rolls_back_when_installs_fail(fleet: Fleet) -> None:
    rollout, creds, v2, v3 = _setup(fleet, start=True)
    canary = [d for d in DEVICES if bucket(rollout["id"], d) < 0.5]
    for d in canary:
        fleet.client.post(
            "/device/v1/reports",
            headers=creds[d],
            json={
                "reports": [
                    {
                        "type": "install",
                        "outcome": "failed",
                        "name": "tiny",
                        "version": 3,
                        "error_code": "smoke_test_failed",
                    }
                ]
            },
        )
    decisions = fleet.scheduler.tick()
    assert [d.action.value for d in decisions] == ["rollback"]
    r = fleet.client.get(f"/api/v1/rollouts/{rollout['id']}", headers=fleet.admin).json()
    assert r["status"] == "rolled_back"
    rb = r["state"]["rollback_bundle"]
    assert all(_desired(fleet, creds[d])["bundle_id"] == rb["bundle_id"] for d in DEVICES)


def test_device_enrolling_later_gets_its_rollout_assignment(fleet: Fleet) -> None:
    rollout, creds, v2, v3 = _setup(
        fleet, start=True, stages=[{"percent": 100, "min_devices": 1, "soak_seconds": 0}]
    )
    late = fleet.enroll("cam-late", labels={"site": "north"})
    assert _desired(fleet, late)["bundle_id"] == v3["id"]
    other = fleet.enroll("cam-south", labels={"site": "south"})
    assert _desired(fleet, other) is None


def test_invalid_stages_are_refused_with_a_stable_code(fleet: Fleet) -> None:
    fleet.enroll("cam-1", labels={"site": "north"})
    v3 = fleet.upload_bundle(version=3)
    fleet.client.post(
        "/api/v1/groups", headers=fleet.admin, json={"name": "north", "selector": {"site": "north"}}
    )
    r = fleet.client.post(
        "/api/v1/rollouts",
        headers=fleet.admin,
        json={
            "name": "x",
            "bundle_id": v3["id"],
            "group": "north",
            "stages": [{"percent": 50}, {"percent": 10}],
        },
    )
    assert r.status_code == 422
    assert r.json()["error"]["code"] == "invalid_rollout_spec"


def _summaries(fleet: Fleet, devices: list[str], version: int, count: int, errors: int) -> None:
    """Window summaries as devices publish them, written by the ingestion writer."""
    import json
    import time

    from device_agent.protocol import telemetry_topic
    from fleet_server.ingest import TelemetryWriter, parse_message

    hist = [0] * 19
    hist[9] = count - errors  # the histogram holds the successful inferences
    msgs = []
    for i, d in enumerate(devices):
        body = {
            "window_start": 0,
            "window_end": 60,
            "name": "tiny",
            "version": version,
            "slot": "a",
            "rollout_id": None,
            "count": count,
            "errors": errors,
            "latency_ms": {"p50": 6, "p95": 9, "p99": 9.5, "mean": 6},
            "latency_hist": hist,
            "drift": None,
            "shadow": None,
            "dropped": {"samples": 0, "summaries": 0},
        }
        payload = {
            "device_id": d,
            "records": [
                {
                    "seq": 1000 + version * 100 + i,
                    "kind": "summary",
                    "ts": time.time(),
                    "body": body,
                }
            ],
        }
        msgs.append(
            parse_message(telemetry_topic(d, "summary"), json.dumps(payload).encode(), time.time())
        )
    TelemetryWriter(fleet.ctx.engine).write(msgs)


def test_scheduler_rolls_back_when_canary_errors_exceed_control(fleet: Fleet) -> None:
    rollout, creds, v2, v3 = _setup(
        fleet, start=True, gates=[{"kind": "error_rate", "threshold": 0.01, "min_samples": 500}]
    )
    canary = [d for d in DEVICES if bucket(rollout["id"], d) < 0.5]
    control = [d for d in DEVICES if d not in canary]
    _summaries(fleet, canary, 3, count=1000, errors=200)
    _summaries(fleet, control, 2, count=1000, errors=2)
    decisions = fleet.scheduler.tick()
    assert [d.action.value for d in decisions] == ["rollback"]
    gate = decisions[0].gates[0]
    assert gate.name == "error_rate"
    with fleet.ctx.session() as s:
        entry = s.scalars(select(AuditEntry).where(AuditEntry.action == "rollout.rollback")).one()
    numbers = entry.details["metrics"]
    assert numbers["canary"]["errors"] == 200 * len(canary)
    assert numbers["control"]["inferences"] == 1000 * len(control)


def test_shadow_rollout_assigns_candidate_as_shadow(fleet: Fleet) -> None:
    rollout, creds, v2, v3 = _setup(
        fleet,
        start=True,
        strategy="shadow",
        stages=[{"percent": 100, "min_devices": 1, "soak_seconds": 0}],
    )
    doc = fleet.client.get("/device/v1/assignment", headers=creds[DEVICES[0]]).json()
    assert doc["desired"]["bundle_id"] == v2["id"]
    assert doc["shadow"]["bundle_id"] == v3["id"]
    assert doc["rollout_id"] == rollout["id"]
    shadow_url = doc["shadow"]["url"]
    assert fleet.client.get(shadow_url, headers=creds[DEVICES[0]]).status_code == 200


def test_lists_are_paginated(fleet: Fleet) -> None:
    for i in range(5):
        fleet.enroll(f"cam-{i}")
    first = fleet.client.get("/api/v1/devices", headers=fleet.admin, params={"limit": 2}).json()
    assert [d["id"] for d in first["items"]] == ["cam-0", "cam-1"]
    assert first["total"] == 5 and first["next_offset"] == 2
    last = fleet.client.get(
        "/api/v1/devices", headers=fleet.admin, params={"limit": 2, "offset": 4}
    ).json()
    assert [d["id"] for d in last["items"]] == ["cam-4"] and last["next_offset"] is None
    bad = fleet.client.get("/api/v1/devices", headers=fleet.admin, params={"limit": 0})
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "validation_error"


def test_rollbacks_of_two_rollouts_each_return_their_own_previous_model(fleet: Fleet) -> None:
    """One model rolled out per device class (one group each): rolling both back must give
    each group its own previous model, not the first re-publication made."""
    north = {d: fleet.enroll(d, labels={"site": "north"}) for d in ("n-1", "n-2")}
    south = {d: fleet.enroll(d, labels={"site": "south"}) for d in ("s-1", "s-2")}
    prev = {"north": fleet.upload_bundle(version=2, seed=1), "south": fleet.upload_bundle(2, 5)}
    cand = {"north": fleet.upload_bundle(version=3, seed=2), "south": fleet.upload_bundle(3, 6)}
    rollback: dict[str, dict[str, Any]] = {}
    for site, creds in (("north", north), ("south", south)):
        g = fleet.client.post(
            "/api/v1/groups", headers=fleet.admin, json={"name": site, "selector": {"site": site}}
        )
        assert g.status_code == 201, g.text
        for d in creds:
            fleet.assign(d, prev[site]["id"])
        body = {
            "name": f"v3 to {site}",
            "bundle_id": cand[site]["id"],
            "previous_bundle_id": prev[site]["id"],
            "group": site,
            "stages": [{"percent": 100, "min_devices": 1, "soak_seconds": 0}],
            "start": True,
        }
        r = fleet.client.post("/api/v1/rollouts", headers=fleet.admin, json=body)
        assert r.status_code == 201, r.text
        r = fleet.client.post(
            f"/api/v1/rollouts/{r.json()['id']}/rollback", headers=fleet.admin, json={}
        )
        assert r.status_code == 200, r.text
        rollback[site] = r.json()["state"]["rollback_bundle"]
    assert rollback["north"]["bundle_id"] != rollback["south"]["bundle_id"]
    for site, creds in (("north", north), ("south", south)):
        got = fleet.client.get(
            f"/api/v1/bundles/{rollback[site]['bundle_id']}", headers=fleet.admin
        ).json()
        assert got["manifest"]["files"] == v2_manifest_files(fleet, prev[site]["id"])
        for c in creds.values():
            assert _desired(fleet, c)["bundle_id"] == rollback[site]["bundle_id"]
