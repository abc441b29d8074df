"""The pure update state machine: every row, every unknown pair, and the chains."""

from __future__ import annotations

import itertools

import pytest

from device_agent.update.machine import (
    OUTCOMES,
    TRANSITIONS,
    Action,
    Event,
    State,
    TransitionError,
    restart_state,
    transition,
)

S, E, A = State, Event, Action


@pytest.mark.parametrize(("state", "event"), sorted(TRANSITIONS, key=str))
def test_every_declared_row(state: State, event: Event) -> None:
    nxt, actions = TRANSITIONS[(state, event)]
    step = transition(state.value, event.value)  # string values work like the enums
    assert step.state is nxt
    assert step.actions == actions


def test_every_undeclared_pair_raises() -> None:
    undeclared = [(s, e) for s, e in itertools.product(State, Event) if (s, e) not in TRANSITIONS]
    assert undeclared, "the table should not be total"
    for s, e in undeclared:
        with pytest.raises(TransitionError, match=f"from state '{s.value}' on event"):
            transition(s, e)


def test_unknown_names_raise_transition_error() -> None:
    with pytest.raises(TransitionError, match="unknown state or event"):
        transition("flying", "check")
    with pytest.raises(TransitionError, match="unknown state or event"):
        transition("idle", "explode")


def test_every_state_declares_what_restart_does() -> None:
    for s in State:
        step = restart_state(s)
        assert isinstance(step.state, State)


def test_every_state_is_reachable_from_idle() -> None:
    seen, todo = {S.IDLE}, [S.IDLE]
    while todo:
        s = todo.pop()
        for (src, _), (dst, _) in TRANSITIONS.items():
            if src is s and dst not in seen:
                seen.add(dst)
                todo.append(dst)
    assert seen == set(State)


def test_every_state_leads_back_to_idle() -> None:
    back = {S.IDLE}
    changed = True
    while changed:
        changed = False
        for (src, ev), (dst, _) in TRANSITIONS.items():
            if ev is not E.RESTART and dst in back and src not in back:
                back.add(src)
                changed = True
    assert back == set(State)


def test_every_side_effect_state_redoes_its_work_on_restart() -> None:
    """A crash right after persisting a state must not skip that state's side effect."""
    for (_src, ev), (dst, actions) in TRANSITIONS.items():
        if ev is E.RESTART or not actions:
            continue
        restart = restart_state(dst)
        assert restart.state is dst
        # the main action of the state (the last one) is repeated on restart
        assert actions[-1] in restart.actions, (dst, actions, restart.actions)


def test_every_failure_state_reports_and_is_an_outcome() -> None:
    for s in (
        S.DOWNLOAD_FAILED,
        S.VERIFY_FAILED,
        S.STAGE_FAILED,
        S.SMOKE_FAILED,
        S.PROBATION_FAILED,
        S.ROLLED_BACK,
        S.COMMITTED,
        S.SHADOW_STARTED,
    ):
        assert s in OUTCOMES
        entering = [
            acts for (_, ev), (dst, acts) in TRANSITIONS.items() if dst is s and ev is not E.RESTART
        ]
        assert entering and all(A.REPORT in acts for acts in entering), s
        assert A.REPORT in restart_state(s).actions


def test_nothing_switches_without_a_passed_smoke_test() -> None:
    into_switching = [
        (src, ev)
        for (src, ev), (dst, _) in TRANSITIONS.items()
        if dst is S.SWITCHING and ev is not E.RESTART
    ]
    assert into_switching == [(S.SMOKE_TESTING, E.SMOKE_PASSED)]
    into_staging = [
        (src, ev)
        for (src, ev), (dst, _) in TRANSITIONS.items()
        if dst is S.STAGING and ev is not E.RESTART
    ]
    assert into_staging == [(S.VERIFYING, E.VERIFIED)]


def test_shadow_never_switches() -> None:
    s = S.SMOKE_TESTING
    step = transition(s, E.SMOKE_PASSED_SHADOW)
    assert step.state is S.SHADOW_LOADING and A.SWITCH not in step.actions
    assert transition(step.state, E.SHADOW_LOADED).state is S.SHADOW_STARTED


def run_chain(events: list[Event], start: State = S.IDLE) -> list[State]:
    chain, s = [start], start
    for e in events:
        s = transition(s, e).state
        chain.append(s)
    return chain


