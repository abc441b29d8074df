"""The audit log: who did what, when, with the numbers behind it."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from fleet_server.db.models import AuditEntry
from fleet_server.db.types import utcnow

#: actor name used for decisions the server makes on its own
SYSTEM_ACTOR = "system:rollout-engine"


def record(
    session: Session,
    *,
    actor: str,
    action: str,
    target_type: str,
    target_id: str | None = None,
    details: dict[str, Any] | None = None,
) -> AuditEntry:
    """Add an audit entry to ``session``; it commits with the change it describes."""
    entry = AuditEntry(
        ts=utcnow(),
        actor=actor,
        action=action,
        target_type=target_type,
        target_id=target_id,
        details=details or {},
    )
    session.add(entry)
    return entry
