"""The live picture of a rollout (``GET /rollouts/{id}/status`` and ``rollout status``),
the default ``--previous`` (what the group's devices run), the refusal of a candidate
older than that, and a shadow candidate shown apart from the active model."""

from __future__ import annotations

from typing import Any

from fleet_server.cli.rollout_view import people_stages, render_status
from tests.server_fixtures import Fleet

STAGES = [
    {"percent": 50, "min_devices": 1, "soak_seconds": 600},
    {"percent": 100, "min_devices": 1, "soak_seconds": 0},
]


def _report(f: Fleet, device: str, **body: Any) -> None:
    r = f.client.post(
        "/device/v1/reports",
        headers=f.enroll_headers[device],
        json={"reports": [{"type": "install", "ts": 1.0, **body}]},
    )
    assert r.status_code == 200, r.text


def _group_running(f: Fleet, bundle: dict[str, Any], n: int = 4) -> list[str]:
    ids = [f"cam-{i}" for i in range(n)]
    for d in ids:
        f.enroll(d, labels={"group": "cams"})
        _report(f, d, outcome="installed", name=bundle["name"], version=bundle["version"])
    r = f.client.post(
        "/api/v1/groups", headers=f.admin, json={"name": "cams", "selector": {"group": "cams"}}
    )
    assert r.status_code == 201, r.text
    return ids


def _create(f: Fleet, bundle: dict[str, Any], **extra: Any) -> Any:
    body = {"name": "x", "bundle_id": bundle["id"], "group": "cams", "stages": STAGES, **extra}
    return f.client.post("/api/v1/rollouts", headers=f.admin, json=body)


def test_previous_defaults_to_what_the_group_runs_not_the_newest_lower(fleet: Fleet) -> None:
    f = fleet
    v2, v3, v4 = (f.upload_bundle(version=v, seed=v) for v in (2, 3, 4))
    _group_running(f, v2)  # v3 exists but no device runs it
    r = _create(f, v4)
    assert r.status_code == 201, r.text
    assert r.json()["spec"]["previous"]["bundle_id"] == v2["id"]
    assert r.json()["spec"]["previous"]["bundle_id"] != v3["id"]


def test_a_candidate_older_than_what_the_group_runs_is_refused_unless_forced(
    fleet: Fleet,
) -> None:
    f = fleet
    v2, v5 = f.upload_bundle(version=2, seed=2), f.upload_bundle(version=5, seed=5)
    _group_running(f, v5)
    refused = _create(f, v2)
    assert refused.status_code == 409, refused.text
    err = refused.json()["error"]
    assert err["code"] == "older_candidate"
    assert "v2 is older than v5, which 4 of group cams's devices run" in err["message"]
    assert "--force" in err["message"]
    forced = _create(f, v2, force=True)
    assert forced.status_code == 201, forced.text


def test_live_status_counts_refusals_by_code_and_devices_by_state(fleet: Fleet) -> None:
    f = fleet
    v2, v3 = f.upload_bundle(version=2, seed=2), f.upload_bundle(version=3, seed=3)
    ids = _group_running(f, v2)
    # cohorts hash the (random) rollout id: a 50% stage of 4 devices selects none 1 time
    # in 16 (an empty cohort, which holds the rollout); start again until it selects some
    for _attempt in range(20):
        created = _create(
            f,
            v3,
            start=True,
            gates=[{"kind": "install_failure_rate", "threshold": 0.9, "min_samples": 3}],
        )
        assert created.status_code == 201, created.text
        rid = created.json()["id"]
        assert created.json()["stage_number"] == 1 and created.json()["stages_total"] == 2
        canaries = [
            d
            for d in ids
            if f.client.get(f"/api/v1/devices/{d}", headers=f.admin).json()["assignment"][
                "desired"
            ]["version"]
            == 3
        ]
        if canaries:
            break
        r = f.client.post(f"/api/v1/rollouts/{rid}/abort", headers=f.admin, json={"reason": "x"})
        assert r.status_code == 200, r.text
    assert canaries, "twenty 50% stages of 4 devices each selected no canary"
    _report(
        f,
        canaries[0],
        outcome="refused",
        name="tiny",
        version=3,
        error_code="expired",
        message="bundle expired at 2020-01-01T00:00:00Z",
        rollout_id=rid,
    )
    status = f.client.get(f"/api/v1/rollouts/{rid}/status", headers=f.admin)
    assert status.status_code == 200, status.text
    s = status.json()
    assert s["stage_number"] == 1 and s["stages_total"] == 2
    assert s["refusals"] == [
        {
            "code": "expired",
            "outcome": "refused",
            "count": 1,
            "devices": [canaries[0]],
            "message": "bundle expired at 2020-01-01T00:00:00Z",
        }
    ]
    by_state = s["devices"]["by_state"]
    assert by_state["refused or failed"] == 1
    assert by_state.get("updating", 0) == len(canaries) - 1
    assert by_state["on previous"] == 4 - len(canaries)
    (gate,) = s["evaluation"]["gates"]
    assert gate["kind"] == "install_failure_rate" and gate["threshold"] == 0.9
    assert s["holding"].startswith("waiting: soaking")
    assert s["actions"] == ["pause", "promote", "abort", "rollback"]

    text = "\n".join(render_status(s))
    assert "stage 1 of 2" in text and "[50%] -> 100%" in text
    assert "soak       " in text and "of 10.0 min" in text
    assert "install_failure_rate  WAIT" in text and "vs threshold 0.9" in text
    assert "(1 of 3 installs" in text
    assert f"expired                1 device(s): {canaries[0]}" in text
    assert "bundle expired at 2020-01-01T00:00:00Z" in text
    assert f"edgefleet rollout pause|promote|abort|rollback {rid}" in text
    assert " UTC  operator:bootstrap-admin" in text  # readable times in the history
    assert "stage 1" in text and "stage 0" not in text


def test_a_shadow_candidate_is_shown_apart_from_the_active_model(fleet: Fleet) -> None:
    f = fleet
    v2, v3 = f.upload_bundle(version=2, seed=2), f.upload_bundle(version=3, seed=3)
    ids = _group_running(f, v2, n=2)
    r = _create(f, v3, strategy="shadow", start=True, stages=[{"percent": 100, "soak_seconds": 60}])
    assert r.status_code == 201, r.text
    _report(f, ids[0], outcome="installed", name="tiny", version=3, shadow=True)
    d = f.client.get(f"/api/v1/devices/{ids[0]}", headers=f.admin).json()
    assert (d["current_name"], d["current_version"]) == ("tiny", 2)
    assert (d["shadow_name"], d["shadow_version"]) == ("tiny", 3)
    listed = f.client.get("/api/v1/devices", headers=f.admin).json()["items"]
    assert {(x["current_version"], x["shadow_version"]) for x in listed} == {(2, 3)}


def test_engine_reasons_are_shown_with_stages_counted_from_one() -> None:
    assert people_stages("all gates passed; stage 0 -> 1") == "all gates passed; stage 1 -> 2"
    assert people_stages("no traffic since stage 0 started") == "no traffic since stage 1 started"
