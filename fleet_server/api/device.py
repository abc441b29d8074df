"""Device API routes, exactly as :mod:`device_agent.protocol` describes them.

The check-in route (``GET /device/v1/assignment``) is the hot path: with a
cached credential and a cached assignment it answers a matching
``If-None-Match`` with a 304 without touching the database or the ORM.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from cryptography import x509
from fastapi import APIRouter, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from pydantic import ValidationError
from sqlalchemy import select
from starlette.datastructures import Headers
from starlette.responses import FileResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from device_agent.bundle.manifest import MODEL_NAME
from device_agent.protocol import (
    ASSIGNMENT_PATH,
    CERTIFICATE_PATH,
    DEVICE_API_PREFIX,
    MAX_REPORT_BATCH_BYTES,
    REPORTS_PATH,
)
from fleet_server import audit
from fleet_server.api.deps import (
    CertifiedDevice,
    CtxDep,
    CurrentDevice,
    SessionDep,
    authenticate_device,
)
from fleet_server.api.device_schemas import (
    AssignmentPublic,
    CertificateIssued,
    CertificateRenewal,
    EnrollRequest,
    EnrollResponse,
    MqttEndpoint,
    ReportAck,
    ReportBatch,
    report_body,
)
from fleet_server.assignments.document import assigned_bundle_ids, device_assignments
from fleet_server.context import ServerContext
from fleet_server.db.models import Bundle, Device, DeviceModel, DeviceReport
from fleet_server.db.types import utcnow
from fleet_server.errors import (
    BadRequestError,
    ConflictError,
    NotFoundError,
    PayloadTooLargeError,
    ServerError,
    ServiceUnavailableError,
    error_body,
)
from fleet_server.pki.serve import peer_certificate
from fleet_server.registry.certificates import record_certificate
from fleet_server.registry.enrollment import enroll_device

router = APIRouter(tags=["device"])


class ReportRejectedError(ServerError):
    """A report batch breaks the contract (unbounded fields, a number not finite, ...)."""

    status_code = 422
    code = "validation_error"


ENROLL_PATH = f"{DEVICE_API_PREFIX}/enroll"
BUNDLE_PATH = f"{DEVICE_API_PREFIX}/bundles/{{bundle_id}}"

_ERR = {"model": dict[str, Any], "description": 'JSON error `{"error": {code, message}}`'}


@router.post(
    ENROLL_PATH,
    status_code=status.HTTP_201_CREATED,
    response_model=EnrollResponse,
    responses={401: _ERR, 409: _ERR},
)
def enroll(
    body: EnrollRequest, session: SessionDep, ctx: CtxDep, request: Request
) -> EnrollResponse:
    """Exchange a single-use enrollment token for a device id, and learn the MQTT broker
    to send telemetry to. With a fleet CA the request carries a CSR and the answer the
    device's client certificate (CN = device id) and the CA, and no bearer credential;
    without one (development) a bearer credential, shown once."""
    if ctx.ca is not None and not body.csr:
        raise BadRequestError(
            "this server enrolls devices by certificate: send a certificate signing request "
            "('csr') made with the device's own key (device_agent.identity)"
        )
    enrolled = enroll_device(
        session,
        ctx.hasher,
        token=body.enrollment_token,
        device_id=body.device_id,
        device_class=body.device_class,
        labels=body.labels,
    )
    d = enrolled.device
    audit.record(
        session,
        actor=f"device:{d.id}",
        action="device.enroll",
        target_type="device",
        target_id=d.id,
        details={"device_class": d.device_class, "labels": d.labels},
    )
    session.flush()
    certificate: bytes | None = None
    if ctx.ca is not None and body.csr:
        certificate = _issue(ctx, session, d.id, body.csr, reason="enroll")
    changes = ctx.rollouts.sync_device(session, d)
    session.commit()
    ctx.assignments.publish(changes)
    if ctx.broker is not None and certificate is not None and ctx.broker.tls is not None:
        serial = x509.load_pem_x509_certificate(certificate).serial_number
        ctx.broker.add_certificate_device(d.id, serial)
    elif ctx.broker is not None:  # the device may connect to the broker from now on
        ctx.broker.add_device(d.id, enrolled.credential)
    return EnrollResponse(
        device_id=d.id,
        # a device with a certificate gets no bearer token: nothing reusable on the wire
        credential=enrolled.credential if certificate is None else None,
        device_class=d.device_class,
        labels=d.labels,
        mqtt=mqtt_endpoint(ctx, request.url.hostname),
        certificate=certificate.decode() if certificate is not None else None,
        ca_pem=ctx.ca.cert_pem.decode() if certificate is not None and ctx.ca else None,
    )


def _issue(ctx: ServerContext, session: Any, device_id: str, csr: str, *, reason: str) -> bytes:
    """Sign ``csr`` for ``device_id`` and record the certificate; the caller commits (a
    refused request changes nothing, so an enrollment token stays unused)."""
    from fleet_server.pki.ca import CAError

    assert ctx.ca is not None
    try:
        pem = ctx.ca.sign_device_csr(
            csr, device_id, lifetime=timedelta(seconds=ctx.settings.device_cert_seconds)
        )
    except CAError as e:
        raise BadRequestError(str(e)) from e
    record_certificate(session, device_id, pem, reason=reason)
    return pem


@router.post(
    CERTIFICATE_PATH,
    response_model=CertificateIssued,
    responses={400: _ERR, 401: _ERR, 409: _ERR},
)
def renew_certificate(
    body: CertificateRenewal, device_id: CertifiedDevice, session: SessionDep, ctx: CtxDep
) -> CertificateIssued:
    """A new client certificate for the calling device, before its current one expires.

    Only over TLS with the device's current, valid certificate (the proof that it holds
    the key); the CSR must be signed by the key it names (the same or a new one). The
    earlier certificates stay valid until they expire, so a lost answer locks nobody out.
    """
    if ctx.ca is None:
        raise ConflictError("this server has no fleet CA (ca_dir); it issues no certificates")
    pem = _issue(ctx, session, device_id, body.csr, reason="renew")
    cert = x509.load_pem_x509_certificate(pem)
    audit.record(
        session,
        actor=f"device:{device_id}",
        action="device.certificate.renew",
        target_type="device",
        target_id=device_id,
        details={"serial": format(cert.serial_number, "x")},
    )
    session.commit()
    if ctx.broker is not None and ctx.broker.tls is not None:
        ctx.broker.add_certificate_serial(device_id, cert.serial_number)
    return CertificateIssued(certificate=pem.decode(), not_after=cert.not_valid_after_utc)


def mqtt_endpoint(ctx: ServerContext, request_host: str | None) -> MqttEndpoint | None:
    """The broker address a device should use: ``mqtt_public_host`` if set; else the
    server's own broker address, with a loopback host replaced by the host name the device
    used to reach this server."""
    s = ctx.settings
    if not s.mqtt_host:
        return None
    host = s.mqtt_public_host or s.mqtt_host
    if not s.mqtt_public_host and s.mqtt_host in ("127.0.0.1", "localhost", "::1"):
        host = request_host or s.mqtt_host
    tls = ctx.broker.tls if ctx.broker is not None else None
    if tls is not None and ctx.ca is not None:
        return MqttEndpoint(
            host=host,
            port=tls.port,
            mqtt_version=s.mqtt_version,
            tls=True,
            ca_pem=ctx.ca.cert_pem.decode(),
        )
    return MqttEndpoint(host=host, port=s.mqtt_port, mqtt_version=s.mqtt_version)


def _etag_matches(header: str | None, etag: str) -> bool:
    if not header:
        return False
    for part in header.split(","):
        tag = part.strip()
        if tag == "*":
            return True
        if tag.startswith("W/"):
            tag = tag[2:]
        if tag.strip('"') == etag:
            return True
    return False


def _json_error(exc_status: int, code: str, message: str) -> Response:
    import json

    return Response(
        json.dumps(error_body(code, message)),
        status_code=exc_status,
        media_type="application/json",
    )


async def checkin_response(
    ctx: ServerContext, headers: Headers, peer_cert: bytes | None = None, query: bytes = b""
) -> Response:
    """The check-in answer for a request: 304, 200 with the assignment, or 401.

    ``peer_cert`` is the TLS client certificate (DER), which alone decides when present.
    With the credential and the assignment in the in-memory caches this does one HMAC
    (or one certificate lookup) and two dictionary lookups; only a cache miss goes to
    the database, in a worker thread.
    """
    auth = headers.get("authorization")
    device_id = None
    if peer_cert is not None:
        device_id = ctx.device_certs.get(peer_cert)
    elif auth and auth[:7].lower() == "bearer ":
        device_id = ctx.device_auth.get(ctx.hasher.hash(auth[7:].strip()))
    if device_id is None:
        try:
            device_id = await run_in_threadpool(authenticate_device, ctx, auth, peer_cert)
        except ServerError as e:
            return _json_error(e.status_code, e.code, e.message)
    ctx.last_seen.touch(device_id)
    model = None
    if query:
        try:
            model = model_query(query)
        except ValueError as e:
            return _json_error(422, "bad_model_name", str(e))
    entry = ctx.assignment_cache.get(device_id, model)
    if entry is None:
        entry = await run_in_threadpool(ctx.assignment_cache.load, device_id, model)
    etag = f'"{entry.etag}"'
    if _etag_matches(headers.get("if-none-match"), entry.etag):
        ctx.metrics.not_modified.inc()
        return Response(status_code=304, headers={"etag": etag})
    ctx.metrics.changed.inc()
    return Response(
        entry.body,
        media_type="application/json",
        headers={"etag": etag, "cache-control": "no-cache"},
    )


@router.get(
    ASSIGNMENT_PATH,
    response_model=AssignmentPublic,
    responses={304: {"description": "Unchanged (If-None-Match matched)"}, 401: _ERR},
    openapi_extra={"security": [{"DeviceCredential": []}]},
)
async def get_assignment(
    request: Request,
    model: str | None = Query(
        default=None,
        max_length=128,
        description="the model name, on a device that runs several models (each has its "
        "own assignment and ETag); without it, the device's most recently changed one",
    ),
) -> Response:
    """The calling device's assignment; ETag = ``assignment_id``; If-None-Match -> 304.

    Served by :class:`CheckinFastPath` ahead of the router; this route documents it
    and answers if the fast path is not installed.
    """
    return await checkin_response(
        request.app.state.ctx,
        request.headers,
        peer_certificate(request.scope),
        request.scope.get("query_string", b""),
    )


class CheckinFastPath:
    """Pure ASGI middleware answering ``GET /device/v1/assignment`` before routing.

    Matching the admin API's routes first would cost more than the check-in itself;
    this skips the router and runs the very same :func:`checkin_response`.
    """

    def __init__(self, app: ASGIApp, ctx: ServerContext) -> None:
        self.app = app
        self.ctx = ctx

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["path"] == ASSIGNMENT_PATH
            and scope["method"] in ("GET", "HEAD")
        ):
            response = await checkin_response(
                self.ctx, Headers(scope=scope), peer_certificate(scope), scope["query_string"]
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


@router.get(
    BUNDLE_PATH,
    responses={
        200: {"content": {"application/octet-stream": {}}, "description": "The bundle file"},
        206: {"description": "Partial content (Range)"},
        401: _ERR,
        404: _ERR,
        416: {"description": "Range not satisfiable"},
    },
    response_class=Response,
)
def get_bundle(bundle_id: str, device_id: CurrentDevice, ctx: CtxDep) -> Response:
    """Download a bundle assigned to the calling device; supports ``Range`` (206)."""
    entry = ctx.assignment_cache.get(device_id) or ctx.assignment_cache.load(device_id)
    if bundle_id not in assigned_bundle_ids(entry.doc) and not _assigned_any_model(
        ctx, device_id, bundle_id
    ):
        raise NotFoundError(f"bundle {bundle_id} is not assigned to this device")
    with ctx.session() as session:
        bundle = session.get(Bundle, bundle_id)
    if bundle is None or not Path(bundle.file_path).is_file():
        raise NotFoundError(f"bundle {bundle_id} is not available on this server")
    return FileResponse(
        bundle.file_path,
        media_type="application/octet-stream",
        headers={"etag": f'"{bundle.sha256}"', "accept-ranges": "bytes"},
    )


def _assigned_any_model(ctx: ServerContext, device_id: str, bundle_id: str) -> bool:
    """True when one of the device's models (not only its newest) is assigned the bundle."""
    with ctx.session() as session:
        return any(
            bundle_id in (a.desired_bundle_id, a.shadow_bundle_id)
            for a in device_assignments(session, device_id)
        )


