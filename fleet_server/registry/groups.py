"""Groups: devices chosen by a label selector (all pairs must match) and a device class."""

from __future__ import annotations

from collections.abc import Mapping

from sqlalchemy import select
from sqlalchemy.orm import Session

from fleet_server.db.models import Device, Group


def matches(
    selector: Mapping[str, str], device_class: str | None, labels: Mapping[str, str], cls: str
) -> bool:
    """True if a device with ``labels`` and class ``cls`` belongs to the group."""
    if device_class is not None and device_class != cls:
        return False
    return all(labels.get(k) == v for k, v in selector.items())


def group_members(session: Session, group: Group) -> list[Device]:
    """The group's current, non-revoked devices, ordered by id."""
    devices = session.scalars(select(Device).where(Device.revoked_at.is_(None)).order_by(Device.id))
    return [
        d
        for d in devices
        if matches(group.selector, group.device_class, d.labels or {}, d.device_class)
    ]
