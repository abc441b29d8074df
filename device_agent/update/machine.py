"""The update state machine: the whole graph in one table, and a pure step function.

Every row of :data:`TRANSITIONS` reads "in ``state``, on ``event``, go to
``next`` and ask the I/O shell to perform ``actions``". Failure and rollback
states are states like any other. Nothing here does I/O; the shell
(:mod:`device_agent.update.updater`) persists the new state *before* it
performs the side effect that belongs to that state, so after a crash or a
power cut the persisted state names the step that may be incomplete.

What a restart does is declared in the same table: the shell feeds the event
``restart`` for the persisted state, and the row says where to go. In short:

* ``idle``: nothing to redo; ``checking``: check in again.
* ``downloading``: resume the download (HTTP Range on the ``.part`` file).
* ``verifying``: verify the downloaded file again.
* ``staging``: discard the inactive slot's leftovers and stage again.
* ``smoke_testing``: the staged slot was fsynced before this state was
  persisted; run the smoke test again.
* ``switching``: complete the switch; ``active.json`` is replaced atomically,
  so it names either the old or the new slot, and the switch is idempotent.
* ``shadow_loading``: load the staged candidate as the shadow again.
* ``probation``: continue probation (the start time is persisted).
* ``committed``, ``shadow_started``, ``*_failed``, ``rolled_back``: report the
  outcome again (reports are at-least-once) and return to ``idle``.
* ``rolling_back``: point ``active.json`` at the previous slot again.

Invariant: ``active.json`` only ever names a slot whose bundle passed
verification and its smoke test, so whatever the persisted state, the device
boots into a verified model (boot also re-hashes the active slot's files and
falls back to the previous slot if they changed).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class State(str, Enum):
    IDLE = "idle"
    CHECKING = "checking"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    STAGING = "staging"
    SMOKE_TESTING = "smoke_testing"
    SWITCHING = "switching"
    PROBATION = "probation"
    COMMITTED = "committed"
    SHADOW_LOADING = "shadow_loading"
    SHADOW_STARTED = "shadow_started"
    DOWNLOAD_FAILED = "download_failed"
    VERIFY_FAILED = "verify_failed"
    STAGE_FAILED = "stage_failed"
    SMOKE_FAILED = "smoke_failed"
    PROBATION_FAILED = "probation_failed"
    ROLLING_BACK = "rolling_back"
    ROLLED_BACK = "rolled_back"


class Event(str, Enum):
    CHECK = "check"  # poll timer or MQTT notify
    NO_CHANGE = "no_change"  # 304, or the assignment asks for what we run
    CHECK_FAILED = "check_failed"  # server unreachable; try at the next poll
    UPDATE_AVAILABLE = "update_available"
    SHADOW_AVAILABLE = "shadow_available"
    INSTALL_LOCAL = "install_local"  # `edgefleet-agent install BUNDLE`
    ROLLBACK_REQUESTED = "rollback_requested"  # `edgefleet-agent rollback`
    DOWNLOADED = "downloaded"
    DOWNLOAD_ERROR = "download_error"
    VERIFIED = "verified"
    REFUSED = "refused"  # BundleError during verification
    STAGED = "staged"
    STAGE_ERROR = "stage_error"
    SMOKE_PASSED = "smoke_passed"
    SMOKE_PASSED_SHADOW = "smoke_passed_shadow"
    SMOKE_ERROR = "smoke_error"
    SHADOW_LOADED = "shadow_loaded"
    SWITCHED = "switched"
    SWITCH_ERROR = "switch_error"
    PROBATION_PASSED = "probation_passed"
    PROBATION_ERROR = "probation_error"
    #: the server assigns something else while the candidate is on probation (a rollout
    #: rolled back or moved on): probation ends without committing, the next check acts
    SUPERSEDED = "superseded"
    ROLLED_BACK = "rolled_back"
    REPORTED = "reported"
    RESTART = "restart"  # the process started with this state persisted


class Action(str, Enum):
    FETCH_ASSIGNMENT = "fetch_assignment"
    DOWNLOAD = "download"
    VERIFY = "verify"
    STAGE = "stage"
    SMOKE_TEST = "smoke_test"
    LOAD_SHADOW = "load_shadow"
    SWITCH = "switch"
    WATCH_PROBATION = "watch_probation"
    ROLL_BACK = "roll_back"
    DISCARD_DOWNLOAD = "discard_download"
    DISCARD_STAGED = "discard_staged"
    REMEMBER_FAILED = "remember_failed"  # do not retry this bundle until the assignment changes
    REPORT = "report"


S, E, A = State, Event, Action

#: (state, event) -> (next state, actions). The whole graph, in one place.
TRANSITIONS: dict[tuple[State, Event], tuple[State, tuple[Action, ...]]] = {
    # -- the happy path ------------------------------------------------------------
    (S.IDLE, E.CHECK): (S.CHECKING, (A.FETCH_ASSIGNMENT,)),
    (S.IDLE, E.INSTALL_LOCAL): (S.VERIFYING, (A.VERIFY,)),
    (S.IDLE, E.ROLLBACK_REQUESTED): (S.ROLLING_BACK, (A.ROLL_BACK,)),
    (S.CHECKING, E.NO_CHANGE): (S.IDLE, ()),
    (S.CHECKING, E.CHECK_FAILED): (S.IDLE, ()),
    (S.CHECKING, E.UPDATE_AVAILABLE): (S.DOWNLOADING, (A.DOWNLOAD,)),
    (S.CHECKING, E.SHADOW_AVAILABLE): (S.DOWNLOADING, (A.DOWNLOAD,)),
    (S.DOWNLOADING, E.DOWNLOADED): (S.VERIFYING, (A.VERIFY,)),
    (S.VERIFYING, E.VERIFIED): (S.STAGING, (A.DISCARD_STAGED, A.STAGE)),
    (S.STAGING, E.STAGED): (S.SMOKE_TESTING, (A.SMOKE_TEST,)),
    (S.SMOKE_TESTING, E.SMOKE_PASSED): (S.SWITCHING, (A.SWITCH,)),
    (S.SMOKE_TESTING, E.SMOKE_PASSED_SHADOW): (S.SHADOW_LOADING, (A.LOAD_SHADOW,)),
    (S.SHADOW_LOADING, E.SHADOW_LOADED): (S.SHADOW_STARTED, (A.DISCARD_DOWNLOAD, A.REPORT)),
    (S.SHADOW_STARTED, E.REPORTED): (S.IDLE, ()),
    (S.SWITCHING, E.SWITCHED): (S.PROBATION, (A.WATCH_PROBATION,)),
    (S.PROBATION, E.PROBATION_PASSED): (S.COMMITTED, (A.DISCARD_DOWNLOAD, A.REPORT)),
    (S.COMMITTED, E.REPORTED): (S.IDLE, ()),
    # -- failures ------------------------------------------------------------------
    (S.DOWNLOADING, E.DOWNLOAD_ERROR): (S.DOWNLOAD_FAILED, (A.DISCARD_DOWNLOAD, A.REPORT)),
    (S.DOWNLOAD_FAILED, E.REPORTED): (S.IDLE, ()),
    (S.VERIFYING, E.REFUSED): (S.VERIFY_FAILED, (A.DISCARD_DOWNLOAD, A.REMEMBER_FAILED, A.REPORT)),
    (S.STAGING, E.REFUSED): (S.VERIFY_FAILED, (A.DISCARD_DOWNLOAD, A.REMEMBER_FAILED, A.REPORT)),
    (S.VERIFY_FAILED, E.REPORTED): (S.IDLE, ()),
    (S.STAGING, E.STAGE_ERROR): (S.STAGE_FAILED, (A.DISCARD_STAGED, A.REPORT)),
    (S.STAGE_FAILED, E.REPORTED): (S.IDLE, ()),
    (S.SMOKE_TESTING, E.SMOKE_ERROR): (
        S.SMOKE_FAILED,
        (A.DISCARD_DOWNLOAD, A.DISCARD_STAGED, A.REMEMBER_FAILED, A.REPORT),
    ),
    (S.SMOKE_FAILED, E.REPORTED): (S.IDLE, ()),
    (S.SHADOW_LOADING, E.SMOKE_ERROR): (
        S.SMOKE_FAILED,
        (A.DISCARD_DOWNLOAD, A.DISCARD_STAGED, A.REMEMBER_FAILED, A.REPORT),
    ),
    (S.SWITCHING, E.SWITCH_ERROR): (S.ROLLING_BACK, (A.ROLL_BACK,)),
    (S.PROBATION, E.PROBATION_ERROR): (S.PROBATION_FAILED, (A.REMEMBER_FAILED, A.REPORT)),
    (S.PROBATION, E.SUPERSEDED): (S.IDLE, ()),
    (S.PROBATION_FAILED, E.REPORTED): (S.ROLLING_BACK, (A.ROLL_BACK,)),
    (S.ROLLING_BACK, E.ROLLED_BACK): (S.ROLLED_BACK, (A.DISCARD_DOWNLOAD, A.REPORT)),
    (S.ROLLED_BACK, E.REPORTED): (S.IDLE, ()),
    # -- what a restart does in each state ----------------------------------------
    (S.IDLE, E.RESTART): (S.IDLE, ()),
    (S.CHECKING, E.RESTART): (S.CHECKING, (A.FETCH_ASSIGNMENT,)),
    (S.DOWNLOADING, E.RESTART): (S.DOWNLOADING, (A.DOWNLOAD,)),  # resume with Range
    (S.VERIFYING, E.RESTART): (S.VERIFYING, (A.VERIFY,)),
    (S.STAGING, E.RESTART): (S.STAGING, (A.DISCARD_STAGED, A.STAGE)),  # restage from scratch
    (S.SMOKE_TESTING, E.RESTART): (S.SMOKE_TESTING, (A.SMOKE_TEST,)),
    (S.SHADOW_LOADING, E.RESTART): (S.SHADOW_LOADING, (A.LOAD_SHADOW,)),
    (S.SHADOW_STARTED, E.RESTART): (S.SHADOW_STARTED, (A.DISCARD_DOWNLOAD, A.REPORT)),
    (S.SWITCHING, E.RESTART): (S.SWITCHING, (A.SWITCH,)),  # idempotent
    (S.PROBATION, E.RESTART): (S.PROBATION, (A.WATCH_PROBATION,)),  # continue
    (S.COMMITTED, E.RESTART): (S.COMMITTED, (A.DISCARD_DOWNLOAD, A.REPORT)),
    (S.DOWNLOAD_FAILED, E.RESTART): (S.DOWNLOAD_FAILED, (A.DISCARD_DOWNLOAD, A.REPORT)),
    (S.VERIFY_FAILED, E.RESTART): (
        S.VERIFY_FAILED,
        (A.DISCARD_DOWNLOAD, A.REMEMBER_FAILED, A.REPORT),
    ),
    (S.STAGE_FAILED, E.RESTART): (S.STAGE_FAILED, (A.DISCARD_STAGED, A.REPORT)),
    (S.SMOKE_FAILED, E.RESTART): (
        S.SMOKE_FAILED,
        (A.DISCARD_DOWNLOAD, A.DISCARD_STAGED, A.REMEMBER_FAILED, A.REPORT),
    ),
    (S.PROBATION_FAILED, E.RESTART): (S.PROBATION_FAILED, (A.REMEMBER_FAILED, A.REPORT)),
    (S.ROLLING_BACK, E.RESTART): (S.ROLLING_BACK, (A.ROLL_BACK,)),  # idempotent
    (S.ROLLED_BACK, E.RESTART): (S.ROLLED_BACK, (A.DISCARD_DOWNLOAD, A.REPORT)),
}

#: states in which the device waits for the next check or command
RESTING = frozenset({State.IDLE})

#: states that end an update attempt and are reported with an outcome
OUTCOMES: dict[State, str] = {
    State.COMMITTED: "installed",
    State.SHADOW_STARTED: "installed",  # reported with "shadow": true
    State.DOWNLOAD_FAILED: "failed",
    State.VERIFY_FAILED: "refused",
    State.STAGE_FAILED: "failed",
    State.SMOKE_FAILED: "failed",
    State.PROBATION_FAILED: "failed",
    State.ROLLED_BACK: "rolled_back",
}


#: the event that fails the step of each working state when one of its actions raises
#: something the action did not handle itself (the boundary in the updater's engine).
#: States not listed here (outcomes, ``idle``) have no work left to fail: their
#: remaining actions still run and the outcome is reported.
FAILURE_EVENTS: dict[State, Event] = {
    State.CHECKING: Event.CHECK_FAILED,
    State.DOWNLOADING: Event.DOWNLOAD_ERROR,
    State.VERIFYING: Event.REFUSED,
    State.STAGING: Event.STAGE_ERROR,
    State.SMOKE_TESTING: Event.SMOKE_ERROR,
    State.SHADOW_LOADING: Event.SMOKE_ERROR,
    State.SWITCHING: Event.SWITCH_ERROR,
    State.PROBATION: Event.PROBATION_ERROR,
    State.ROLLING_BACK: Event.ROLLED_BACK,
}


class TransitionError(ValueError):
    """The table has no row for this (state, event) pair: a bug in the caller."""


@dataclass(frozen=True)
class Step:
    state: State
    actions: tuple[Action, ...]


def transition(state: State | str, event: Event | str) -> Step:
    """Return the next state and the actions to perform; pure, no I/O.

    Raises :class:`TransitionError` for a pair the table does not declare.
    """
    try:
        s, e = State(state), Event(event)
    except ValueError as err:
        raise TransitionError(f"unknown state or event: {state!r}, {event!r}") from err
    row = TRANSITIONS.get((s, e))
    if row is None:
        raise TransitionError(f"no transition from state {s.value!r} on event {e.value!r}")
    return Step(*row)


def restart_state(state: State | str) -> Step:
    """Where a process that finds ``state`` persisted goes, and what it redoes."""
    return transition(state, Event.RESTART)
