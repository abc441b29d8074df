"""Canary cohorts: deterministic, monotonic, close to the target shares, late devices covered."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleet_server.rollouts import (
    BundleRef,
    RolloutSpec,
    RolloutState,
    Stage,
    Status,
    Strategy,
    assigned_bundle,
    assignment,
    bucket,
    changed_devices,
    in_stage,
)
from fleet_server.rollouts.cohort import first_stage, stage_members, with_bounds

OLD = BundleRef("b-old", "m", 3)
NEW = BundleRef("b-new", "m", 4)
RB = BundleRef("b-rb", "m", 5)

ids = st.text(min_size=1, max_size=40)
percent_lists = st.lists(st.floats(min_value=0.01, max_value=100), min_size=1, max_size=6).map(
    sorted
)


def spec_with(percents: list[float], rollout_id: str = "r-1", **kw: object) -> RolloutSpec:
    return RolloutSpec(
        rollout_id=rollout_id,
        bundle=NEW,
        previous=OLD,
        selector={"site": "a"},
        stages=tuple(Stage(p) for p in percents),
        gates=(),
        **kw,
    )  # type: ignore[arg-type]


def running(stage: int) -> RolloutState:
    return RolloutState(status=Status.RUNNING, stage=stage, stage_started_at=0.0)


@settings(deadline=None)
@given(rollout_id=ids, device_id=ids)
def test_bucket_is_deterministic_and_in_unit_interval(rollout_id: str, device_id: str) -> None:
    b = bucket(rollout_id, device_id)
    assert 0.0 <= b < 1.0
    assert b == bucket(rollout_id, device_id)


@settings(deadline=None)
@given(percents=percent_lists, device_ids=st.lists(ids, max_size=30), rollout_id=ids)
def test_member_of_a_stage_stays_member_of_every_later_stage(
    percents: list[float], device_ids: list[str], rollout_id: str
) -> None:
    spec = spec_with(percents, rollout_id)
    for d in device_ids:
        member = [in_stage(spec, k, d) for k in range(len(percents))]
        # once in, always in: the membership sequence is 0...0 1...1
        assert member == sorted(member)
        first = first_stage(spec, d)
        assert first == (member.index(True) if True in member else None)


@settings(deadline=None)
@given(percents=percent_lists, device_id=ids)
def test_assignment_never_goes_back_to_old_model_while_advancing(
    percents: list[float], device_id: str
) -> None:
    spec = spec_with(percents)
    got = [assigned_bundle(spec, running(k), device_id) for k in range(len(percents))]
    if NEW.bundle_id in got:
        first = got.index(NEW.bundle_id)
        assert all(b == NEW.bundle_id for b in got[first:])
    assert all(b in (OLD.bundle_id, NEW.bundle_id) for b in got)


@pytest.mark.parametrize("percent", [1, 5, 10, 25, 50, 90])
def test_stage_fraction_is_close_to_target_for_10000_devices(percent: float) -> None:
    spec = spec_with([percent, 100])
    devices = [f"dev-{i:05d}" for i in range(10_000)]
    share = len(stage_members(spec, 0, devices)) / len(devices)
    p = percent / 100
    # 4.5 standard deviations of a binomial share: fails only if hashing is biased
    tolerance = 4.5 * (p * (1 - p) / len(devices)) ** 0.5
    assert abs(share - p) <= tolerance


def test_hundred_percent_stage_holds_every_device() -> None:
    spec = spec_with([100])
    assert all(in_stage(spec, 0, f"d{i}") for i in range(1000))


def test_cohorts_differ_between_rollouts() -> None:
    devices = [f"dev-{i}" for i in range(2000)]
    a = set(stage_members(spec_with([10, 100], "r-a"), 0, devices))
    b = set(stage_members(spec_with([10, 100], "r-b"), 0, devices))
    assert a and b and a != b


def test_device_coming_online_later_gets_the_assignment_of_its_stage() -> None:
    spec = spec_with([10, 50, 100])
    state = running(1)
    # membership is a function of the ids alone: evaluate for a device never seen before
    late = next(f"late-{i}" for i in range(10_000) if 0.1 <= bucket("r-1", f"late-{i}") < 0.5)
    a = assignment(spec, state, late)
    assert a.desired == NEW and a.canary and a.stage == 1


def test_pending_rollout_leaves_everyone_on_previous_bundle() -> None:
    spec = spec_with([50, 100])
    assert all(assigned_bundle(spec, RolloutState(), f"d{i}") == OLD.bundle_id for i in range(200))


def test_succeeded_rollout_gives_everyone_the_candidate() -> None:
    spec = spec_with([1, 10])
    state = RolloutState(status=Status.SUCCEEDED, stage=1, stage_started_at=0.0)
    assert all(assigned_bundle(spec, state, f"d{i}") == NEW.bundle_id for i in range(200))


def test_rolled_back_rollout_gives_everyone_the_rollback_bundle() -> None:
    spec = spec_with([50, 100])
    state = RolloutState(
        status=Status.ROLLED_BACK, stage=1, stage_started_at=0.0, rollback_bundle=RB
    )
    assert {assigned_bundle(spec, state, f"d{i}") for i in range(200)} == {RB.bundle_id}


def test_aborted_rollout_freezes_cohorts_where_they_stand() -> None:
    spec = spec_with([50, 100])
    aborted = RolloutState(status=Status.ABORTED, stage=0, stage_started_at=0.0)
    for i in range(200):
        d = f"d{i}"
        assert assigned_bundle(spec, aborted, d) == assigned_bundle(spec, running(0), d)


def test_shadow_members_run_candidate_as_shadow_and_keep_serving_previous() -> None:
    spec = spec_with([50, 100], strategy=Strategy.SHADOW)
    devices = [f"d{i}" for i in range(200)]
    members = set(stage_members(spec, 0, devices))
    for d in devices:
        a = assignment(spec, running(0), d)
        assert a.desired == OLD
        assert a.shadow == (NEW if d in members else None)


def test_changed_devices_are_exactly_the_new_stage_members() -> None:
    spec = spec_with([10, 50, 100])
    devices = [f"d{i}" for i in range(1000)]
    changed = set(changed_devices(spec, running(0), running(1), devices))
    expected = set(stage_members(spec, 1, devices)) - set(stage_members(spec, 0, devices))
    assert changed == expected and changed


@settings(max_examples=50, deadline=None)
@given(percents=percent_lists)
def test_stage_members_grow_with_stage(percents: list[float]) -> None:
    spec = spec_with(percents)
    devices = [f"d{i}" for i in range(300)]
    sizes = [len(stage_members(spec, k, devices)) for k in range(len(percents))]
    assert sizes == sorted(sizes)


def _advance_through(spec: RolloutSpec, devices: list[str]) -> list[RolloutState]:
    """The running state of each stage, with each stage's bound fixed on entry over
    ``devices`` (what the service does when a rollout starts or advances)."""
    states, state = [], RolloutState()
    for k in range(len(spec.stages)):
        state = with_bounds(spec, replace(running(k), bounds=state.bounds), devices)
        states.append(state)
    return states


@settings(deadline=None)
@given(
    stages=st.lists(
        st.tuples(st.floats(min_value=0.01, max_value=100), st.integers(0, 6)),
        min_size=1,
        max_size=5,
    ).map(sorted),
    n=st.integers(1, 12),
    rollout_id=ids,
)
def test_a_stage_holds_its_minimum_devices_whatever_the_hash_draws(
    stages: list[tuple[float, int]], n: int, rollout_id: str
) -> None:
    spec = RolloutSpec(
        rollout_id=rollout_id,
        bundle=NEW,
        previous=OLD,
        selector={"site": "a"},
        stages=tuple(Stage(p, m) for p, m in stages),
        gates=(),
    )
    devices = [f"d{i}" for i in range(n)]
    before: set[str] = set()
    for k, state in enumerate(_advance_through(spec, devices)):
        members = {d for d in devices if assignment(spec, state, d).canary}
        # the percent draws by hash; a small group may draw fewer than min_devices (or
        # none): the stage takes the lowest-hashed devices up to its minimum
        assert len(members) >= min(stages[k][1], n)
        assert len(members) >= sum(1 for d in devices if bucket(rollout_id, d) < stages[k][0] / 100)
        assert before <= members  # monotonic: nobody goes back to the old model
        before = members


def test_a_25_percent_stage_of_4_devices_has_a_canary_for_every_rollout_id() -> None:
    devices = [f"cam-{i}" for i in range(4)]
    empty = 0
    for i in range(200):
        spec = replace(spec_with([25, 100], f"r-{i}"), stages=(Stage(25, 1), Stage(100, 1)))
        empty += all(bucket(spec.rollout_id, d) >= 0.25 for d in devices)
        (state, _) = _advance_through(spec, devices)
        members = [d for d in devices if assignment(spec, state, d).canary]
        assert members, spec.rollout_id
        if all(bucket(spec.rollout_id, d) >= 0.25 for d in devices):
            # the one device taken is the lowest-hashed: the same one for every replica
            assert members == [min(devices, key=lambda d: bucket(spec.rollout_id, d))]
    assert empty > 40  # about 0.75 ** 4 of the ids draw nobody by percent alone


def test_a_large_group_keeps_the_percent_as_its_bound() -> None:
    spec = replace(spec_with([10, 100]), stages=(Stage(10, 5), Stage(100, 1)))
    devices = [f"dev-{i:05d}" for i in range(10_000)]
    (state, _) = _advance_through(spec, devices)
    assert state.bounds[0] == 0.1  # the hash drew far more than 5: nothing raised


def test_a_device_enrolled_after_the_bound_was_fixed_joins_by_its_bucket() -> None:
    spec = replace(spec_with([25, 100], "r-late"), stages=(Stage(25, 3), Stage(100, 1)))
    devices = [f"cam-{i}" for i in range(4)]
    (state, _) = _advance_through(spec, devices)
    bound = state.bounds[0]
    late = [f"late-{i}" for i in range(400)]
    inside = [d for d in late if bucket(spec.rollout_id, d) < bound]
    assert inside and len(inside) < len(late)
    assert all(assignment(spec, state, d).canary == (d in inside) for d in late)
    # stored with the state: a reload (another replica) draws the same cohort
    again = RolloutState.from_json(state.to_json())
    assert again == state
