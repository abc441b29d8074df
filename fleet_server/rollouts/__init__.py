"""The rollout engine.

The pure core (:mod:`.spec`, :mod:`.cohort`, :mod:`.gates`, :mod:`.engine`) does
no I/O: it decides from a spec, a state, aggregated cohort metrics and a time.
:mod:`.republish` (file I/O), :mod:`.leader` (database lock) and
:mod:`.scheduler` (the loop) are the shell around it.
"""

from fleet_server.rollouts.cohort import (
    Assignment,
    assigned_bundle,
    assignment,
    bucket,
    changed_devices,
    in_stage,
)
from fleet_server.rollouts.engine import (
    TRANSITIONS,
    Action,
    Decision,
    abort,
    apply_decision,
    decide,
    pause,
    promote,
    resume,
    rollback,
    start,
)
from fleet_server.rollouts.errors import (
    InvalidSpecError,
    InvalidStateError,
    InvalidTransitionError,
    LeaderLockError,
    RepublishError,
    RolloutError,
)
from fleet_server.rollouts.gates import CohortMetrics, CohortStats, GateResult, Verdict
from fleet_server.rollouts.spec import (
    BundleRef,
    FailurePolicy,
    GateKind,
    GateSpec,
    RolloutSpec,
    RolloutState,
    Stage,
    Status,
    Strategy,
)

__all__ = [
    "TRANSITIONS",
    "Action",
    "Assignment",
    "BundleRef",
    "CohortMetrics",
    "CohortStats",
    "Decision",
    "FailurePolicy",
    "GateKind",
    "GateResult",
    "GateSpec",
    "InvalidSpecError",
    "InvalidStateError",
    "InvalidTransitionError",
    "LeaderLockError",
    "RepublishError",
    "RolloutError",
    "RolloutSpec",
    "RolloutState",
    "Stage",
    "Status",
    "Strategy",
    "Verdict",
    "abort",
    "apply_decision",
    "assigned_bundle",
    "assignment",
    "bucket",
    "changed_devices",
    "decide",
    "in_stage",
    "pause",
    "promote",
    "resume",
    "rollback",
    "start",
]
