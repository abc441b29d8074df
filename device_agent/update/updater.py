"""The updater: the I/O shell that drives :mod:`device_agent.update.machine`.

For every step it (1) persists the new state to ``update.json`` durably, then
(2) performs the step's actions, which yield the next event. After a crash the
persisted state is fed the ``restart`` event, whose row says what to redo.

Collaborators are passed in, each behind a small interface:

* ``host`` (:class:`ModelHost`): the embedding :class:`~device_agent.agent.Agent`
  or anything with ``swap(model)`` and ``set_shadow(model | None)``; a host that also
  has ``set_previous(model | None)`` and ``compares_previous`` is handed the model an
  update replaced, to keep comparing the new one with it (see
  :meth:`~device_agent.agent.Agent.set_previous`), from the switch until the next
  update or rollback, and again after a restart;
* ``fetcher`` (:class:`~device_agent.update.fetch.Fetcher`): assignment,
  bundles and reports; None when the device has no server;
* ``events`` (:class:`EventSink`): the telemetry store; install reports go
  in as ``"event"`` records so they reach the fleet over MQTT;
* ``error_rate_since``: ``t -> (predictions, errors)`` of the active model
  since wall time ``t``, which probation watches.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import signal
import sqlite3
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from ..bundle import (
    BundleError,
    Manifest,
    RollbackError,
    StagingError,
    TrustStore,
    unpack_bundle,
    verify_file,
)
from ..bundle.verify import Expectation
from ..config import UpdateConfig
from ..model import LoadedModel, load_model, run_smoke_test
from ..protocol import REPORTS_PATH  # noqa: F401 - documented destination of reports
from ..trust.expect import expectation
from .durable import Quarantined
from .errors import (
    AssignmentError,
    DownloadError,
    RollbackUnavailableError,
    ServerUnavailableError,
    UpdateBusyError,
    UpdateError,
)
from .fetch import Fetcher, sha256_file
from .floors import Floors
from .machine import (
    FAILURE_EVENTS,
    OUTCOMES,
    Action,
    Event,
    State,
    Step,
    restart_state,
    transition,
)
from .slots import ActivePointer, Slots
from .state import SLOT_NAMES, Assignment, BundleRef, UpdateRecord, load_record, save_record

log = logging.getLogger(__name__)

MAX_REMEMBERED_FAILURES = 32
#: reports kept for re-sending while the server is unreachable (the telemetry store
#: keeps every one as an event too)
MAX_UNSENT_REPORTS = 100
#: states whose work is done to a candidate that is not serving yet
CANDIDATE_STATES = frozenset(
    {
        State.CHECKING,
        State.DOWNLOADING,
        State.VERIFYING,
        State.STAGING,
        State.SMOKE_TESTING,
        State.SHADOW_LOADING,
    }
)


class ModelHost(Protocol):
    """What serves predictions: the updater hands it verified, smoke-tested models."""

    def swap(self, model: LoadedModel) -> Any: ...

    def set_shadow(self, model: LoadedModel | None) -> Any: ...


class EventSink(Protocol):
    def append(self, kind: str, body: Any, ts: float) -> Any: ...


ErrorRate = Callable[[float], tuple[int, int]]
Loader = Callable[[Path, str, int], LoadedModel]


def _default_loader(path: Path, slot: str, threads: int) -> LoadedModel:
    return load_model(path, slot, threads)


class Updater:
    """Crash-safe verified updates into A/B slots under ``state_dir``."""

    def __init__(
        self,
        state_dir: str | Path,
        trust: TrustStore,
        host: ModelHost,
        *,
        config: UpdateConfig | None = None,
        fetcher: Fetcher | None = None,
        events: EventSink | None = None,
        error_rate_since: ErrorRate | None = None,
        clock: Callable[[], float] = time.time,
        loader: Loader = _default_loader,
        crash_at: str | None = None,
        on_telemetry_policy: Callable[[dict[str, Any]], object] | None = None,
        device_class: str | None = None,
        model_name: str | None = None,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.trust = trust
        self.host = host
        self.config = config or UpdateConfig()
        self.fetcher = fetcher
        self.events = events
        self.error_rate_since = error_rate_since
        self.clock = clock
        self.loader = loader
        self.crash_at = crash_at  # test hook: SIGKILL ourselves at this point; None = off
        self.on_telemetry_policy = on_telemetry_policy
        self.device_class = device_class  # bundles must list it (when they list classes)
        #: on a device running several models: the one model these slots hold (any bundle
        #: of another name is ``wrong_model``, even into empty slots); None: whichever the
        #: first install brings
        self.model_name = model_name
        #: False under the Uptane chain: the director may go back to an earlier release
        #: (a rollback without re-signing); the release counter floor guards it instead
        self.version_floor = True
        self.slots = Slots(self.state_dir, repair=True)
        self.downloads = self.state_dir / "downloads"
        self.record_file = self.state_dir / "update.json"
        self.record = load_record(self.record_file)
        self.floors = Floors(self.state_dir, repair=True)
        self._quarantined: list[Quarantined] = []
        self._unsent: list[dict[str, Any]] = []  # reports the server has not taken yet
        self.history: list[str] = []  # states entered by this process, in order
        self.reports: list[dict[str, Any]] = []  # reports made by this process
        self._staged: LoadedModel | None = None
        self._lock_fd: int | None = None

    # -- locking: one updater per state_dir --------------------------------------
    def lock(self) -> None:
        """Take the state directory's update lock; :class:`UpdateBusyError` if held."""
        if self._lock_fd is not None:
            return
        fd = os.open(self.state_dir / "update.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            raise UpdateBusyError(
                f"another edgefleet-agent process holds {self.state_dir}/update.lock (is "
                "`edgefleet-agent run` active?); stop it, or ask it for predictions instead: "
                "device_agent.serving.client.ServingClient in Python, or the Open Inference "
                "Protocol on its [serving] socket (default <state_dir>/serving.sock)"
            ) from e
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- public verbs --------------------------------------------------------------
    @property
    def state(self) -> State:
        return State(self.record.state)

    def boot(self) -> LoadedModel | None:
        """Validate the state files, serve the safest verified slot, re-arm a shadow,
        then resume what a crash interrupted.

        Invalid state files are moved aside and reported (``state_file_invalid``);
        a lost or inconsistent ``active.json`` is re-derived from the slots (the
        slot that verifies, with the highest version the floor allows); the
        anti-rollback floors are raised to the active slot's version.
        """
        self.lock()
        self.record = load_record(self.record_file, self.quarantined)
        self.floors.reload()
        self.slots.clean_leftovers()
        self._check_pointer()
        self._derive_floors()
        model = self._load_active()
        if model is not None:
            self._compare_with_previous_slot(model)
        info = self.slots.shadow()
        if info is not None and info.get("slot") != (
            self.record.slot if self.state is not State.IDLE else None
        ):
            try:
                self.host.set_shadow(
                    self.loader(
                        self.slots.path(info["slot"]), info["slot"], self.config.runtime_threads
                    )
                )
            except Exception as e:  # noqa: BLE001 - a broken shadow must not stop serving
                log.error("cannot re-load shadow candidate: %s", e)
                self.slots.set_shadow(None)
        self._report_quarantined()
        log.info("resuming update state machine", extra={"state": self.record.state})
        self._run(self._restart_step())
        return model

    def _compare_with(self, model: LoadedModel | None) -> None:
        """Hand the host the model an update replaced (None: stop comparing)."""
        set_previous = getattr(self.host, "set_previous", None)
        if set_previous is None:
            return
        try:
            set_previous(model)
        except Exception as e:  # noqa: BLE001 - a comparison must never stop updates
            log.error("cannot compare with the replaced model: %s", e)

    def _compare_with_previous_slot(self, active: LoadedModel) -> None:
        """At boot: load the previous slot's model (same name, other version) to compare
        with, unless an update is writing into that slot."""
        ptr = self.slots.active()
        if not getattr(self.host, "compares_previous", False) or ptr is None:
            return
        slot = ptr.previous
        if slot is None or (self.state is not State.IDLE and self.record.slot == slot):
            return
        manifest = self.slots.manifest(slot)
        if manifest is None or manifest.name != active.name or manifest.version == active.version:
            return
        try:
            self.slots.verify(slot, None)
            self._compare_with(
                self.loader(self.slots.path(slot), slot, self.config.runtime_threads)
            )
        except Exception as e:  # noqa: BLE001 - serving goes on without the comparison
            log.warning("not comparing with the previous slot %s: %s", slot, e)

    def _restart_step(self) -> Step:
        """The ``restart`` row for the persisted state, unless the process keeps dying
        there: each start in a non-idle state is counted in ``update.json`` before the
        state's work is redone, and past ``update.max_restarts_per_state`` the attempt
        fails (``state_loop``) through the state's failure event, rolling back if the
        new model was already switched in."""
        state = self.state
        if state is State.IDLE:
            return restart_state(state)
        n = self.record.restarts.get(state.value, 0) + 1
        self.record.restarts[state.value] = n
        try:
            save_record(self.record_file, self.record)
        except OSError as e:  # counted in memory; a full disk cannot make a loop longer
            log.error("cannot save restart count: %s", e)
        limit = self.config.max_restarts_per_state
        if n <= limit:
            return restart_state(state)
        message = (
            f"the agent restarted {n - 1} times in update state {state.value!r} without "
            f"getting past it (limit update.max_restarts_per_state = {limit}); the update is "
            "abandoned so the device keeps serving"
        ) + (
            " and retries at the next check"
            if state in (State.CHECKING, State.DOWNLOADING)
            else "; this bundle is not tried again until the assignment changes: publish a "
            "fixed model under a new version"
        )
        log.error("update state loop", extra={"state": state.value, "restarts": n - 1})
        self.record.error = {"code": "state_loop", "message": message}
        if state not in (State.CHECKING, State.DOWNLOADING):
            # the candidate itself may be what kills the process: do not try it again;
            # a download interrupted by power cuts resumes at the next check instead
            self._remember_failed()
        failure = FAILURE_EVENTS.get(state)
        if failure is None or state in (State.CHECKING, State.ROLLING_BACK):
            # an outcome state (its report keeps killing us), a check-in, or a rollback
            # that keeps dying (the active pointer names a verified slot either way): idle
            self._report_health("state_loop", message)
            self.record.state = State.IDLE.value
            return Step(State.IDLE, ())
        return transition(state, failure)

    # -- recovery of durable state -------------------------------------------------
    @property
    def quarantined(self) -> list[Quarantined]:
        """State files this updater found invalid and moved aside (not yet reported)."""
        return self._quarantined

    def _check_pointer(self) -> None:
        """``active.json`` must name what its slot holds; else it is set aside."""
        ptr = self.slots.active()
        if ptr is None:
            return
        m = self.slots.manifest(ptr.slot)
        if m is not None and (m.name, m.version) != (ptr.name, ptr.version):
            self.slots.invalidate_active(
                f"active.json names {ptr.name} v{ptr.version} but slot {ptr.slot} holds "
                f"{m.name} v{m.version}"
            )

    def _signed_versions(self, slots: tuple[str, ...]) -> dict[str, int]:
        """Highest version per model name among ``slots`` whose manifest signature verifies."""
        out: dict[str, int] = {}
        for slot in slots:
            try:
                m = self.slots.signed_manifest(slot, self.trust)
            except Exception as e:  # noqa: BLE001 - an unverifiable slot sets no floor
                log.warning("slot %s sets no floor: %s", slot, e)
                continue
            if m is not None and m.version > out.get(m.name, -1):
                out[m.name] = m.version
        return out

    def _derive_floors(self) -> None:
        """Raise the floors to the active slot's version; after a lost or invalid
        ``floors.json``, to every verified slot's version."""
        lost = not self.floors.path.exists() or bool(self.floors.quarantined)
        self.floors.all()  # load (and set an invalid file aside) before deciding
        lost = lost or bool(self.floors.quarantined)
        ptr = self.slots.active()
        slots = SLOT_NAMES if lost else ((ptr.slot,) if ptr else ())
        try:
            self.floors.merge(self._signed_versions(slots))
        except OSError as e:  # a full disk must not stop serving; retried at next start
            log.error("cannot write %s: %s", self.floors.path, e)

    def _recover_active(self) -> LoadedModel | None:
        """No valid ``active.json``: serve the slot that verifies (signature and files)
        and passes its smoke test, with the highest version the floor allows."""
        candidates: list[tuple[int, str, Manifest]] = []
        for slot in SLOT_NAMES:
            if self.slots.manifest(slot) is None:
                continue
            try:
                m = self.slots.verify(slot, self.trust)
            except Exception as e:  # noqa: BLE001
                log.warning("slot %s cannot serve: %s", slot, e)
                continue
            floor = self.floors.get(m.name)
            if floor is not None and m.version < floor:
                log.warning(
                    "slot %s holds %s v%s, below the floor v%s", slot, m.name, m.version, floor
                )
                continue
            candidates.append((m.version, slot, m))
        for version, slot, m in sorted(candidates, key=lambda c: (-c[0], c[1])):
            try:
                model = self.loader(self.slots.path(slot), slot, self.config.runtime_threads)
                run_smoke_test(model)
            except Exception as e:  # noqa: BLE001
                log.warning("slot %s fails its smoke test: %s", slot, e)
                continue
            try:
                self.slots.set_active(
                    ActivePointer(slot, m.name, version, None, None, self.clock())
                )
            except OSError as e:  # serve anyway; re-derived again at the next start
                log.error("cannot save the re-derived active pointer: %s", e)
            if self.state is not State.IDLE and self.record.slot == slot:
                # the interrupted update was staging into what now serves: abandon it
                failed = self.record.failed
                self.record = UpdateRecord(failed=failed)
                save_record(self.record_file, self.record)
            self._report_health(
                "active_pointer_rederived",
                f"the active pointer was missing or invalid; serving slot "
                f"{slot} ({m.name} v{version}), the highest verified version "
                "the anti-rollback floor allows",
            )
            self.host.swap(model)
            return model
        if candidates or any(self.slots.manifest(s) is not None for s in SLOT_NAMES):
            log.error("no slot holds a verified bundle the floor allows; install a bundle")
        return None

    def _report_quarantined(self) -> None:
        notes = self._quarantined + self.slots.quarantined + self.floors.quarantined
        self._quarantined, self.slots.quarantined, self.floors.quarantined = [], [], []
        for q in notes:
            self._report_health(
                "state_file_invalid",
                f"{q.file} was invalid ({q.reason}); moved aside to {q.moved_to} and the "
                "agent continued from the safest state. No action is needed",
                state_file=q.to_report(),
            )

    def report_health(self, code: str, message: str, **extra: Any) -> None:
        """Report a degraded health event (``code``, ``message``) to the server and the
        telemetry store; for what the agent recovered from by itself."""
        self._report_health(code, message, **extra)

    def _report_health(self, code: str, message: str, **extra: Any) -> None:
        """A health report (degraded, with ``code``) to the server and the telemetry store."""
        ptr = self.slots.active()
        body: dict[str, Any] = {
            "type": "health",
            "health": "degraded",
            "error_code": code,
            "message": message[:3900],
            "ts": self.clock(),
            "name": ptr.name if ptr else None,
            "version": ptr.version if ptr else None,
            "state": self.record.state,
            **extra,
        }
        self._report_event(body, post=True)

    def check(self) -> State:
        """Check in for the assignment and act on it (returns the resting state).

        A candidate on probation keeps checking in: when the server now assigns something
        else (its rollout was rolled back, or moved on), probation ends without committing
        and the new assignment is acted on at once, instead of after the probation period.
        """
        self.lock()
        self._flush_reports()
        if self.state is not State.IDLE:
            state = self.tick()
            if state is not State.PROBATION or not self._superseded():
                return state
            self._run(transition(State.PROBATION, Event.SUPERSEDED))
        return self._run(transition(State.IDLE, Event.CHECK))

    def _superseded(self) -> bool:
        """True when the server assigns other than the candidate on probation."""
        t = self.record.target
        if self.fetcher is None or t is None or self.record.local or self.record.mode != "install":
            return False
        try:
            assignment, _ = self.fetcher.get_assignment(None)
        except (ServerUnavailableError, AssignmentError) as e:
            log.info("check-in during probation failed", extra={"error_code": e.code})
            return False
        desired = assignment.desired if assignment is not None else None
        if desired is None or (desired.name, desired.version, desired.sha256) == (
            t.name,
            t.version,
            t.sha256,
        ):
            return False
        log.warning(
            "the server assigns another model during probation; ending probation",
            extra={
                "model": t.name,
                "model_version": t.version,
                "assigned_version": desired.version,
            },
        )
        return True

    def install_file(self, path: str | Path, *, probation: bool = True) -> State:
        """Verify, stage, smoke-test and switch to the bundle file at ``path``."""
        self.lock()
        if self.state is not State.IDLE:
            raise UpdateBusyError(
                f"an update is in progress (state {self.state.value}); let it finish first"
            )
        t, ptr = self.record.target, self.slots.active()
        if (
            t is not None
            and ptr is not None
            and (ptr.name, ptr.version) == (t.name, t.version)
            and t.sha256 == sha256_file(Path(path))
        ):
            log.info("bundle is already installed and active", extra={"slot": ptr.slot})
            return self.state
        self.record.begin("install", None, self.clock())
        self.record.bundle_path = str(Path(path).resolve())
        self.record.local = True
        self.record.probation = probation
        return self._run(transition(State.IDLE, Event.INSTALL_LOCAL))

    def rollback(self) -> State:
        """Switch back to the previous slot, if it holds a verified bundle."""
        self.lock()
        if self.state is not State.IDLE:
            raise UpdateBusyError(
                f"an update is in progress (state {self.state.value}); let it finish first"
            )
        ptr = self.slots.active()
        if ptr is None or ptr.previous is None:
            raise RollbackUnavailableError(
                "no previous slot to roll back to: only one model was ever installed here, "
                "or the previous one was discarded after a failed update"
            )
        try:
            manifest = self.slots.verify(ptr.previous, self.trust)
        except BundleError as e:
            raise RollbackUnavailableError(
                f"previous slot {ptr.previous!r} does not hold a verified bundle "
                f"({type(e).__name__}: {e}); install a bundle instead"
            ) from e
        self.record.begin("manual_rollback", None, self.clock())
        self.record.target = BundleRef(
            f"slot-{ptr.previous}", manifest.name, manifest.version, "", "0" * 64, 0
        )
        self.record.slot, self.record.from_slot = ptr.slot, ptr.previous
        return self._run(transition(State.IDLE, Event.ROLLBACK_REQUESTED))

    def tick(self) -> State:
        """Continue a waiting state (probation); a no-op when idle."""
        self.lock()
        if self.state is State.IDLE:
            return self.state
        return self._run(restart_state(self.state))

    def status(self) -> dict[str, Any]:
        return read_status(self.state_dir)

    # -- the engine ----------------------------------------------------------------
    def _run(self, step: Step) -> State:
        while True:
            self.record.state = step.state.value
            if not self._persist(step.state):
                return State.IDLE
            self.history.append(step.state.value)
            self._crash_point(step.state.value)
            event: Event | None = None
            for action in step.actions:
                try:
                    ev = self._ACTIONS[action](self)
                except Exception as e:  # noqa: BLE001 - the boundary: see _contain
                    ev = self._contain(step.state, action, e)
                    if step.state in FAILURE_EVENTS:
                        event = ev
                        break
                if ev is not None:
                    event = ev
            self._crash_point(f"{step.state.value}.after")
            if event is None:
                return step.state
            step = transition(step.state, event)

    def _persist(self, state: State) -> bool:
        """Save ``update.json`` before the state's work. If the disk refuses (full), a
        candidate's attempt is refused (``no_space``) before its work starts and the
        machine rests in idle; later states (switch, probation, rollback, outcomes)
        are idempotent on restart, so they go on and are saved when space returns."""
        try:
            save_record(self.record_file, self.record)
            return True
        except OSError as e:
            code = error_code(e)
            log.error(
                "cannot save update state",
                extra={"state": state.value, "error_code": code, "error": str(e)},
            )
            if state not in CANDIDATE_STATES:
                return True
            reason = str(e)
        self._free_download_space()
        t = self.record.target
        self.record.error = {
            "code": code,
            "message": f"cannot save update state {state.value!r} ({reason}); the update was "
            "refused before it changed anything and is retried at the next check. Free "
            "disk space on the device",
        }
        body: dict[str, Any] = {
            "type": "install",
            "outcome": "failed",
            "name": t.name if t else None,
            "version": t.version if t else None,
            "bundle_id": t.bundle_id if t else None,
            "error_code": code,
            "message": self.record.error["message"],
            "state": state.value,
            "ts": self.clock(),
            "rollout_id": self.record.rollout_id,
            "shadow": self.record.mode == "shadow",
        }
        if state is not State.CHECKING:
            self._report_event(body)
        self.record.state = State.IDLE.value
        return False

    def _contain(self, state: State, action: Action, e: Exception) -> Event | None:
        """The boundary around everything done to a candidate.

        An exception an action did not handle itself, of any type, becomes a
        refusal with a code (:func:`error_code`; ``internal_error`` naming the
        exception's type when nothing more specific fits). In a working state the
        step fails with that state's failure event (:data:`FAILURE_EVENTS`), so
        the machine reports and returns to idle with the serving model untouched.
        In an outcome state the outcome is already decided: the error is logged
        and the remaining actions still run.
        """
        code = error_code(e)
        log.error(
            "update action failed",
            exc_info=e,
            extra={"state": state.value, "action": action.value, "error_code": code},
        )
        if code == "no_space":
            self._free_download_space()
        failure = FAILURE_EVENTS.get(state)
        if failure is None:
            return Event.REPORTED if action is Action.REPORT else None
        message = (
            str(e) if isinstance(e, (BundleError, UpdateError)) else f"{type(e).__name__}: {e}"
        )
        if code == "no_space":
            message = (
                f"{message}; the update was refused for lack of disk space and will be "
                "retried at the next check. Free space on the device's state directory"
            )
        self._fail(RuntimeError(message), code)
        return failure

    def _free_download_space(self) -> None:
        """After ENOSPC: drop partial downloads so serving and telemetry keep their space."""
        if self.downloads.exists():
            for p in self.downloads.iterdir():
                with contextlib.suppress(OSError):
                    p.unlink()

    def _crash_point(self, name: str) -> None:
        if self.crash_at == name:
            os.kill(os.getpid(), signal.SIGKILL)

    def _now(self) -> datetime:
        """The device clock as an aware datetime (bundle expiry is judged against it)."""
        return datetime.fromtimestamp(self.clock(), timezone.utc)

    def _fail(self, e: BaseException, code: str | None = None) -> None:
        found = error_code(e)
        if found == "no_space" or not code:
            code = found
        if code == "no_space":  # whatever was downloaded must not hold the space
            self._free_download_space()
        self.record.error = {"code": code, "message": str(e)}
        log.warning(
            "update step failed",
            extra={
                "state": self.record.state,
                "error_code": self.record.error["code"],
                "error": str(e),
            },
        )

    # -- actions ---------------------------------------------------------------------
    def _fetch_assignment(self) -> Event:
        if self.fetcher is None:
            return Event.NO_CHANGE
        try:
            assignment, etag = self.fetcher.get_assignment(self.record.etag)
        except (ServerUnavailableError, AssignmentError) as e:
            log.warning("check-in failed", extra={"error": str(e), "error_code": e.code})
            return Event.CHECK_FAILED
        if assignment is None:
            return Event.NO_CHANGE
        if assignment.telemetry and self.on_telemetry_policy is not None:
            try:
                self.on_telemetry_policy(assignment.telemetry)
            except ValueError as e:
                log.warning("telemetry policy from the server ignored", extra={"error": str(e)})
        event = self._decide(assignment)
        if event is Event.NO_CHANGE:
            self.record.etag = etag  # fully handled: only now may the server answer 304
        return event

    def _decide(self, a: Assignment) -> Event:
        ptr = self.slots.active()
        desired = a.desired
        if desired is not None and not (
            ptr and (ptr.name, ptr.version) == (desired.name, desired.version)
        ):
            if desired.key in self.record.failed:
                log.info(
                    "assigned bundle failed before; not retrying",
                    extra={
                        "bundle_id": desired.bundle_id,
                        "error_code": self.record.failed[desired.key],
                    },
                )
            else:
                self._begin("install", desired, a)
                return Event.UPDATE_AVAILABLE
        shadow, current = a.shadow, self.slots.shadow()
        if shadow is None and current is not None:
            self.host.set_shadow(None)
            self.slots.set_shadow(None)
        elif (
            shadow is not None
            and (current is None or current.get("sha256") != shadow.sha256)
            and shadow.key not in self.record.failed
        ):
            self._begin("shadow", shadow, a)
            return Event.SHADOW_AVAILABLE
        return Event.NO_CHANGE

    def _begin(self, mode: str, ref: BundleRef, a: Assignment) -> None:
        self.record.begin(mode, ref, self.clock())
        # what the device runs is about to change: the assignment it last handled fully
        # no longer describes it, so the next check must not be answered "unchanged"
        # (an assignment named by its content repeats when a rollback instructs an
        # earlier release again)
        self.record.etag = None
        self.record.rollout_id = a.rollout_id
        if self.downloads.exists():  # parts of bundles no longer assigned
            for p in self.downloads.iterdir():
                if not p.name.startswith(ref.bundle_id + "."):
                    p.unlink(missing_ok=True)
        log.info(
            "update available",
            extra={
                "mode": mode,
                "bundle_id": ref.bundle_id,
                "model": ref.name,
                "model_version": ref.version,
            },
        )

    def _download(self) -> Event:
        assert self.fetcher is not None and self.record.target is not None
        try:
            path = self.fetcher.download(
                self.record.target, self.downloads, self.config.max_bundle_bytes
            )
        except DownloadError as e:
            self._fail(e)
            return Event.DOWNLOAD_ERROR
        self.record.bundle_path = str(path)
        return Event.DOWNLOADED

    def _verify(self) -> Event:
        path = Path(self.record.bundle_path or "")
        try:
            v = verify_file(
                path,
                self.trust,
                now=self._now(),
                installed_version=self._installed_floor(),
                expect=self._expect(),
            )
        except BundleError as e:
            self._fail(e)
            return Event.REFUSED
        except OSError as e:
            self._fail(e, "unreadable")
            return Event.REFUSED
        m, t = v.manifest, self.record.target
        floor = self.floors.get(m.name) if self.version_floor else None
        if floor is not None and m.version < floor:
            self._fail(
                RollbackError(
                    f"bundle {m.name} v{m.version} is older than this device's anti-rollback "
                    f"floor v{floor} for {m.name}; devices refuse downgrades. To go back to an "
                    "older model, publish it again under a new, higher version"
                )
            )
            return Event.REFUSED
        if t is None:  # a local file: describe it for reports
            self.record.target = BundleRef(
                "local", m.name, m.version, path.as_uri(), sha256_file(path), path.stat().st_size
            )
        elif (t.name, t.version) != (m.name, m.version):
            self._fail(
                ValueError(
                    f"the assignment names {t.name} v{t.version} but the bundle is "
                    f"{m.name} v{m.version}"
                ),
                "assignment_mismatch",
            )
            return Event.REFUSED
        ptr = self.slots.active()
        self.record.from_slot = ptr.slot if ptr else None
        self.record.slot = self.slots.other(self.record.from_slot)
        return Event.VERIFIED

    def _expect(self) -> Expectation:
        """What the bundle must be for: the active model's name (unless an operator installs
        a file locally), this device's class, the per-name floors, one content per version."""
        ptr = self.slots.active()
        return expectation(
            slots_root=self.slots.root,
            model_name=self.model_name
            or (ptr.name if ptr is not None and not self.record.local else None),
            device_class=self.device_class,
            floors=self.floors.all() if self.version_floor else {},
        )

    def _installed_floor(self) -> int | None:
        return self.slots.installed_version() if self.version_floor else None

    def _discard_staged(self) -> None:
        slot = self.record.slot
        if slot is None:
            return
        ptr = self.slots.active()
        if ptr is not None and ptr.slot == slot:
            return  # never touch the active slot
        info = self.slots.shadow()
        if info is not None and info.get("slot") == slot:
            self.host.set_shadow(None)
            self.slots.set_shadow(None)
        if ptr is not None and ptr.previous == slot:
            self.slots.set_active(
                ActivePointer(ptr.slot, ptr.name, ptr.version, None, None, ptr.switched_at)
            )
        self._staged = None
        self.slots.clean_leftovers()
        self.slots.discard(slot)

    def _stage(self) -> Event:
        assert self.record.slot is not None
        self._compare_with(None)  # the slot being written may hold the replaced model
        try:
            unpack_bundle(
                self.record.bundle_path or "",
                self.slots.path(self.record.slot),
                self.trust,
                now=self._now(),
                installed_version=self._installed_floor(),
                expect=self._expect(),
            )
        except StagingError as e:
            self._fail(e)
            return Event.STAGE_ERROR
        except BundleError as e:
            self._fail(e)
            return Event.REFUSED
        return Event.STAGED

    def _load_staged(self) -> LoadedModel:
        assert self.record.slot is not None
        if self._staged is None or self._staged.slot != self.record.slot:
            self._staged = self.loader(
                self.slots.path(self.record.slot), self.record.slot, self.config.runtime_threads
            )
        return self._staged

    def _smoke_test(self) -> Event:
        try:
            report = run_smoke_test(self._load_staged())
        except Exception as e:  # noqa: BLE001 - load or run failure: the bundle is unfit
            self._staged = None
            self._fail(e, getattr(e, "code", "model_load_failed"))
            return Event.SMOKE_ERROR
        log.info("smoke test passed", extra={"slot": self.record.slot, "smoke": report})
        return Event.SMOKE_PASSED_SHADOW if self.record.mode == "shadow" else Event.SMOKE_PASSED

    def _load_shadow(self) -> Event:
        t = self.record.target
        assert t is not None and self.record.slot is not None
        try:
            model = self._load_staged()
        except Exception as e:  # noqa: BLE001
            self._fail(e, "model_load_failed")
            return Event.SMOKE_ERROR
        self.slots.set_shadow(
            {
                "slot": self.record.slot,
                "name": t.name,
                "version": t.version,
                "sha256": t.sha256,
                "bundle_id": t.bundle_id,
            }
        )
        self.host.set_shadow(model)
        return Event.SHADOW_LOADED

    def _switch(self) -> Event:
        slot = self.record.slot
        assert slot is not None
        try:
            model = self._load_staged()
        except Exception as e:  # noqa: BLE001
            self._fail(e, "model_load_failed")
            return Event.SWITCH_ERROR
        ptr = self.slots.active()
        if ptr is None or ptr.slot != slot:  # not yet switched (else: a crash after the write)
            self.slots.set_active(
                ActivePointer(
                    slot,
                    model.name,
                    model.version,
                    ptr.slot if ptr else None,
                    ptr.version if ptr else None,
                    self.clock(),
                )
            )
        old = self.host.swap(model)
        if (
            isinstance(old, LoadedModel)
            and old.name == model.name
            and old.version != model.version
            and getattr(self.host, "compares_previous", False)
        ):
            self._compare_with(old)  # judged against the model it replaces, on the device
        self.record.probation_started = self.clock()
        log.info(
            "switched", extra={"slot": slot, "model": model.name, "model_version": model.version}
        )
        return Event.SWITCHED

    def _watch_probation(self) -> Event | None:
        if not self.record.probation:  # a local install asked for no probation
            return self._passed()
        started = self.record.probation_started
        if started is None:
            started = self.record.probation_started = self.clock()
        cfg = self.config
        n, errors = self.error_rate_since(started) if self.error_rate_since else (0, 0)
        if n >= cfg.probation_min_predictions and n and errors / n > cfg.probation_max_error_rate:
            self._fail(
                RuntimeError(
                    f"error rate {errors / n:.1%} over {n} predictions exceeds "
                    f"update.probation_max_error_rate {cfg.probation_max_error_rate:.1%}"
                ),
                "probation_failed",
            )
            return Event.PROBATION_ERROR
        if self.clock() - started < cfg.probation_seconds:
            return None
        try:  # a last smoke check before committing: the slot's files and the model's outputs
            assert self.record.slot is not None
            self.slots.verify(self.record.slot, None)
            run_smoke_test(self._load_staged())
        except Exception as e:  # noqa: BLE001
            self._staged = None
            self._fail(
                RuntimeError(f"final smoke check failed: {e}"),
                getattr(e, "code", "smoke_test_failed"),
            )
            return Event.PROBATION_ERROR
        return self._passed()

    def _passed(self) -> Event:
        """Probation passed: the target's version becomes its name's floor."""
        t = self.record.target
        if t is not None and self.record.mode != "shadow":
            self.floors.raise_to(t.name, t.version)
        return Event.PROBATION_PASSED

    def _roll_back(self) -> Event:
        back, ptr = self.record.from_slot, self.slots.active()
        manual = self.record.mode == "manual_rollback"
        if back is None or self.slots.manifest(back) is None:
            msg = "no previous model to fall back to; the new model keeps serving"
            self.record.error = {
                **(self.record.error or {"code": "rollback"}),
                "message": f"{(self.record.error or {}).get('message', '')}; {msg}".lstrip("; "),
            }
            return Event.ROLLED_BACK
        model = self.loader(self.slots.path(back), back, self.config.runtime_threads)
        if ptr is None or ptr.slot != back:
            keep = ptr.slot if (manual and ptr) else None  # a failed slot is no way forward
            self.slots.set_active(
                ActivePointer(
                    back,
                    model.name,
                    model.version,
                    keep,
                    ptr.version if (keep and ptr) else None,
                    self.clock(),
                )
            )
        self.host.swap(model)
        log.warning(
            "rolled back", extra={"slot": back, "model": model.name, "model_version": model.version}
        )
        return Event.ROLLED_BACK

    def _discard_download(self) -> None:
        p = self.record.bundle_path
        if p and Path(p).parent == self.downloads:
            Path(p).unlink(missing_ok=True)

    def _remember_failed(self) -> None:
        t = self.record.target
        if t is None or self.record.mode == "manual_rollback":
            return
        failed = self.record.failed
        failed[t.key] = (self.record.error or {}).get("code", "failed")
        while len(failed) > MAX_REMEMBERED_FAILURES:
            failed.pop(next(iter(failed)))

    def _report(self) -> Event:
        state, t, err = self.state, self.record.target, self.record.error or {}
        body: dict[str, Any] = {
            "type": "install",
            "outcome": OUTCOMES.get(state, "failed"),
            "name": t.name if t else None,
            "version": t.version if t else None,
            "bundle_id": t.bundle_id if t else None,
            "error_code": err.get("code"),
            "message": err.get("message", "")[:2000],
            "state": state.value,
            "ts": self.clock(),
            "rollout_id": self.record.rollout_id,
            "shadow": self.record.mode == "shadow",
        }
        if self.record.mode == "manual_rollback":
            body["message"] = body["message"] or "rolled back by operator"
        ptr = self.slots.active()
        if state is State.ROLLED_BACK and ptr is not None:
            # name/version say what the device runs now; the failed bundle is named beside
            if t is not None and self.record.mode != "manual_rollback":
                body["rolled_back_from"] = {
                    "name": t.name,
                    "version": t.version,
                    "bundle_id": t.bundle_id,
                }
            body.update(name=ptr.name, version=ptr.version, bundle_id=None)
        self._report_event(body)
        return Event.REPORTED

    def _report_event(self, body: dict[str, Any], *, post: bool | None = None) -> None:
        """Store ``body`` as a telemetry event and post it to the server (at least once:
        a report the server did not take is sent again before the next check-in)."""
        self.reports.append(body)
        log.info("update outcome", extra={"report": body})
        if self.events is not None:
            try:
                self.events.append("event", body, body["ts"])
            except Exception as e:  # noqa: BLE001 - a full store must not block updates
                log.error("cannot store install report: %s", e)
        if post is None:
            post = not self.record.local
        if self.fetcher is not None and post:
            self._unsent.append(body)
            self._flush_reports()

    def _flush_reports(self) -> None:
        if self.fetcher is None or not self._unsent:
            return
        try:
            self.fetcher.post_reports(list(self._unsent))
        except ServerUnavailableError as e:
            log.warning(
                "reports not delivered; retrying at the next check",
                extra={"error": str(e), "pending": len(self._unsent)},
            )
            del self._unsent[:-MAX_UNSENT_REPORTS]
            return
        except Exception as e:  # noqa: BLE001 - reporting must never stop an update
            log.error("reports not delivered: %s", e)
            return
        self._unsent.clear()

    def _load_active(self) -> LoadedModel | None:
        """Serve the active slot after checking its files; fall back to the previous slot."""
        ptr = self.slots.active()
        if ptr is None:
            return self._recover_active()
        for slot in (ptr.slot, ptr.previous):
            if slot is None:
                continue
            try:
                self.slots.verify(slot, None)
                model = self.loader(self.slots.path(slot), slot, self.config.runtime_threads)
            except Exception as e:  # noqa: BLE001 - try the other slot rather than stop
                log.error(
                    "slot %s is not fit to serve: %s",
                    slot,
                    e,
                    extra={"slot": slot, "error_code": getattr(e, "code", None)},
                )
                continue
            if slot != ptr.slot:
                self.slots.set_active(
                    ActivePointer(slot, model.name, model.version, None, None, self.clock())
                )
                self._report_event(
                    {
                        "type": "install",
                        "outcome": "rolled_back",
                        "name": model.name,
                        "version": model.version,
                        "bundle_id": None,
                        "error_code": "active_slot_corrupt",
                        "message": f"slot {ptr.slot} ({ptr.name} v{ptr.version}) failed its "
                        f"integrity check at boot; serving slot {slot}",
                        "state": "idle",
                        "ts": self.clock(),
                        "rollout_id": None,
                        "shadow": False,
                    }
                )
            self.host.swap(model)
            return model
        log.error("no slot is fit to serve; install a bundle (edgefleet-agent install)")
        return None

    _ACTIONS: dict[Action, Callable[[Updater], Event | None]] = {
        Action.FETCH_ASSIGNMENT: _fetch_assignment,
        Action.DOWNLOAD: _download,
        Action.VERIFY: _verify,
        Action.STAGE: _stage,
        Action.SMOKE_TEST: _smoke_test,
        Action.LOAD_SHADOW: _load_shadow,
        Action.SWITCH: _switch,
        Action.WATCH_PROBATION: _watch_probation,
        Action.ROLL_BACK: _roll_back,
        Action.DISCARD_DOWNLOAD: _discard_download,
        Action.DISCARD_STAGED: _discard_staged,
        Action.REMEMBER_FAILED: _remember_failed,
        Action.REPORT: _report,
    }


