"""What holds a rollout is named with what to do: an empty cohort, a canary with no traffic.

The pure engine first (figures built by hand), then through the admin API on a
live server: a group of 4 devices whose 25 % stage selects none of them, and a
canary that installed the candidate but sends no predictions.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from fleet_server.rollouts import (
    Action,
    CohortMetrics,
    CohortStats,
    GateKind,
    GateSpec,
    RolloutSpec,
    RolloutState,
    Stage,
    bucket,
    decide,
    start,
)
from tests.fleet_server.rollouts.test_engine import NEW, OLD, T0
from tests.fleet_server.rollouts.test_gates import cohort

if TYPE_CHECKING:
    from tests.server_fixtures import Fleet

GATES = (GateSpec(GateKind.ERROR_RATE, 0.01, min_samples=500),)


def spec(percent: float = 25.0) -> RolloutSpec:
    return RolloutSpec(
        "r-hold",
        NEW,
        OLD,
        {"site": "a"},
        stages=(Stage(percent, 1, 60), Stage(100, 1, 60)),
        gates=GATES,
    )


def running(s: RolloutSpec) -> RolloutState:
    return start(s, RolloutState(), T0, "op")


def test_an_empty_cohort_is_named_with_its_size_and_the_fix() -> None:
    s = spec(25)
    m = CohortMetrics(CohortStats(members=0), CohortStats(members=4))
    d = decide(s, running(s), m, T0 + 1)
    assert d.action is Action.HOLD
    assert d.reason.startswith("empty cohort: stage 0 takes 25% of the group's 4 devices")
    assert "raise the stage's percent" in d.reason
    assert d.metrics.canary.members == 0  # the figure behind it travels with the decision


def test_figures_without_member_counts_keep_the_old_reasons() -> None:
    s = spec(25)
    m = CohortMetrics(CohortStats(), CohortStats())  # members unknown (older figures)
    d = decide(s, running(s), m, T0 + 61)
    assert d.action is Action.HOLD and d.reason.startswith("waiting for devices")


def test_canaries_that_installed_but_send_no_predictions_are_named_as_no_traffic() -> None:
    s = spec(50)
    idle = CohortStats(
        devices=2, installs=2, members=2, silent_count=2, silent=("cam-01", "cam-03")
    )
    d = decide(s, running(s), CohortMetrics(idle, cohort(seed=2)), T0 + 120)
    assert d.action is Action.HOLD
    assert d.reason.startswith("no traffic: none of the 2 canary devices (cam-01, cam-03)")
    assert "/v2/models/m/infer" in d.reason and "ServingClient" in d.reason
    assert "gates waiting: error_rate" in d.reason


def test_canaries_still_installing_are_not_called_idle() -> None:
    s = spec(50)
    installing = CohortStats(
        devices=1, installs=1, members=2, silent_count=2, silent=("cam-01", "cam-03")
    )
    d = decide(s, running(s), CohortMetrics(installing, cohort(seed=2)), T0 + 120)
    assert d.reason.startswith("waiting for samples: error_rate")
    assert "no predictions yet from cam-01, cam-03" in d.reason


def test_a_partly_silent_canary_cohort_names_the_silent_devices() -> None:
    s = spec(50)
    some = replace(
        cohort(n=100, devices=3, installs=3, seed=1), members=3, silent_count=25, silent=("cam-07",)
    )
    d = decide(s, running(s), CohortMetrics(some, cohort(seed=2)), T0 + 120)
    assert d.reason.startswith("waiting for samples: error_rate")
    assert d.reason.endswith("no predictions yet from cam-07 and 24 more")


# -- through the admin API on a live server ---------------------------------------------------

DEVICES = [f"cam-{i}" for i in range(4)]


def _group_and_bundles(fleet: Fleet) -> tuple[dict[str, Any], dict[str, Any]]:
    creds = {d: fleet.enroll(d, labels={"site": "east"}) for d in DEVICES}
    v2 = fleet.upload_bundle(version=2, seed=1)
    v3 = fleet.upload_bundle(version=3, seed=2)
    g = fleet.client.post(
        "/api/v1/groups", headers=fleet.admin, json={"name": "east", "selector": {"site": "east"}}
    )
    assert g.status_code == 201, g.text
    for d in DEVICES:
        fleet.assign(d, v2["id"])
    return creds, v3


def _rollout(
    fleet: Fleet, v3: dict[str, Any], name: str, percent: float, min_devices: int = 1
) -> dict[str, Any]:
    body = {
        "name": name,
        "bundle_id": v3["id"],
        "group": "east",
        "start": False,
        "stages": [
            {"percent": percent, "min_devices": min_devices, "soak_seconds": 0},
            {"percent": 100, "min_devices": 1, "soak_seconds": 0},
        ],
        "gates": [{"kind": "error_rate", "threshold": 0.05, "min_samples": 50}],
    }
    r = fleet.client.post("/api/v1/rollouts", headers=fleet.admin, json=body)
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


def _evaluate(fleet: Fleet, rollout_id: str) -> dict[str, Any]:
    r = fleet.client.get(f"/api/v1/rollouts/{rollout_id}/evaluation", headers=fleet.admin)
    assert r.status_code == 200, r.text
    return r.json()["decision"]  # type: ignore[no-any-return]


def _start(fleet: Fleet, rollout_id: str) -> None:
    r = fleet.client.post(
        f"/api/v1/rollouts/{rollout_id}/start", headers=fleet.admin, json={"reason": "test"}
    )
    assert r.status_code == 200, r.text


def _empty_by_hash(fleet: Fleet, v3: dict[str, Any], min_devices: int) -> dict[str, Any]:
    """A pending rollout whose 25 % stage draws none of the 4 devices by hash."""
    # a rollout id salts the cohort hash; 25 % of 4 devices draws none for about one id
    # in three (0.75 ** 4): create pending rollouts until one does
    for i in range(40):
        r = _rollout(fleet, v3, f"try {i}", 25, min_devices)
        if all(bucket(r["id"], d) >= 0.25 for d in DEVICES):
            return r
        fleet.client.post(
            f"/api/v1/rollouts/{r['id']}/abort", headers=fleet.admin, json={"reason": "not empty"}
        )
    raise AssertionError("no rollout id gave an empty 25% cohort in 40 tries")


def test_a_stage_whose_hash_draws_nobody_still_takes_its_minimum_canary(fleet: Fleet) -> None:
    creds, v3 = _group_and_bundles(fleet)
    r = _empty_by_hash(fleet, v3, min_devices=1)
    _start(fleet, r["id"])
    d = _evaluate(fleet, r["id"])
    assert d["metrics"]["canary"]["members"] == 1 and d["metrics"]["control"]["members"] == 3
    assert not d["reason"].startswith("empty cohort"), d["reason"]
    # the lowest-hashed device runs the candidate; the other three keep v2
    first = min(DEVICES, key=lambda dev: bucket(r["id"], dev))
    for dev in DEVICES:
        doc = fleet.client.get("/device/v1/assignment", headers=creds[dev]).json()
        assert (doc["desired"]["bundle_id"] == v3["id"]) == (dev == first), (dev, doc)


def test_api_names_an_empty_25_percent_cohort_of_4_devices(fleet: Fleet) -> None:
    _, v3 = _group_and_bundles(fleet)
    # min_devices 0: the operator asked for no minimum, so the hash alone draws the cohort
    r = _empty_by_hash(fleet, v3, min_devices=0)
    _start(fleet, r["id"])
    d = _evaluate(fleet, r["id"])
    assert d["action"] == "hold"
    # stages counted from 1 in every text people read, the API's reasons included
    assert d["reason"].startswith("empty cohort: stage 1 takes 25% of the group's 4 devices")
    assert d["metrics"]["canary"]["members"] == 0 and d["metrics"]["control"]["members"] == 4


def test_api_names_canaries_that_installed_but_send_no_predictions(fleet: Fleet) -> None:
    creds, v3 = _group_and_bundles(fleet)
    r = _rollout(fleet, v3, "all canaries", 100)
    _start(fleet, r["id"])
    for d in DEVICES:
        report = {"type": "install", "outcome": "installed", "name": "tiny", "version": 3}
        resp = fleet.client.post("/device/v1/reports", headers=creds[d], json={"reports": [report]})
        assert resp.status_code < 300, resp.text
    d = _evaluate(fleet, r["id"])
    assert d["action"] == "hold"
    assert d["reason"].startswith("no traffic: none of the 4 canary devices")
    assert all(dev in d["reason"] for dev in DEVICES)
    assert d["metrics"]["canary"]["silent_count"] == 4
