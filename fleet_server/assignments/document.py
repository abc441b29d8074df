"""Device assignments: the pure core that builds the assignment document and its ETag,
and the writer that stores it, invalidates caches and notifies devices.

The document is exactly the ``Assignment JSON`` of :mod:`device_agent.protocol`;
``assignment_id`` is the sha256 of the canonical JSON of every other field and
doubles as the HTTP ETag, so two replicas computing the same assignment agree
on its ETag without talking to each other.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import select
from sqlalchemy.orm import Session

from device_agent.bundle.manifest import canonical_json
from device_agent.protocol import DEVICE_API_PREFIX
from fleet_server.db.models import Assignment, Bundle
from fleet_server.db.types import utcnow


@dataclass(frozen=True)
class TelemetryPolicy:
    sample_rate: float = 0.01
    window_seconds: float = 60.0


def bundle_ref(bundle: Bundle) -> dict[str, Any]:
    """The ``desired``/``shadow`` entry of an assignment for ``bundle``."""
    return {
        "bundle_id": bundle.id,
        "name": bundle.name,
        "version": bundle.version,
        "url": f"{DEVICE_API_PREFIX}/bundles/{bundle.id}",
        "sha256": bundle.sha256,
        "size": bundle.size,
    }


#: the project's one canonical JSON (sorted keys, compact, UTF-8, no NaN or infinity)
canonical = canonical_json


def build_assignment(
    device_id: str,
    *,
    model: str = "",
    desired: Bundle | None,
    shadow: Bundle | None = None,
    rollout_id: str | None = None,
    stage: int | None = None,
    telemetry: TelemetryPolicy = TelemetryPolicy(),  # noqa: B008 - frozen, immutable
) -> dict[str, Any]:
    """The assignment document for one model of one device, ``assignment_id`` included."""
    doc: dict[str, Any] = {
        "device_id": device_id,
        "model": model or None,
        "desired": bundle_ref(desired) if desired is not None else None,
        "shadow": bundle_ref(shadow) if shadow is not None else None,
        "rollout_id": rollout_id,
        "stage": stage,
        "telemetry": {
            "sample_rate": telemetry.sample_rate,
            "window_seconds": telemetry.window_seconds,
        },
    }
    doc["assignment_id"] = hashlib.sha256(canonical(doc)).hexdigest()
    return doc


def model_of(desired: Bundle | None, shadow: Bundle | None) -> str:
    """The model name an assignment entry is for: its bundles' name ("" for none)."""
    if desired is not None and shadow is not None and desired.name != shadow.name:
        raise ValueError(
            f"desired {desired.name!r} and shadow {shadow.name!r} are different models; a "
            "shadow runs beside the model it may replace (assign each model on its own)"
        )
    ref = desired if desired is not None else shadow
    return ref.name if ref is not None else ""


def assigned_bundle_ids(doc: dict[str, Any]) -> set[str]:
    """The bundles a device may download under assignment ``doc``."""
    out = set()
    for key in ("desired", "shadow"):
        ref = doc.get(key)
        if isinstance(ref, dict) and isinstance(ref.get("bundle_id"), str):
            out.add(ref["bundle_id"])
    return out


class Notifier(Protocol):
    """Tells devices that their assignment changed (MQTT in production)."""

    def notify(self, device_id: str, assignment_id: str) -> None: ...


@dataclass(frozen=True)
class AssignmentChange:
    device_id: str
    assignment_id: str
    body: dict[str, Any]
    model: str = ""
    #: the desired or shadow bundle changed (False: only the rollout id or stage did, so
    #: the device need not be woken: it picks the new document up at its next poll)
    bundles_changed: bool = True


class AssignmentWriter:
    """Stores assignments; after the caller commits, :meth:`publish` fans out the change."""

    def __init__(
        self,
        telemetry: TelemetryPolicy,
        on_change: Callable[[list[AssignmentChange]], None],
    ) -> None:
        self.telemetry = telemetry
        self._on_change = on_change

    def assign(
        self,
        session: Session,
        device_id: str,
        *,
        desired_bundle_id: str | None,
        shadow_bundle_id: str | None = None,
        rollout_id: str | None = None,
        stage: int | None = None,
        model: str | None = None,
    ) -> AssignmentChange | None:
        """Set what one model of ``device_id`` should run; returns the change, or None if
        unchanged. ``model`` defaults to the bundles' model name; clearing a model (no
        bundle) needs it named."""
        desired = session.get(Bundle, desired_bundle_id) if desired_bundle_id else None
        shadow = session.get(Bundle, shadow_bundle_id) if shadow_bundle_id else None
        if desired_bundle_id and desired is None:
            raise LookupError(f"bundle {desired_bundle_id} does not exist")
        if shadow_bundle_id and shadow is None:
            raise LookupError(f"bundle {shadow_bundle_id} does not exist")
        named = model_of(desired, shadow)
        if model is not None and named and named != model:
            raise ValueError(f"the bundles are model {named!r}, not {model!r}")
        model = named or (model or "")
        doc = build_assignment(
            device_id,
            model=model,
            desired=desired,
            shadow=shadow,
            rollout_id=rollout_id,
            stage=stage,
            telemetry=self.telemetry,
        )
        row = session.get(Assignment, (device_id, model))
        if row is not None and row.etag == doc["assignment_id"]:
            return None
        moved = row is None or (row.desired_bundle_id, row.shadow_bundle_id) != (
            desired_bundle_id,
            shadow_bundle_id,
        )
        if row is None:
            row = Assignment(device_id=device_id, model=model)
            session.add(row)
        row.desired_bundle_id = desired_bundle_id
        row.shadow_bundle_id = shadow_bundle_id
        row.rollout_id = rollout_id
        row.stage = stage
        row.etag = doc["assignment_id"]
        row.body = doc
        row.updated_at = utcnow()
        return AssignmentChange(device_id, doc["assignment_id"], doc, model, moved)

    def publish(self, changes: Iterable[AssignmentChange | None]) -> None:
        """Call after commit: refresh caches and notify the devices concerned."""
        real = [c for c in changes if c is not None]
        if real:
            self._on_change(real)


def current_assignment(
    session: Session, device_id: str, model: str | None = None
) -> Assignment | None:
    """The assignment of ``model`` on ``device_id``; with no model named, the device's most
    recently changed one (a device with one model has one)."""
    stmt = select(Assignment).where(Assignment.device_id == device_id)
    if model is not None:
        stmt = stmt.where(Assignment.model == model)
    return session.scalars(stmt.order_by(Assignment.updated_at.desc())).first()


def device_assignments(session: Session, device_id: str) -> list[Assignment]:
    """Every model's assignment on ``device_id``, by model name."""
    stmt = select(Assignment).where(Assignment.device_id == device_id)
    return list(session.scalars(stmt.order_by(Assignment.model)))
