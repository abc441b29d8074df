"""The model and bundle registry: accepting bundles, and building them from source models.

Every bundle the server accepts, uploaded or built here, passes
:func:`device_agent.bundle.verify_file` against the server's trust store first,
with the same code a device runs, so the server never offers a bundle its
devices would refuse for its signature, expiry or contents.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from sqlalchemy import select
from sqlalchemy.orm import Session

from device_agent.bundle import BundleError, TrustStore, verify_file
from fleet_server.db.models import Bundle, Model
from fleet_server.db.types import utcnow
from fleet_server.errors import (
    BadRequestError,
    BundleRejectedError,
    ConflictError,
    ServiceUnavailableError,
)
from fleet_server.registry.storage import BundleStore
from fleet_server.security import new_id


def _model_for(session: Session, name: str) -> Model:
    model = session.scalar(select(Model).where(Model.name == name))
    if model is None:
        model = Model(id=new_id("m"), name=name, description="", created_at=utcnow())
        session.add(model)
        session.flush()
    return model


class BundleRegistry:
    """Registered bundles: accepts uploads that verify, builds from sources, stores files.

    It holds what it uses: the bundle store, the trust store (a callable, so that an
    operator's edit of the trust store file is seen), the upload cap and the server-side
    signing key's location.
    """

    def __init__(
        self,
        store: BundleStore,
        trust_store: Callable[[], TrustStore],
        *,
        max_upload_bytes: int,
        signing_key_dir: Path | None = None,
        signing_key: str | None = None,
    ) -> None:
        self.store = store
        self.trust_store = trust_store
        self.max_upload_bytes = max_upload_bytes
        self.signing_key_dir = signing_key_dir
        self.signing_key_name = signing_key

    def accept(self, session: Session, src: BinaryIO, *, uploaded_by: str, source: str) -> Bundle:
        """Store ``src`` if it verifies against the trust store; the caller commits."""
        return accept_bundle(self, session, src, uploaded_by=uploaded_by, source=source)

    def build(
        self, session: Session, src: BinaryIO, req: BuildRequest, *, uploaded_by: str
    ) -> list[BuildOutcome]:
        """Convert, sign with the server key and accept; the caller commits."""
        return build_from_source(self, session, src, req, uploaded_by=uploaded_by)

    def signing_key(self, purpose: str) -> Any:
        """The server-side signing key, or :class:`ServiceUnavailableError` saying how to
        configure it (``purpose`` names what needs it)."""
        if self.signing_key_dir is None or self.signing_key_name is None:
            raise ServiceUnavailableError(
                f"{purpose} needs the server signing key (EDGEFLEET_SERVER_SIGNING_KEY_DIR and "
                "EDGEFLEET_SERVER_SIGNING_KEY); or sign offline and upload the bundle"
            )
        from converters.keys import KeyStore

        return KeyStore(self.signing_key_dir).private_key(self.signing_key_name)


def accept_bundle(
    reg: BundleRegistry, session: Session, src: BinaryIO, *, uploaded_by: str, source: str
) -> Bundle:
    """Store ``src`` if it verifies against the trust store; the caller commits."""
    tmp, sha, size = reg.store.incoming(src, reg.max_upload_bytes)
    try:
        try:
            verified = verify_file(tmp, reg.trust_store())
        except BundleError as e:
            raise BundleRejectedError(f"{type(e).__name__}: {e}", details={"reason": e.code}) from e
        if session.scalar(select(Bundle.id).where(Bundle.sha256 == sha)):
            raise ConflictError(f"this bundle (sha256 {sha[:16]}...) is already registered")
        m = verified.manifest
        model = _model_for(session, m.name)
        bundle = Bundle(
            id=f"b-{sha[:16]}",
            model_id=model.id,
            name=m.name,
            version=m.version,
            format=m.format,
            device_classes=list(m.target_device_classes),
            file_path=str(reg.store.path_for(sha)),
            sha256=sha,
            size=size,
            manifest=m.to_json(),
            signed_by=list(verified.signed_by),
            source=source,
            uploaded_by=uploaded_by,
            created_at=utcnow(),
        )
        session.add(bundle)
        session.flush()
        reg.store.commit(tmp, sha)
        return bundle
    finally:
        reg.store.discard(tmp)


@dataclass(frozen=True)
class BuildRequest:
    name: str
    version: int
    filename: str
    targets: Sequence[tuple[str, tuple[str, ...]]]  # (target spec, device classes)
    allow_parity_failure: bool = False


@dataclass(frozen=True)
class BuildOutcome:
    target: str
    bundle: Bundle | None
    error: str | None


def build_from_source(
    reg: BundleRegistry, session: Session, src: BinaryIO, req: BuildRequest, *, uploaded_by: str
) -> list[BuildOutcome]:
    """Convert a source model per target with :mod:`converters`, sign with the server key,
    and accept each bundle; the caller commits."""
    from converters.errors import ConverterError
    from converters.pipeline import build_bundles
    from converters.source import load_source
    from converters.targets import parse_target

    if reg.signing_key_dir is None or reg.signing_key_name is None:
        reg.signing_key("server-side building")  # raises, saying how to configure it
    suffix = Path(req.filename).suffix.lower()
    if suffix not in (".onnx", ".tflite"):
        raise BadRequestError(
            f"source {req.filename!r}: the server converts .onnx and .tflite files; convert "
            "PyTorch and scikit-learn models offline (`edgefleet convert`) and upload the bundle"
        )
    try:
        key = reg.signing_key("server-side building")
        targets = [parse_target(spec, classes) for spec, classes in req.targets]
    except ConverterError as e:
        raise BadRequestError(str(e)) from e
    work = Path(tempfile.mkdtemp(prefix="edgefleet-build-"))
    try:
        path = work / f"source{suffix}"
        with open(path, "wb") as out:
            shutil.copyfileobj(src, out)
        try:
            source_model = load_source(path)
        except ConverterError as e:
            raise BadRequestError(f"cannot read the source model: {e}") from e
        results = build_bundles(
            source_model,
            targets,
            work / "out",
            name=req.name,
            version=req.version,
            signing_key=key,
            allow_parity_failure=req.allow_parity_failure,
        )
        outcomes = []
        for spec_classes, r in zip(req.targets, results, strict=True):
            if r.bundle is None:
                outcomes.append(
                    BuildOutcome(spec_classes[0], None, f"{type(r.error).__name__}: {r.error}")
                )
                continue
            with open(r.bundle, "rb") as f:
                b = accept_bundle(reg, session, f, uploaded_by=uploaded_by, source="converted")
            outcomes.append(BuildOutcome(spec_classes[0], b, None))
        return outcomes
    finally:
        shutil.rmtree(work, ignore_errors=True)
