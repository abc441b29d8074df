"""``rollout status`` names what holds a rollout, with what to do: an empty cohort, a
cohort smaller than its stage needs, canaries with no traffic (also at a later stage,
whose canaries installed the candidate in an earlier one)."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from fleet_server.cli.rollout_view import render_status
from fleet_server.rollouts import (
    Action,
    CohortMetrics,
    CohortStats,
    RolloutState,
    Stage,
    bucket,
    decide,
    promote,
    start,
)
from tests.fleet_server.rollouts.test_engine import T0
from tests.fleet_server.rollouts.test_gates import cohort
from tests.fleet_server.rollouts.test_hold_causes import (
    DEVICES,
    _empty_by_hash,
    _group_and_bundles,
    _rollout,
    _start,
    spec,
)

if TYPE_CHECKING:
    from tests.server_fixtures import Fleet


def test_a_cohort_smaller_than_the_stage_needs_is_named_with_the_fix() -> None:
    s = replace(spec(25), stages=(Stage(25, 2, 60), Stage(100, 1, 60)))
    one = replace(cohort(n=1000, devices=1, installs=1, seed=1), members=1)
    d = decide(s, start(s, RolloutState(), T0, "op"), CohortMetrics(one, cohort()), T0 + 61)
    assert d.action is Action.HOLD
    assert d.reason.startswith(
        "cohort too small: stage 0 takes 25% of the group's 1 devices, which selects 1, "
        "but the stage needs 2"
    ), d.reason
    assert "lower the stage's min_devices or add devices to the group" in d.reason
    assert "raise" not in d.reason  # a higher percent takes no more: the group is all there is


def test_idle_canaries_that_installed_in_an_earlier_stage_are_named_as_no_traffic() -> None:
    s = spec(50)
    state = promote(s, start(s, RolloutState(), T0, "op"), T0 + 100, "op")  # now stage 1
    # 4 members; 2 installed in stage 0 (no install reported in this stage), 2 now
    idle = CohortStats(
        devices=2, installs=2, members=4, running=4, silent_count=4, silent=tuple(DEVICES)
    )
    d = decide(s, state, CohortMetrics(idle, CohortStats(members=0)), T0 + 200)
    assert d.action is Action.HOLD
    assert d.reason.startswith("no traffic: none of the 4 canary devices"), d.reason
    still = replace(idle, running=3)  # one member has not installed yet: that is the wait
    d = decide(s, state, CohortMetrics(still, CohortStats(members=0)), T0 + 200)
    assert not d.reason.startswith("no traffic"), d.reason


def _status(fleet: Fleet, rollout_id: str) -> tuple[dict[str, Any], str]:
    r = fleet.client.get(f"/api/v1/rollouts/{rollout_id}/status", headers=fleet.admin)
    assert r.status_code == 200, r.text
    data = r.json()
    return data, "\n".join(render_status(data))


def test_rollout_status_names_an_empty_25_percent_cohort_of_4_devices(fleet: Fleet) -> None:
    _, v3 = _group_and_bundles(fleet)
    r = _empty_by_hash(fleet, v3, min_devices=0)  # no minimum: the hash alone draws none
    _start(fleet, r["id"])
    data, text = _status(fleet, r["id"])
    assert data["holding"].startswith("waiting: empty cohort: stage 0 takes 25% of the group's 4")
    holding = next(line for line in text.splitlines() if line.startswith("  holding"))
    assert "empty cohort: stage 1 takes 25% of the group's 4 devices" in holding  # people's 1
    assert "raise the stage's percent" in holding and "promote or abort" in holding


def _report_installed(fleet: Fleet, creds: dict[str, Any], devices: list[str]) -> None:
    for d in devices:
        report = {"type": "install", "outcome": "installed", "name": "tiny", "version": 3}
        resp = fleet.client.post("/device/v1/reports", headers=creds[d], json={"reports": [report]})
        assert resp.status_code < 300, resp.text


def test_rollout_status_names_idle_canaries_at_the_second_stage(fleet: Fleet) -> None:
    creds, v3 = _group_and_bundles(fleet)
    for i in range(40):  # a first stage that selects some devices but not all
        r = _rollout(fleet, v3, f"try {i}", 50)
        first = [d for d in DEVICES if bucket(r["id"], d) < 0.5]
        if 0 < len(first) < len(DEVICES):
            break
        fleet.client.post(
            f"/api/v1/rollouts/{r['id']}/abort", headers=fleet.admin, json={"reason": "retry"}
        )
    else:
        raise AssertionError("no rollout id split 4 devices at 50% in 40 tries")
    rid = r["id"]
    _start(fleet, rid)
    _report_installed(fleet, creds, first)
    resp = fleet.client.post(
        f"/api/v1/rollouts/{rid}/promote", headers=fleet.admin, json={"reason": "test"}
    )
    assert resp.status_code == 200, resp.text
    # the second stage (100%): only the devices new to the cohort report an install now
    _report_installed(fleet, creds, [d for d in DEVICES if d not in first])
    data, text = _status(fleet, rid)
    assert data["stage_number"] == 2
    assert data["holding"].startswith("waiting: no traffic: none of the 4 canary devices")
    assert "/v2/models/tiny/infer" in data["holding"]
    holding = next(line for line in text.splitlines() if line.startswith("  holding"))
    assert "since stage 2 started" in holding and "promote or abort" in holding
