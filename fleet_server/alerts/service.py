"""The alert evaluator: every N seconds, each enabled rule's figure, state and transition.

Each round, for each enabled rule (:mod:`.rules` decides, this module does the I/O):

1. the group's current devices (:func:`~fleet_server.registry.groups.group_members`);
2. the rule's figure over its window (:mod:`.figures`);
3. :func:`~.rules.step`: the new state and the transition, if any;
4. the new state is stored only if the stored one is still the one read (a
   compare-and-set on ``alert_states.revision``): with several replicas evaluating,
   exactly one records each transition;
5. a transition becomes an ``alert_events`` row (the webhook delivery queue, see
   :mod:`.webhook`) and an audit entry, in the same transaction as the state;
6. the figure and the firing flag go to the server's /metrics.

One rule failing (a database error, a bad figure) is logged and does not stop the others.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from fleet_server import audit
from fleet_server.alerts.figures import figure_for
from fleet_server.alerts.payload import alert_payload
from fleet_server.alerts.prometheus import window_label
from fleet_server.alerts.rules import Figure, Kind, Rule, RuleState, Status, Transition, judge, step
from fleet_server.db.alerts import AlertEvent, AlertRule, AlertState
from fleet_server.db.models import Device, Group
from fleet_server.metrics import ServerMetrics
from fleet_server.registry.groups import group_members

log = logging.getLogger(__name__)

#: the audit log's actor for alerts the server raises on its own
ALERT_ACTOR = "system:alerts"


def to_rule(row: AlertRule, group_name: str) -> Rule:
    """The pure rule of a stored row."""
    return Rule(
        id=row.id,
        name=row.name,
        kind=Kind(row.kind),
        group=group_name,
        model=row.model,
        threshold=row.threshold,
        clear_threshold=row.clear_threshold,
        window_seconds=row.window_seconds,
        for_seconds=row.for_seconds,
        min_samples=row.min_samples,
        webhooks=tuple(row.webhooks or ()),
    )


def load_rules(session: Session, *, enabled_only: bool = False) -> list[Rule]:
    """Every stored rule (ordered by name) as pure rules."""
    stmt = select(AlertRule, Group.name).join(Group, Group.id == AlertRule.group_id)
    if enabled_only:
        stmt = stmt.where(AlertRule.enabled.is_(True))
    return [to_rule(r, g) for r, g in session.execute(stmt.order_by(AlertRule.name))]


def _figure_labels(rule: Rule) -> tuple[str, str, str, str]:
    return (rule.kind.figure, rule.group, rule.model or "", window_label(rule.window_seconds))


def _firing_labels(rule: Rule) -> tuple[str, str, str, str]:
    return (rule.name, rule.kind.value, rule.group, rule.model or "")


class AlertEvaluator:
    """Runs rounds of rule evaluations, in a daemon thread or by :meth:`run_once`."""

    def __init__(
        self,
        engine: Engine,
        sessions: sessionmaker[Session],
        metrics: ServerMetrics,
        *,
        interval: float = 30.0,
        public_url: str = "",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.engine = engine
        self.sessions = sessions
        self.metrics = metrics
        self.interval = interval
        self.public_url = public_url
        self.clock = clock
        self.rounds = 0
        self._lock = threading.Lock()  # one round at a time (thread and API calls)
        #: label sets this evaluator exported, to drop those of rules gone since
        self._figures: set[tuple[str, str, str, str]] = set()
        self._firing: set[tuple[str, str, str, str]] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self, now: float | None = None) -> list[dict[str, Any]]:
        """One round over every enabled rule; the alerts it raised (webhook bodies)."""
        with self._lock:
            self.rounds += 1
            now = self.clock() if now is None else now
            with self.sessions() as s:
                rules = load_rules(s, enabled_only=True)
            members: dict[str, list[Device] | None] = {}  # each group's devices, once a round
            shared: dict[Any, dict[str, Any]] = {}  # model figures, once a round
            raised = []
            for rule in rules:
                try:
                    event = self._one(rule, now, members, shared)
                except Exception:
                    log.exception(
                        "alert rule %s: evaluation failed; retrying next round", rule.name
                    )
                    continue
                if event is not None:
                    raised.append(event)
            self._forget_others(rules)
            return raised

    def _one(
        self,
        rule: Rule,
        now: float,
        members: dict[str, list[Device] | None],
        shared: dict[Any, dict[str, Any]],
    ) -> dict[str, Any] | None:
        with self.sessions() as s:
            if rule.group not in members:
                group = s.scalar(select(Group).where(Group.name == rule.group))
                members[rule.group] = None if group is None else group_members(s, group)
            devices = members[rule.group]
            if devices is None:  # deleted meanwhile (its rules go with it)
                return None
            row = s.get(AlertState, rule.id)
            if row is None:
                row = self._create_state(s, rule.id)
            state = RuleState(
                status=Status(row.status),
                since=row.since,
                value=row.value,
                evaluated_at=row.evaluated_at,
                no_data=row.no_data,
            )
            figure, memo = figure_for(
                rule, s, self.engine, devices, now, dict(row.memo or {}), shared
            )
            new, transition = step(rule, state, figure, now)
            done = s.execute(
                update(AlertState)
                .where(AlertState.rule_id == rule.id, AlertState.revision == row.revision)
                .values(
                    status=new.status.value,
                    since=new.since,
                    value=new.value,
                    evaluated_at=new.evaluated_at,
                    no_data=new.no_data,
                    memo=memo,
                    revision=row.revision + 1,
                )
                .execution_options(synchronize_session=False)
            )
            if getattr(done, "rowcount", 0) != 1:
                s.rollback()
                log.info("alert rule %s: evaluated meanwhile elsewhere; dropping", rule.name)
                return None
            payload = None
            if transition is not None:
                payload = self._record(s, rule, transition, judge(rule, figure), now)
            s.commit()
        self._export(rule, judge(rule, figure), new)
        return payload

    @staticmethod
    def _create_state(s: Session, rule_id: str) -> AlertState:
        s.add(AlertState(rule_id=rule_id, status=Status.ok.value, memo={}, revision=0))
        try:
            s.commit()
        except IntegrityError:  # another replica created it first
            s.rollback()
        row = s.get(AlertState, rule_id)
        assert row is not None
        return row

    def _record(
        self, s: Session, rule: Rule, transition: Transition, figure: Figure, now: float
    ) -> dict[str, Any]:
        samples = int(figure.details.get("samples_stored") or 0)
        payload = alert_payload(
            rule, transition, figure, now, public_url=self.public_url, samples=samples
        )
        event = AlertEvent(
            rule_id=rule.id,
            rule_name=rule.name,
            kind=rule.kind.value,
            group_name=rule.group,
            model=rule.model,
            status=transition.value,
            ts=now,
            value=payload["value"],
            threshold=rule.threshold,
            window_start=now - rule.window_seconds,
            window_end=now,
            payload=payload,
            webhooks=list(rule.webhooks),
            delivery="pending" if rule.webhooks else "none",
            attempts=0,
            next_attempt_at=self.clock() if rule.webhooks else None,  # due at once
        )
        s.add(event)
        s.flush()
        audit.record(
            s,
            actor=ALERT_ACTOR,
            action=f"alert.{transition.value}",
            target_type="alert_rule",
            target_id=rule.id,
            details={
                "event_id": event.id,
                "rule": rule.name,
                "kind": rule.kind.value,
                "group": rule.group,
                "model": rule.model,
                "value": payload["value"],
                "threshold": rule.threshold,
                "clear_threshold": rule.clear_threshold,
                "window": payload["window"],
                "samples": payload["samples"],
                "webhooks": len(rule.webhooks),
            },
        )
        self.metrics.audit_entries.inc()
        log.warning(
            "alert %s %s: %s of %s = %s (threshold %s)",
            rule.name,
            transition.value,
            rule.kind.figure,
            rule.group,
            payload["value"],
            rule.threshold,
        )
        return {"id": event.id, **payload}

    def _forget_others(self, rules: list[Rule]) -> None:
        """Drop the /metrics series of rules deleted, disabled or changed since."""
        figures = {_figure_labels(r) for r in rules}
        firing = {_firing_labels(r) for r in rules}
        for labels in self._figures - figures:
            with contextlib.suppress(KeyError):
                self.metrics.alert_figure.remove(*labels)
        for labels in self._firing - firing:
            with contextlib.suppress(KeyError):
                self.metrics.alert_firing.remove(*labels)
        self._figures &= figures
        self._firing &= firing

    def _export(self, rule: Rule, figure: Figure, state: RuleState) -> None:
        labels = _figure_labels(rule)
        if figure.value is None:
            with contextlib.suppress(KeyError):  # not exported yet
                self.metrics.alert_figure.remove(*labels)
        else:
            self.metrics.alert_figure.labels(*labels).set(figure.value)
            self._figures.add(labels)
        firing = 1.0 if state.status is Status.firing else 0.0
        self.metrics.alert_firing.labels(*_firing_labels(rule)).set(firing)
        self._firing.add(_firing_labels(rule))

    # -- background thread ---------------------------------------------------------

    def start(self) -> AlertEvaluator:
        """Run :meth:`run_once` every ``interval`` seconds in a daemon thread."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="alert-evaluator", daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.run_once()
            except Exception:  # a database outage must not kill the loop
                log.exception("alert round failed; retrying")

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None


__all__ = ["ALERT_ACTOR", "AlertEvaluator", "load_rules", "to_rule"]
