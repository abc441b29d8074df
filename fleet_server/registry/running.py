"""What each model of each device runs: the ``device_models`` rows, kept from install reports.

A device running several models reports installs of each; ``Device.current_*`` only holds
the latest of any model, so everything that asks "does this device run model M at version
V" (rollout progress and status, the previous bundle of a new rollout, alerts on devices
that do not take their assignment) reads this table by model name.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import select
from sqlalchemy.orm import Session

from fleet_server.db.models import DeviceModel


def running(
    session: Session, name: str, device_ids: Iterable[str] | None = None
) -> dict[str, DeviceModel]:
    """device id -> what it runs of model ``name`` (devices that never reported it absent)."""
    stmt = select(DeviceModel).where(DeviceModel.name == name)
    if device_ids is not None:
        ids = list(device_ids)
        if not ids:
            return {}
        stmt = stmt.where(DeviceModel.device_id.in_(ids))
    return {m.device_id: m for m in session.scalars(stmt)}
