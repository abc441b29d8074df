"""Who runs what: deterministic, monotonic canary cohorts and the resulting assignment.

Invariants:

* **Deterministic.** A device's bucket is ``sha256(rollout_id NUL device_id)``'s
  first 8 bytes read as an integer and divided by 2**64, a number in [0, 1). It
  depends on nothing but the two ids, so every server replica computes the same
  cohorts and a device that comes online late gets the assignment it would have
  had all along.
* **Monotonic.** A device is in stage k iff ``bucket < percent_k / 100``; the spec
  requires non-decreasing percents, so a member of stage k is a member of every
  later stage and never flips back to the old model while the rollout advances.
* **Independent across rollouts.** The rollout id salts the hash, so the same
  unlucky devices are not always the first canaries.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

from fleet_server.rollouts.spec import BundleRef, RolloutSpec, RolloutState, Status, Strategy

_SCALE = float(2**64)


def bucket(rollout_id: str, device_id: str) -> float:
    """The device's position in [0, 1) for this rollout."""
    digest = hashlib.sha256(f"{rollout_id}\0{device_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / _SCALE


def in_stage(spec: RolloutSpec, stage: int, device_id: str) -> bool:
    """Whether ``device_id`` belongs to the canary cohort of stage ``stage`` (-1: nobody)."""
    if stage < 0:
        return False
    percent = spec.stages[min(stage, spec.last_stage)].percent
    return percent >= 100 or bucket(spec.rollout_id, device_id) < percent / 100.0


def first_stage(spec: RolloutSpec, device_id: str) -> int | None:
    """The first stage whose cohort holds the device, or None if no stage does."""
    b = bucket(spec.rollout_id, device_id)
    for i, s in enumerate(spec.stages):
        if s.percent >= 100 or b < s.percent / 100.0:
            return i
    return None


def stage_members(spec: RolloutSpec, stage: int, device_ids: Iterable[str]) -> list[str]:
    """The devices among ``device_ids`` in the canary cohort of ``stage``."""
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
        return Assignment(spec.bundle, None, True, first_stage(spec, device_id))
    member = st is not Status.PENDING and in_stage(spec, state.stage, device_id)
    if not member:
        return Assignment(spec.previous, None, False, None)
    stage = first_stage(spec, device_id)
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