def model_query(query: bytes) -> str | None:
    """The ``model`` of a check-in's query string (None when absent); ValueError if bad."""
    values = parse_qs(query.decode("latin-1"), keep_blank_values=True).get("model")
    if not values:
        return None
    model = values[-1]
    if not MODEL_NAME.fullmatch(model):
        raise ValueError(
            f"model {model[:80]!r} is not a model name (1-128 letters, digits, '._-', "
            "starting with a letter or digit)"
        )
    return model


async def read_capped(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(
            f"the body is {declared} bytes, above the limit of {limit}; send fewer reports "
            "per request"
        )
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise PayloadTooLargeError(
                f"the body passed the limit of {limit} bytes; send fewer reports per request"
            )
    return bytes(body)


@router.post(
    REPORTS_PATH,
    response_model=ReportAck,
    responses={401: _ERR, 413: _ERR, 422: _ERR},
    openapi_extra={
        "requestBody": {
            "content": {"application/json": {"schema": ReportBatch.model_json_schema()}},
            "required": True,
        }
    },
)
async def post_reports(request: Request, device_id: CurrentDevice, ctx: CtxDep) -> ReportAck:
    """Install and health reports from the calling device (at most
    ``MAX_REPORT_BATCH_BYTES`` per request, ``MAX_REPORTS_PER_BATCH`` reports)."""
    raw = await read_capped(request, MAX_REPORT_BATCH_BYTES)
    try:
        batch = ReportBatch.model_validate_json(raw)
    except ValidationError as e:
        first = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid body"}
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise ReportRejectedError(f"{where}: {first.get('msg')}") from None
    # answered once the transaction holding the reports committed (shared with other
    # devices' reports arriving at the same time: a fleet-wide install is one burst)
    try:
        stored = ctx.report_commits.submit(
            lambda s: _store_reports_in(s, device_id, batch), key=device_id
        )
    except RuntimeError as e:  # the committer is closed: the server is shutting down
        raise ServiceUnavailableError(f"{e}; the server is stopping, send the reports again") from e
    return await asyncio.wrap_future(stored)


def _store_reports_in(session: Any, device_id: str, batch: ReportBatch) -> ReportAck:
    """Write one device's reports into ``session``; the caller commits."""
    device = session.get(Device, device_id)
    if device is None:
        raise NotFoundError(f"device {device_id} no longer exists")
    now = utcnow()
    for r in batch.reports:
        body = report_body(r)
        # a rollback report names what the device runs now; the failure belongs to
        # the bundle it rolled back from, so that is what the report is stored under
        about = body.get("rolled_back_from")
        about_name, about_version = r.name, r.version
        if (
            isinstance(about, dict)
            and isinstance(about.get("name"), str)
            and isinstance(about.get("version"), int)
        ):
            about_name, about_version = about["name"], about["version"]
        session.add(
            DeviceReport(
                device_id=device_id,
                received_at=now,
                type=r.type,
                outcome=r.outcome,
                name=about_name,
                version=about_version,
                error_code=r.error_code,
                rollout_id=r.rollout_id,
                body=body,
            )
        )
        shadow = body.get("shadow") is True  # a shadow candidate serves nothing
        installed = r.type == "install" and r.outcome in ("installed", "rolled_back")
        if installed and r.name and not shadow:
            bundle_id = r.bundle_id or _bundle_id_for(session, r.name, r.version)
            device.current_name = r.name
            device.current_version = r.version
            device.current_bundle_id = bundle_id
            running = session.get(DeviceModel, (device_id, r.name))
            if running is None:
                running = DeviceModel(device_id=device_id, name=r.name)
                session.add(running)
            running.version, running.bundle_id, running.updated_at = r.version, bundle_id, now
        if r.type == "health" and r.health:
            device.health = r.health
            device.health_details = body
        if r.type == "install" and r.outcome == "installed":
            device.health = "ok"
            device.health_details = {"last_install": body}
        elif r.type == "install" and r.outcome in ("failed", "rolled_back", "refused"):
            # still serving a verified model, but an update did not take: needs a look
            device.health = "degraded"
            device.health_details = {"last_install": body}
    device.last_seen_at = now
    return ReportAck(accepted=len(batch.reports))


def _bundle_id_for(session: Any, name: str, version: int | None) -> str | None:
    if version is None:
        return None
    return session.scalar(
        select(Bundle.id).where(Bundle.name == name, Bundle.version == version).limit(1)
    )
