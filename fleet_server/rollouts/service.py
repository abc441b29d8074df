"""The I/O shell around the rollout engine (:mod:`fleet_server.rollouts`).

* Stores :class:`~fleet_server.rollouts.RolloutSpec` / ``RolloutState`` as JSON
  columns; every state change is a compare-and-set on ``rollouts.revision``, so an
  operator action and the scheduler (or two replicas) never overwrite each other.
* Turns a rollout's state into per-device assignments with the engine's pure
  :func:`~fleet_server.rollouts.assignment`, for every member of the target group.
  A device belongs to the newest rollout whose group selects it; devices that
  enroll or get relabelled later are synced on that event.
* Re-publishes the previous bundle for rollbacks under a version the devices'
  anti-rollback rule accepts (``spec.rollback_version()``), signed with the
  server key, and registers it like any other bundle.
* Implements the scheduler's :class:`~fleet_server.rollouts.scheduler.RolloutRepository`.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from fleet_server import audit
from fleet_server.assignments.document import AssignmentChange, AssignmentWriter
from fleet_server.db.models import Assignment, Bundle, Device, Group, Rollout
from fleet_server.db.types import utcnow
from fleet_server.errors import ConflictError, NotFoundError
from fleet_server.metrics import ServerMetrics
from fleet_server.registry.bundles import BundleRegistry
from fleet_server.registry.groups import matches
from fleet_server.rollouts import (
    BundleRef,
    CohortMetrics,
    Decision,
    RolloutError,
    RolloutSpec,
    RolloutState,
    assignment,
)
from fleet_server.rollouts import engine as rengine
from fleet_server.rollouts.cohort import with_bounds
from fleet_server.rollouts.figures import cohort_metrics
from fleet_server.rollouts.spec import Status

log = logging.getLogger(__name__)

ACTIVE = (Status.PENDING.value, Status.RUNNING.value)


def bundle_ref(b: Bundle) -> BundleRef:
    return BundleRef(b.id, b.name, b.version)


def load(row: Rollout) -> tuple[RolloutSpec, RolloutState]:
    return RolloutSpec.from_json(row.spec), RolloutState.from_json(row.state)


class RolloutService:
    """Creates rollouts, applies operator actions, keeps device assignments in step."""

    def __init__(
        self,
        assignments: AssignmentWriter,
        registry: BundleRegistry,
        *,
        rollback_by_release: bool = False,
    ) -> None:
        """``rollback_by_release``: devices run the Uptane chain (server setting
        ``uptane_dir``), so a rollback is the director naming the previous release again:
        nothing is re-published and no key signs anything."""
        self.assignments = assignments
        self.registry = registry
        self.rollback_by_release = rollback_by_release

    # -- assignments -----------------------------------------------------------
    def _owners(self, session: Session) -> list[tuple[Rollout, Group, str]]:
        """Rollouts with their groups and model names, newest first."""
        rows = session.execute(
            select(Rollout, Group, Bundle.name)
            .join(Group, Group.id == Rollout.group_id)
            .join(Bundle, Bundle.id == Rollout.bundle_id)
            .order_by(Rollout.created_at.desc(), Rollout.id.desc())
        ).all()
        return [(r, g, name) for r, g, name in rows]

    @staticmethod
    def _owner_of(
        device: Device, owners: list[tuple[Rollout, Group, str]], model: str
    ) -> Rollout | None:
        """The rollout that decides what ``model`` runs on ``device``: the newest rollout
        of that model whose group holds the device (each model has its own)."""
        for r, g, name in owners:
            if name == model and matches(
                g.selector or {}, g.device_class, device.labels or {}, device.device_class
            ):
                return r
        return None

    def _assign(
        self,
        session: Session,
        device_id: str,
        row: Rollout,
        loaded: tuple[RolloutSpec, RolloutState] | None = None,
    ) -> AssignmentChange | None:
        spec, state = loaded if loaded is not None else load(row)
        a = assignment(spec, state, device_id)
        return self.assignments.assign(
            session,
            device_id,
            desired_bundle_id=a.desired.bundle_id if a.desired else None,
            shadow_bundle_id=a.shadow.bundle_id if a.shadow else None,
            rollout_id=row.id if (a.desired or a.shadow) else None,
            stage=a.stage,
            # the rollout's model: a cohort left with nothing to run clears that model's
            # entry, not another one's
            model=spec.bundle.name,
        )

    def sync_rollout(self, session: Session, row: Rollout) -> list[AssignmentChange]:
        """Write the assignment of every device this rollout owns (unchanged ones are skipped)."""
        owners = self._owners(session)
        model = next((name for r, _g, name in owners if r.id == row.id), None)
        if model is None:
            return []
        devices = session.scalars(
            select(Device).where(Device.revoked_at.is_(None)).order_by(Device.id)
        ).all()
        # one query each fills the identity map, so assign() finds every row and bundle
        # without a query of its own; the session's identity map holds objects weakly, so
        # these lists keep them alive for the loop (without them, ten thousand devices
        # cost ten thousand round trips or more)
        held = session.scalars(select(Assignment).where(Assignment.model == model)).all()
        loaded = load(row)  # parsed once, not once per device
        spec, state = loaded
        owned = [d for d in devices if (o := self._owner_of(d, owners, model)) and o.id == row.id]
        fixed = with_bounds(spec, state, (d.id for d in owned))
        # a stage just began: its cohort's bound is fixed over the group as it is now
        # (raised to the stage's min_devices when the percent draws fewer), stored with
        # the state so every later sync, replica and evaluation draws the same. Lost to
        # a concurrent change, that change's own sync fixes it.
        if fixed is not state and self._cas(session, row, state, fixed):
            loaded = spec, state = spec, fixed
        refs = [spec.bundle, spec.previous, state.rollback_bundle]
        ids = {r.bundle_id for r in refs if r is not None}
        held_bundles = (
            session.scalars(select(Bundle).where(Bundle.id.in_(ids))).all() if ids else []
        )
        changes = []
        for d in owned:
            c = self._assign(session, d.id, row, loaded)
            if c is not None:
                changes.append(c)
        del held, held_bundles
        return changes

    def sync_device(self, session: Session, device: Device) -> list[AssignmentChange]:
        """Give a newly enrolled or relabelled device the assignment of each model from
        that model's rollout."""
        owners = self._owners(session)
        changes = []
        for model in dict.fromkeys(name for _r, _g, name in owners):
            owner = self._owner_of(device, owners, model)
            if owner is not None and (c := self._assign(session, device.id, owner)) is not None:
                changes.append(c)
        return changes

    # -- creation and operator actions ----------------------------------------
    def create(
        self,
        session: Session,
        *,
        actor: str,
        name: str,
        bundle: Bundle,
        group: Group,
        previous: Bundle | None,
        options: dict[str, Any],
    ) -> Rollout:
        """Validate the spec with the engine and store a pending rollout."""
        rid = f"r-{int(time.time() * 1000):x}{bundle.id[-4:]}"
        while session.get(Rollout, rid) is not None:
            rid += "x"
        spec_json: dict[str, Any] = {
            "rollout_id": rid,
            "bundle": bundle_ref(bundle).to_json(),
            "previous": bundle_ref(previous).to_json() if previous else None,
            "selector": dict(group.selector or {}),
            **{k: v for k, v in options.items() if v is not None},
        }
        spec = RolloutSpec.from_json(spec_json)  # raises InvalidSpecError
        now = utcnow()
        row = Rollout(
            id=rid,
            name=name,
            bundle_id=bundle.id,
            group_id=group.id,
            strategy=spec.strategy.value,
            status=Status.PENDING.value,
            spec=spec.to_json(),
            state=RolloutState().to_json(),
            revision=0,
            created_by=actor,
            created_at=now,
            updated_at=now,
        )
        session.add(row)
        audit.record(
            session,
            actor=actor,
            action="rollout.create",
            target_type="rollout",
            target_id=rid,
            details={"spec": spec.to_json(), "group": group.name},
        )
        return row

    def act(
        self,
        session: Session,
        row: Rollout,
        action: str,
        *,
        actor: str,
        reason: str = "",
        to_end: bool = False,
    ) -> list[AssignmentChange]:
        """Apply an operator action (start, pause, resume, promote, abort, rollback)."""
        spec, state = load(row)
        now = time.time()
        if action == "start":
            new = rengine.start(spec, state, now, actor)
        elif action == "pause":
            new = rengine.pause(spec, state, now, actor, reason)
        elif action == "resume":
            new = rengine.resume(spec, state, now, actor, reason)
        elif action == "promote":
            new = rengine.promote(spec, state, now, actor, reason, to_end=to_end)
        elif action == "abort":
            new = rengine.abort(spec, state, now, actor, reason)
        elif action == "rollback":
            new = rengine.rollback(
                spec, state, now, actor, self.prepare_rollback(session, spec), reason
            )
        else:
            raise NotFoundError(f"unknown rollout action {action!r}")
        if not self._cas(session, row, state, new):
            raise ConflictError(f"rollout {row.id} changed meanwhile; reload and retry")
        audit.record(
            session,
            actor=actor,
            action=f"rollout.{action}",
            target_type="rollout",
            target_id=row.id,
            details={
                "from_status": state.status.value,
                "to_status": new.status.value,
                "from_stage": state.stage,
                "to_stage": new.stage,
                "reason": reason,
                "rollback_bundle": new.rollback_bundle.to_json() if new.rollback_bundle else None,
            },
        )
        return self.sync_rollout(session, row)

    def _cas(
        self, session: Session, row: Rollout, expected: RolloutState, new: RolloutState
    ) -> bool:
        current = RolloutState.from_json(row.state)
        if current != expected:
            return False
        res = session.execute(
            update(Rollout)
            .where(Rollout.id == row.id, Rollout.revision == row.revision)
            .values(
                state=new.to_json(),
                status=new.status.value,
                revision=row.revision + 1,
                updated_at=utcnow(),
            )
            .execution_options(synchronize_session=False)
        )
        if res.rowcount != 1:  # type: ignore[attr-defined]
            return False
        session.expire(row)
        return True

    # -- rollback bundles -----------------------------------------------------------
    def prepare_rollback(self, session: Session, spec: RolloutSpec) -> BundleRef | None:
        """The previous model re-published at ``spec.rollback_version()`` (reused if present)."""
        if spec.previous is None:
            return None
        if self.rollback_by_release:
            prev = session.get(Bundle, spec.previous.bundle_id)
            if prev is None:
                raise NotFoundError(f"previous bundle {spec.previous.bundle_id} is gone")
            return bundle_ref(prev)
        version = spec.rollback_version()
        prev = session.get(Bundle, spec.previous.bundle_id)
        if prev is None:
            raise NotFoundError(f"previous bundle {spec.previous.bundle_id} is gone")
        # reuse a re-publication of this very model (same model file, same device
        # classes): a rollout per device class rolls back to its own class's model
        for existing in session.scalars(
            select(Bundle)
            .where(
                Bundle.name == spec.previous.name,
                Bundle.version >= version,
                Bundle.source == "rollback",
            )
            .order_by(Bundle.version)
        ):
            if _same_model(existing, prev):
                return bundle_ref(existing)
        key = self.registry.signing_key("rolling back (re-publishing the previous model)")
        from fleet_server.rollouts.republish import republish_bundle

        with tempfile.TemporaryDirectory(prefix="edgefleet-rollback-") as work:
            out = Path(work) / "rollback.efb"
            republish_bundle(
                prev.file_path,
                version=version,
                out=out,
                signing_key=key,
                trust=self.registry.trust_store(),
            )
            with open(out, "rb") as f:
                b = self.registry.accept(
                    session, f, uploaded_by=audit.SYSTEM_ACTOR, source="rollback"
                )
        return bundle_ref(b)