def error_code(e: BaseException) -> str:
    """The refusal code for ``e``: ``no_space`` when a full disk is anywhere in its
    cause chain, else the code its class declares, else ``internal_error``."""
    seen: BaseException | None = e
    depth = 0
    while seen is not None and depth < 16:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return "no_space"
        if isinstance(seen, sqlite3.OperationalError) and "full" in str(seen):
            return "no_space"
        seen, depth = seen.__cause__ or seen.__context__, depth + 1
    code = getattr(e, "code", None)
    if isinstance(e, (BundleError, UpdateError)) and isinstance(code, str):
        return code
    return "internal_error"


def read_status(state_dir: str | Path) -> dict[str, Any]:
    """The update path's state as stored on disk; takes no lock, changes nothing."""
    state_dir = Path(state_dir)
    slots, record = Slots(state_dir), load_record(state_dir / "update.json")
    ptr = slots.active()
    contents = {}
    for s in ("a", "b"):
        m = slots.manifest(s)
        contents[s] = {"name": m.name, "version": m.version} if m else None
    return {
        "state": record.state,
        "active": ptr.to_json() if ptr else None,
        "slots": contents,
        "shadow": slots.shadow(),
        "target": record.target.to_json() if record.target else None,
        "error": record.error,
        "failed_bundles": dict(record.failed),
        "floors": Floors(state_dir).all(),
    }
