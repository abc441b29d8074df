"""Models, their versions, and bundles (uploaded signed offline, or built from a source)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Query, UploadFile, status
from pydantic import BaseModel
from sqlalchemy import select

from fleet_server import audit
from fleet_server.api.deps import (
    CtxDep,
    OperatorDep,
    Principal,
    RequirePermission,
    SessionDep,
    ViewerDep,
)
from fleet_server.api.pagination import Page, PageDep, paginate
from fleet_server.db.models import Bundle, Model
from fleet_server.errors import BadRequestError, NotFoundError
from fleet_server.registry.bundles import BuildRequest

router = APIRouter()


class BundlePublic(BaseModel):
    id: str
    model_id: str
    name: str
    version: int
    format: str
    device_classes: list[str]
    sha256: str
    size: int
    signed_by: list[str]
    source: str
    uploaded_by: str
    created_at: datetime
    manifest: dict[str, Any] | None = None


class ModelVersion(BaseModel):
    version: int
    bundles: list[str]
    formats: list[str]


class ModelPublic(BaseModel):
    id: str
    name: str
    description: str
    created_at: datetime
    latest_version: int | None
    versions: list[ModelVersion]


class BuildOutcomePublic(BaseModel):
    target: str
    bundle: BundlePublic | None
    error: str | None


class BuildResultPublic(BaseModel):
    model: str
    version: int
    results: list[BuildOutcomePublic]


def bundle_public(b: Bundle, with_manifest: bool = False) -> BundlePublic:
    return BundlePublic(
        id=b.id,
        model_id=b.model_id,
        name=b.name,
        version=b.version,
        format=b.format,
        device_classes=list(b.device_classes or []),
        sha256=b.sha256,
        size=b.size,
        signed_by=list(b.signed_by or []),
        source=b.source,
        uploaded_by=b.uploaded_by,
        created_at=b.created_at,
        manifest=b.manifest if with_manifest else None,
    )


def _model_public(session: Any, m: Model) -> ModelPublic:
    versions: dict[int, ModelVersion] = {}
    for b in session.scalars(
        select(Bundle).where(Bundle.model_id == m.id).order_by(Bundle.version, Bundle.id)
    ):
        v = versions.setdefault(b.version, ModelVersion(version=b.version, bundles=[], formats=[]))
        v.bundles.append(b.id)
        if b.format not in v.formats:
            v.formats.append(b.format)
    ordered = [versions[k] for k in sorted(versions)]
    return ModelPublic(
        id=m.id,
        name=m.name,
        description=m.description,
        created_at=m.created_at,
        latest_version=ordered[-1].version if ordered else None,
        versions=ordered,
    )


@router.get("/models", response_model=Page[ModelPublic], tags=["models"])
def list_models(session: SessionDep, who: ViewerDep, page: PageDep) -> Page[ModelPublic]:
    """Models with their versions and bundles."""
    rows, total, nxt = paginate(session, select(Model).order_by(Model.name), page)
    return Page(
        items=[_model_public(session, m) for m in rows],
        total=total,
        limit=page.limit,
        offset=page.offset,
        next_offset=nxt,
    )


@router.get("/models/{name}", response_model=ModelPublic, tags=["models"])
def get_model(name: str, session: SessionDep, who: ViewerDep) -> ModelPublic:
    m = session.scalar(select(Model).where(Model.name == name))
    if m is None:
        raise NotFoundError(f"model {name} does not exist")
    return _model_public(session, m)


@router.post(
    "/models/{name}/sources",
    response_model=BuildResultPublic,
    status_code=status.HTTP_201_CREATED,
    tags=["models"],
)
def upload_source(
    name: str,
    file: Annotated[UploadFile, File(description="An .onnx or .tflite source model")],
    version: Annotated[int, Form(ge=1, le=2**31 - 1)],
    target: Annotated[
        list[str],
        Form(description="Target spec, optionally =CLASS1,CLASS2 (e.g. onnx:float32=gateway-x86)"),
    ],
    session: SessionDep,
    who: Annotated[Principal, Depends(RequirePermission("model.build"))],
    ctx: CtxDep,
    allow_parity_failure: Annotated[bool, Form()] = False,
) -> BuildResultPublic:
    """Convert a source model into one bundle per target, signed with the server's key
    (admin only: see :data:`fleet_server.security.PERMISSIONS`)."""
    targets = []
    for t in target:
        spec, _, classes = t.partition("=")
        targets.append((spec, tuple(c for c in classes.split(",") if c)))
    if not targets:
        raise BadRequestError("give at least one target")
    req = BuildRequest(
        name=name,
        version=version,
        filename=file.filename or "",
        targets=targets,
        allow_parity_failure=allow_parity_failure,
    )
    outcomes = ctx.registry.build(session, file.file, req, uploaded_by=who.actor)
    audit.record(
        session,
        actor=who.actor,
        action="model.build",
        target_type="model",
        target_id=name,
        details={
            "version": version,
            "targets": list(target),
            "bundles": [o.bundle.id for o in outcomes if o.bundle],
            "errors": {o.target: o.error for o in outcomes if o.error},
        },
    )
    session.commit()
    return BuildResultPublic(
        model=name,
        version=version,
        results=[
            BuildOutcomePublic(
                target=o.target, error=o.error, bundle=bundle_public(o.bundle) if o.bundle else None
            )
            for o in outcomes
        ],
    )


@router.post(
    "/bundles", response_model=BundlePublic, status_code=status.HTTP_201_CREATED, tags=["bundles"]
)
def upload_bundle(
    file: Annotated[UploadFile, File(description="A bundle signed offline (.efb)")],
    session: SessionDep,
    who: OperatorDep,
    ctx: CtxDep,
) -> BundlePublic:
    """Upload a bundle signed offline; it is verified against the server's trust store."""
    b = ctx.registry.accept(session, file.file, uploaded_by=who.actor, source="upload")
    audit.record(
        session,
        actor=who.actor,
        action="bundle.upload",
        target_type="bundle",
        target_id=b.id,
        details={
            "name": b.name,
            "version": b.version,
            "sha256": b.sha256,
            "size": b.size,
            "signed_by": b.signed_by,
        },
    )
    session.commit()
    return bundle_public(b, with_manifest=True)


@router.get("/bundles", response_model=Page[BundlePublic], tags=["bundles"])
def list_bundles(
    session: SessionDep,
    who: ViewerDep,
    page: PageDep,
    name: Annotated[str | None, Query(max_length=200)] = None,
) -> Page[BundlePublic]:
    stmt = select(Bundle).order_by(Bundle.name, Bundle.version.desc(), Bundle.id)
    if name:
        stmt = stmt.where(Bundle.name == name)
    rows, total, nxt = paginate(session, stmt, page)
    return Page(
        items=[bundle_public(b) for b in rows],
        total=total,
        limit=page.limit,
        offset=page.offset,
        next_offset=nxt,
    )


@router.get("/bundles/{bundle_id}", response_model=BundlePublic, tags=["bundles"])
def get_bundle(bundle_id: str, session: SessionDep, who: ViewerDep) -> BundlePublic:
    b = session.get(Bundle, bundle_id)
    if b is None:
        raise NotFoundError(f"bundle {bundle_id} does not exist")
    return bundle_public(b, with_manifest=True)
