"""``GET /samples/export``: a model's sampled inputs and outputs from a group and window,
streamed as Parquet (the starting point of a retraining run; see
:mod:`fleet_server.report.export` for the columns). Needs ``samples.export``; every export
is written to the audit log."""

from __future__ import annotations

import os
import re
import tempfile
from datetime import datetime, timezone
from typing import Annotated

from fastapi import APIRouter, Depends, Query
from fastapi.responses import FileResponse
from starlette.background import BackgroundTask

from fleet_server import audit
from fleet_server.api.deps import Principal, RequirePermission, SessionDep
from fleet_server.api.devices import get_group_or_404
from fleet_server.errors import BadRequestError
from fleet_server.registry.groups import group_members
from fleet_server.report.errors import TimeRangeError
from fleet_server.report.export import write_samples_parquet
from fleet_server.report.timerange import parse_time

router = APIRouter(tags=["samples"])

ExportDep = Annotated[Principal, Depends(RequirePermission("samples.export"))]

_EPOCH = re.compile(r"^\d+(\.\d+)?$")
TimeArg = Annotated[
    str,
    Query(
        max_length=40,
        description="ISO 8601 time, UNIX seconds, `now`, or a span before now (`90m`, `24h`)",
    ),
]


#: UNIX seconds accepted (up to the year 5138, as the telemetry routes)
MAX_TS = 1e11


def _when(value: str, now: datetime, what: str) -> float:
    try:
        if _EPOCH.match(value.strip()):
            ts = float(value)
        else:
            ts = parse_time(value, now=now, what=what).timestamp()
    except TimeRangeError as e:
        raise BadRequestError(str(e)) from e
    except (OverflowError, ValueError, OSError) as e:  # a span reaching before year 1
        raise BadRequestError(f"{what} {value!r} is out of range") from e
    if not 0 <= ts <= MAX_TS:
        raise BadRequestError(f"{what} {value!r} is out of range (0 to {MAX_TS:.0f} s)")
    return ts


@router.get(
    "/samples/export",
    response_class=FileResponse,
    responses={200: {"content": {"application/vnd.apache.parquet": {}}}},
)
def export_samples(
    session: SessionDep,
    who: ExportDep,
    model: Annotated[str | None, Query(max_length=200, description="Model name")] = None,
    group: Annotated[str | None, Query(max_length=200, description="Group id or name")] = None,
    since: TimeArg = "24h",
    until: TimeArg = "now",
) -> FileResponse:
    """Sampled inferences of ``model`` (every model if absent) from ``group``'s current
    devices (every device if absent) received in ``[since, until)``, as one Parquet file.
    The ``X-Edgefleet-Rows`` header says how many rows it holds."""
    now = datetime.now(timezone.utc)
    hi = _when(until, now, "until")
    lo = _when(since, datetime.fromtimestamp(hi, timezone.utc), "since")
    if lo >= hi:
        raise BadRequestError(f"the window is empty: since ({lo}) is not before until ({hi})")
    devices = None
    if group is not None:
        g = get_group_or_404(session, group)
        devices = {d.id for d in group_members(session, g)}
    fd, path = tempfile.mkstemp(prefix="edgefleet-samples-", suffix=".parquet")
    os.close(fd)
    try:
        stats = write_samples_parquet(
            session, path, model=model, devices=devices, since=lo, until=hi
        )
    except BaseException:
        os.unlink(path)
        raise
    audit.record(
        session,
        actor=who.actor,
        action="samples.export",
        target_type="samples",
        target_id=model,
        details={
            "model": model,
            "group": group,
            "since": lo,
            "until": hi,
            "rows": stats.rows,
            "devices": stats.devices,
        },
    )
    session.commit()
    name = f"samples-{model or 'all'}-{group or 'all'}-{int(lo)}-{int(hi)}.parquet"
    return FileResponse(
        path,
        media_type="application/vnd.apache.parquet",
        filename=re.sub(r"[^A-Za-z0-9_.\-]", "_", name),
        headers={"X-Edgefleet-Rows": str(stats.rows)},
        background=BackgroundTask(os.unlink, path),
    )
