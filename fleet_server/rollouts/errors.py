"""One error root for the rollout engine; subclasses name what went wrong."""

from __future__ import annotations


class RolloutError(Exception):
    """Root of all rollout engine errors."""

    #: short stable code the API maps to its JSON error responses
    code = "rollout_error"


class InvalidSpecError(RolloutError):
    """A rollout spec (stages, gates, strategy, bundles) is not valid."""

    code = "invalid_rollout_spec"


class InvalidStateError(RolloutError):
    """A stored rollout state cannot be parsed or does not fit its spec."""

    code = "invalid_rollout_state"


class InvalidTransitionError(RolloutError):
    """An operator action is not allowed in the rollout's current status."""

    code = "invalid_rollout_transition"


class RepublishError(RolloutError):
    """The previous bundle could not be re-published under a new version."""

    code = "republish_failed"


class LeaderLockError(RolloutError):
    """The leader lock could not be taken or checked (database unreachable, bad URL)."""

    code = "leader_lock_error"