def _model_file_sha(b: Bundle) -> str | None:
    for f in (b.manifest or {}).get("files", []):
        if isinstance(f, dict) and f.get("role") == "model":
            return str(f.get("sha256"))
    return None


def _same_model(a: Bundle, b: Bundle) -> bool:
    """Whether ``a`` carries ``b``'s model for ``b``'s device classes."""
    return sorted(a.device_classes or []) == sorted(b.device_classes or []) and (
        _model_file_sha(a) == _model_file_sha(b) is not None
    )


class ServerRolloutRepository:
    """The scheduler's view of storage (see ``RolloutRepository``)."""

    def __init__(
        self,
        service: RolloutService,
        sessions: Callable[[], AbstractContextManager[Session]],
        metrics: ServerMetrics,
    ) -> None:
        self.service = service
        self.session = sessions
        self.metrics = metrics

    def active_rollouts(self) -> Sequence[tuple[RolloutSpec, RolloutState]]:
        with self.session() as s:
            rows = s.scalars(
                select(Rollout).where(Rollout.status.in_(ACTIVE)).order_by(Rollout.created_at)
            )
            out = []
            for r in rows:
                try:
                    out.append(load(r))
                except RolloutError:
                    log.exception("rollout %s has an unreadable spec or state", r.id)
            return out

    def cohort_metrics(self, spec: RolloutSpec, state: RolloutState, now: float) -> CohortMetrics:
        with self.session() as s:
            return cohort_metrics(s, spec, state, now)

    def prepare_rollback_bundle(self, spec: RolloutSpec) -> BundleRef | None:
        with self.session() as s:
            ref = self.service.prepare_rollback(s, spec)
            s.commit()
            return ref

    def save_state(self, spec: RolloutSpec, expected: RolloutState, new: RolloutState) -> bool:
        with self.session() as s:
            row = s.get(Rollout, spec.rollout_id)
            if row is None or not self.service._cas(s, row, expected, new):
                s.rollback()
                return False
            s.commit()
            return True

    def append_audit(self, decision: Decision) -> None:
        with self.session() as s:
            audit.record(
                s,
                actor=audit.SYSTEM_ACTOR,
                action=f"rollout.{decision.action.value}",
                target_type="rollout",
                target_id=decision.rollout_id,
                details=decision.to_json(),
            )
            s.commit()
        self.metrics.audit_entries.inc()

    def notify_changed(self, spec: RolloutSpec, before: RolloutState, after: RolloutState) -> int:
        with self.session() as s:
            row = s.get(Rollout, spec.rollout_id)
            if row is None:
                return 0
            changes = self.service.sync_rollout(s, row)
            s.commit()
        self.service.assignments.publish(changes)
        return len(changes)
