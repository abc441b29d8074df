"""Who runs what: deterministic, monotonic canary cohorts and the resulting assignment.

Invariants:

* **Deterministic.** A device's bucket is ``sha256(rollout_id NUL device_id)``'s
  first 8 bytes read as an integer and divided by 2**64, a number in [0, 1). It
  depends on nothing but the two ids, so every server replica computes the same
  cohorts and a device that comes online late gets the assignment it would have
  had all along.
* **At least the stage's minimum.** A device is in stage k iff ``bucket < bound_k``.
  The bound is ``percent_k / 100``, raised when the stage begins if that draws fewer
  than the stage's ``min_devices`` of the group (a 25 % stage of 4 devices draws none
  for about one rollout id in three): then it takes the lowest-hashed devices up to
  the minimum. The bound is fixed in the rollout's state (``RolloutState.bounds``),
  so every replica and every later evaluation draws the same cohort, and a device
  enrolled later joins by its bucket as it would by the percent.
* **Monotonic.** Bounds never decrease from stage to stage (the spec requires
  non-decreasing percents; a raised bound is carried forward), so a member of stage
  k is a member of every later stage and never flips back to the old model while
  the rollout advances.
* **Independent across rollouts.** The rollout id salts the hash, so the same
  unlucky devices are not always the first canaries.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from fleet_server.rollouts.spec import BundleRef, RolloutSpec, RolloutState, Status, Strategy

_SCALE = float(2**64)


def bucket(rollout_id: str, device_id: str) -> float:
    """The device's position in [0, 1) for this rollout."""
    digest = hashlib.sha256(f"{rollout_id}\0{device_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / _SCALE


def stage_bound(spec: RolloutSpec, stage: int, bounds: Sequence[float] = ()) -> float:
    """The bucket bound of ``stage``'s cohort: the one fixed in ``bounds`` when the stage
    began, else its percent (never below an earlier stage's fixed bound)."""
    if stage < len(bounds):
        return bounds[stage]
    percent = spec.stages[min(stage, spec.last_stage)].percent
    share = 1.0 if percent >= 100 else percent / 100.0
    return max(share, bounds[-1]) if bounds else share


def fix_bound(
    spec: RolloutSpec, stage: int, bounds: Sequence[float], device_ids: Iterable[str]
) -> float:
    """The bound ``stage`` keeps from its start: its percent, raised to take the
    lowest-hashed devices of ``device_ids`` (the group) when the percent draws fewer
    than the stage's ``min_devices``; never below the previous stage's bound."""
    bound = stage_bound(spec, stage, bounds[:stage])
    need = spec.stages[stage].min_devices
    if bound >= 1.0 or need <= 0:
        return bound
    drawn = sorted(bucket(spec.rollout_id, d) for d in set(device_ids))
    if not drawn:
        return bound
    nth = drawn[min(need, len(drawn)) - 1]
    return bound if nth < bound else math.nextafter(nth, math.inf)


def with_bounds(spec: RolloutSpec, state: RolloutState, device_ids: Iterable[str]) -> RolloutState:
    """``state`` with the bound of each stage it has reached fixed over ``device_ids``
    (bounds fixed earlier are kept): the service calls it on every sync, and it changes
    the state only when a stage began since the last one."""
    if state.stage < 0 or len(state.bounds) > state.stage:
        return state
    ids = list(device_ids)
    bounds = list(state.bounds)
    for k in range(len(bounds), state.stage + 1):
        bounds.append(fix_bound(spec, k, bounds, ids))
    return state.evolve(bounds=tuple(bounds))


def in_stage(spec: RolloutSpec, stage: int, device_id: str, bounds: Sequence[float] = ()) -> bool:
    """Whether ``device_id`` belongs to the canary cohort of stage ``stage`` (-1: nobody)."""
    if stage < 0:
        return False
    bound = stage_bound(spec, stage, bounds)
    return bound >= 1.0 or bucket(spec.rollout_id, device_id) < bound


def first_stage(spec: RolloutSpec, device_id: str, bounds: Sequence[float] = ()) -> int | None:
    """The first stage whose cohort holds the device, or None if no stage does."""
    b = bucket(spec.rollout_id, device_id)
    for i in range(len(spec.stages)):
        bound = stage_bound(spec, i, bounds)
        if bound >= 1.0 or b < bound:
            return i
    return None


def stage_members(spec: RolloutSpec, stage: int, device_ids: Iterable[str]) -> list[str]:
    """The devices among ``device_ids`` in the canary cohort of ``stage`` by percent."""
    return [d for d in device_ids if in_stage(spec, stage, d)]


@dataclass(frozen=True)
class Assignment:
    """What a device of the target group should run because of this rollout."""

    desired: BundleRef | None
    shadow: BundleRef | None
    canary: bool
    stage: int | None


def assignment(spec: RolloutSpec, state: RolloutState, device_id: str) -> Assignment:
    """The assignment of ``device_id`` (assumed to be in the target group).

    * pending: everyone keeps the previous bundle;
    * running / paused / aborted: members of the current and earlier stages get the
      candidate (for ``shadow``: as the shadow model beside the previous one), the
      rest the previous bundle;
    * succeeded: everyone the candidate (``shadow``: nobody changes);
    * rolled back: everyone the re-published previous model (``state.rollback_bundle``).
    """
    st = state.status
    if st is Status.ROLLED_BACK:
        return Assignment(state.rollback_bundle or spec.previous, None, False, None)
    if st is Status.SUCCEEDED:
        if spec.strategy is Strategy.SHADOW:
            return Assignment(spec.previous, None, False, None)
        return Assignment(spec.bundle, None, True, first_stage(spec, device_id, state.bounds))
    member = st is not Status.PENDING and in_stage(spec, state.stage, device_id, state.bounds)
    if not member:
        return Assignment(spec.previous, None, False, None)
    stage = first_stage(spec, device_id, state.bounds)
    if spec.strategy is Strategy.SHADOW:
        return Assignment(spec.previous, spec.bundle, True, stage)
    return Assignment(spec.bundle, None, True, stage)


def assigned_bundle(spec: RolloutSpec, state: RolloutState, device_id: str) -> str | None:
    """The bundle id ``device_id`` should run (None: no bundle from this rollout)."""
    ref = assignment(spec, state, device_id).desired
    return ref.bundle_id if ref else None


def changed_devices(
    spec: RolloutSpec, before: RolloutState, after: RolloutState, device_ids: Iterable[str]
) -> list[str]:
    """The devices among ``device_ids`` whose assignment differs between two states."""
    out = []
    for d in device_ids:
        a, b = assignment(spec, before, d), assignment(spec, after, d)
        if (a.desired, a.shadow) != (b.desired, b.shadow):
            out.append(d)
    return out