CHAINS = {
    "happy_path": (
        [
            E.CHECK,
            E.UPDATE_AVAILABLE,
            E.DOWNLOADED,
            E.VERIFIED,
            E.STAGED,
            E.SMOKE_PASSED,
            E.SWITCHED,
            E.PROBATION_PASSED,
            E.REPORTED,
        ],
        [
            S.IDLE,
            S.CHECKING,
            S.DOWNLOADING,
            S.VERIFYING,
            S.STAGING,
            S.SMOKE_TESTING,
            S.SWITCHING,
            S.PROBATION,
            S.COMMITTED,
            S.IDLE,
        ],
    ),
    "nothing_new": ([E.CHECK, E.NO_CHANGE], [S.IDLE, S.CHECKING, S.IDLE]),
    "server_down": ([E.CHECK, E.CHECK_FAILED], [S.IDLE, S.CHECKING, S.IDLE]),
    "local_install": (
        [
            E.INSTALL_LOCAL,
            E.VERIFIED,
            E.STAGED,
            E.SMOKE_PASSED,
            E.SWITCHED,
            E.PROBATION_PASSED,
            E.REPORTED,
        ],
        [
            S.IDLE,
            S.VERIFYING,
            S.STAGING,
            S.SMOKE_TESTING,
            S.SWITCHING,
            S.PROBATION,
            S.COMMITTED,
            S.IDLE,
        ],
    ),
    "download_fails": (
        [E.CHECK, E.UPDATE_AVAILABLE, E.DOWNLOAD_ERROR, E.REPORTED],
        [S.IDLE, S.CHECKING, S.DOWNLOADING, S.DOWNLOAD_FAILED, S.IDLE],
    ),
    "tampered_refused": (
        [E.CHECK, E.UPDATE_AVAILABLE, E.DOWNLOADED, E.REFUSED, E.REPORTED],
        [S.IDLE, S.CHECKING, S.DOWNLOADING, S.VERIFYING, S.VERIFY_FAILED, S.IDLE],
    ),
    "disk_full_staging": (
        [E.INSTALL_LOCAL, E.VERIFIED, E.STAGE_ERROR, E.REPORTED],
        [S.IDLE, S.VERIFYING, S.STAGING, S.STAGE_FAILED, S.IDLE],
    ),
    "smoke_fails": (
        [E.INSTALL_LOCAL, E.VERIFIED, E.STAGED, E.SMOKE_ERROR, E.REPORTED],
        [S.IDLE, S.VERIFYING, S.STAGING, S.SMOKE_TESTING, S.SMOKE_FAILED, S.IDLE],
    ),
    "probation_fails_and_rolls_back": (
        [
            E.INSTALL_LOCAL,
            E.VERIFIED,
            E.STAGED,
            E.SMOKE_PASSED,
            E.SWITCHED,
            E.PROBATION_ERROR,
            E.REPORTED,
            E.ROLLED_BACK,
            E.REPORTED,
        ],
        [
            S.IDLE,
            S.VERIFYING,
            S.STAGING,
            S.SMOKE_TESTING,
            S.SWITCHING,
            S.PROBATION,
            S.PROBATION_FAILED,
            S.ROLLING_BACK,
            S.ROLLED_BACK,
            S.IDLE,
        ],
    ),
    "switch_fails_and_rolls_back": (
        [
            E.INSTALL_LOCAL,
            E.VERIFIED,
            E.STAGED,
            E.SMOKE_PASSED,
            E.SWITCH_ERROR,
            E.ROLLED_BACK,
            E.REPORTED,
        ],
        [
            S.IDLE,
            S.VERIFYING,
            S.STAGING,
            S.SMOKE_TESTING,
            S.SWITCHING,
            S.ROLLING_BACK,
            S.ROLLED_BACK,
            S.IDLE,
        ],
    ),
    "manual_rollback": (
        [E.ROLLBACK_REQUESTED, E.ROLLED_BACK, E.REPORTED],
        [S.IDLE, S.ROLLING_BACK, S.ROLLED_BACK, S.IDLE],
    ),
    "shadow": (
        [
            E.CHECK,
            E.SHADOW_AVAILABLE,
            E.DOWNLOADED,
            E.VERIFIED,
            E.STAGED,
            E.SMOKE_PASSED_SHADOW,
            E.SHADOW_LOADED,
            E.REPORTED,
        ],
        [
            S.IDLE,
            S.CHECKING,
            S.DOWNLOADING,
            S.VERIFYING,
            S.STAGING,
            S.SMOKE_TESTING,
            S.SHADOW_LOADING,
            S.SHADOW_STARTED,
            S.IDLE,
        ],
    ),
}


@pytest.mark.parametrize("name", sorted(CHAINS))
def test_state_chain(name: str) -> None:
    events, expected = CHAINS[name]
    assert run_chain(events) == expected


RESTARTS = {
    S.IDLE: S.IDLE,
    S.CHECKING: S.CHECKING,
    S.DOWNLOADING: S.DOWNLOADING,
    S.VERIFYING: S.VERIFYING,
    S.STAGING: S.STAGING,
    S.SMOKE_TESTING: S.SMOKE_TESTING,
    S.SHADOW_LOADING: S.SHADOW_LOADING,
    S.SHADOW_STARTED: S.SHADOW_STARTED,
    S.SWITCHING: S.SWITCHING,
    S.PROBATION: S.PROBATION,
    S.COMMITTED: S.COMMITTED,
    S.DOWNLOAD_FAILED: S.DOWNLOAD_FAILED,
    S.VERIFY_FAILED: S.VERIFY_FAILED,
    S.STAGE_FAILED: S.STAGE_FAILED,
    S.SMOKE_FAILED: S.SMOKE_FAILED,
    S.PROBATION_FAILED: S.PROBATION_FAILED,
    S.ROLLING_BACK: S.ROLLING_BACK,
    S.ROLLED_BACK: S.ROLLED_BACK,
}


@pytest.mark.parametrize("state", list(State))
def test_restart_row(state: State) -> None:
    step = restart_state(state)
    assert step.state is RESTARTS[state]
    if state is S.DOWNLOADING:
        assert step.actions == (A.DOWNLOAD,)
    if state is S.STAGING:
        assert step.actions[0] is A.DISCARD_STAGED
    if state in (S.SWITCHING, S.ROLLING_BACK):
        assert step.actions in ((A.SWITCH,), (A.ROLL_BACK,))
