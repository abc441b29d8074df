"""Uptane routes: the image repository and the per-device director for devices, and the
release upload for operators (``targets.json`` signed offline by the release keys).

Active when the server setting ``uptane_dir`` names a directory set up by
``edgefleet release init``; otherwise every route answers 409 (``not_configured``) saying so.
"""

from __future__ import annotations

import threading
from datetime import datetime, timezone
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response

from fleet_server import audit
from fleet_server.api.deps import (
    CtxDep,
    CurrentDevice,
    Principal,
    RequirePermission,
    SessionDep,
    ViewerDep,
)
from fleet_server.context import ServerContext
from fleet_server.errors import BadRequestError, NotConfiguredError, NotFoundError
from fleet_server.registry.tufrepo import TufRepoError
from fleet_server.registry.uptane import UptaneRepos, instructions_for

IMAGE_PREFIX = "/device/v1/uptane/image"
DIRECTOR_PREFIX = "/device/v1/uptane/director"

device_router = APIRouter(tags=["uptane"])
router = APIRouter(tags=["release"])

_repos: dict[int, UptaneRepos] = {}
_lock = threading.Lock()


def repos(ctx: ServerContext) -> UptaneRepos:
    """The server's repositories (opened once per context)."""
    d = getattr(ctx.settings, "uptane_dir", None)
    if d is None:
        raise NotConfiguredError(
            "this server runs without the Uptane chain; set EDGEFLEET_SERVER_UPTANE_DIR to a "
            "directory made by `edgefleet release init`"
        )
    with _lock:
        r = _repos.get(id(ctx))
        if r is None:
            r = _repos[id(ctx)] = UptaneRepos.open(d)
        return r


def _json(data: bytes | None, name: str) -> Response:
    if data is None:
        raise NotFoundError(f"no metadata file {name}")
    return Response(data, media_type="application/json", headers={"cache-control": "no-store"})


@device_router.get(IMAGE_PREFIX + "/{name}", response_class=Response)
def image_metadata(name: str, device_id: CurrentDevice, ctx: CtxDep) -> Response:
    """Image repository metadata (root history, targets, snapshot, timestamp)."""
    return _json(repos(ctx).image.file(name, datetime.now(timezone.utc)), name)


@device_router.get(DIRECTOR_PREFIX + "/{name}", response_class=Response)
def director_metadata(name: str, device_id: CurrentDevice, ctx: CtxDep) -> Response:
    """The calling device's director metadata, signed with the director's online key."""
    with ctx.session() as session:
        device_class, instructions = instructions_for(session, device_id)
    data = repos(ctx).director.file(
        name, device_id=device_id, device_class=device_class, instructions=instructions
    )
    return _json(data, name)


@device_router.get("/device/v1/uptane/migration")
def migration(device_id: CurrentDevice, ctx: CtxDep) -> dict[str, str]:
    """The operator-signed move to the Uptane chain for devices on today's trust store
    (written by ``edgefleet release migration``); 404 when there is none."""
    import base64

    d = getattr(ctx.settings, "uptane_dir", None)
    doc, sig = (None, None) if d is None else (d / "migration.json", d / "migration.sig")
    if doc is None or sig is None or not doc.is_file() or not sig.is_file():
        raise NotFoundError("no Uptane migration is published")
    return {
        "document": base64.b64encode(doc.read_bytes()).decode(),
        "signatures": base64.b64encode(sig.read_bytes()).decode(),
    }


@router.get("/release/targets", response_class=Response)
def get_targets(who: ViewerDep, ctx: CtxDep) -> Response:
    """The image repository's current targets.json (to add a release to and sign offline)."""
    return _json(repos(ctx).image.file("targets.json"), "targets.json")


@router.put("/release/targets")
async def put_targets(
    request: Request,
    session: SessionDep,
    who: Annotated[Principal, Depends(RequirePermission("release.upload"))],
    ctx: CtxDep,
) -> dict[str, Any]:
    """Publish a targets.json signed offline by the release keys' threshold. The server
    checks the signatures against the image root and cannot sign one itself."""
    image = repos(ctx).image
    data = await request.body()
    if len(data) > 5_000_000:
        raise BadRequestError("targets.json is larger than 5 MB")
    try:
        md = image.put_targets(data)
    except TufRepoError as e:
        audit.record(
            session,
            actor=who.actor,
            action="release.refused",
            target_type="image_targets",
            details={"reason": str(e)[:500]},
        )
        session.commit()
        raise BadRequestError(str(e)) from e
    audit.record(
        session,
        actor=who.actor,
        action="release.upload",
        target_type="image_targets",
        target_id=str(md.signed.version),
        details={"targets": sorted(md.signed.targets), "signed_by": sorted(md.signatures)},
    )
    session.commit()
    return {"version": md.signed.version, "targets": sorted(md.signed.targets)}


@router.put("/release/root")
async def put_root(
    request: Request,
    session: SessionDep,
    who: Annotated[Principal, Depends(RequirePermission("release.root"))],
    ctx: CtxDep,
) -> dict[str, Any]:
    """Rotate the image repository's root (next version, signed by the current root's
    threshold and its own): keys are rotated and revoked on devices at their next check."""
    from tuf.api.metadata import Metadata, Root

    image = repos(ctx).image
    data = await request.body()
    try:
        md: Metadata[Root] = Metadata.from_bytes(data)
    except Exception as e:  # noqa: BLE001 - any parse failure is the uploader's
        raise BadRequestError(f"not TUF root metadata: {e}") from e
    try:
        if not isinstance(md.signed, Root):
            raise TufRepoError("not root metadata")
        image.add_root(md)
    except (TufRepoError, ValueError) as e:
        raise BadRequestError(f"root refused: {e}") from e
    audit.record(
        session,
        actor=who.actor,
        action="release.root",
        target_type="image_root",
        target_id=str(md.signed.version),
        details={"roles": {r: sorted(v.keyids) for r, v in md.signed.roles.items()}},
    )
    session.commit()
    return {"version": md.signed.version}
