"""Bundle ``Range`` requests answered ahead of the router, from the in-memory caches.

A rollout stage sends every new canary to download its bundle at once, in ``Range``
requests. Through the router each of those requests cost a worker-thread hop for the
device dependency and one for the route, a database session (connection check-out
with its ping, the bundle row, the rollback at close) and five more hops for
:class:`~starlette.responses.FileResponse` (stat, open, seek, read, close): with a
few hundred in flight, they queued in the 40-thread pool for seconds each.

:class:`BundleFastPath` answers the common case with no database access and one
worker-thread hop (the read): the device's credential (or certificate) is in the
credential cache, its assignment is in the assignment cache and names the bundle, the
bundle's file is known (bundles are content-addressed and never change, so the
id -> file mapping is cached for the process's life), and the request asks for one
``bytes=a-b`` / ``bytes=a-`` range of at most ``max_range_bytes``. Anything else -- a
cache miss, no ``Range`` or several ranges, ``If-Range``, a range past the end, a
file that went missing -- falls through to the router's route, which answers it in
full (and refills the caches), so both paths give the same answers.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from fastapi.concurrency import run_in_threadpool
from sqlalchemy import select
from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from device_agent.protocol import DEVICE_API_PREFIX
from fleet_server.assignments.document import assigned_bundle_ids
from fleet_server.context import ServerContext
from fleet_server.db.models import Bundle
from fleet_server.pki.serve import peer_certificate

BUNDLES_PREFIX = f"{DEVICE_API_PREFIX}/bundles/"
#: the route template the metrics label requests with, as the router would
ROUTE_PATH = f"{DEVICE_API_PREFIX}/bundles/{{bundle_id}}"
_RANGE = re.compile(r"bytes=(\d+)-(\d*)")


@dataclass(frozen=True)
class BundleFile:
    path: str
    sha256: str
    size: int


@dataclass(frozen=True)
class _Route:
    """What :class:`~fleet_server.metrics.MetricsMiddleware` reads from ``scope["route"]``."""

    path: str = ROUTE_PATH


def parse_single_range(header: str, size: int) -> tuple[int, int] | None:
    """``(start, end)`` (end exclusive) of a single satisfiable ``bytes=`` range, else None."""
    m = _RANGE.fullmatch(header.strip())
    if m is None:
        return None
    start = int(m.group(1))
    end = int(m.group(2)) + 1 if m.group(2) else size
    end = min(end, size)
    if start >= end:
        return None
    return start, end


def _read(path: str, start: int, length: int) -> bytes | None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        data = os.pread(fd, length, start)
    finally:
        os.close(fd)
    return data if len(data) == length else None


class BundleFastPath:
    """Pure ASGI middleware serving cached ``GET /device/v1/bundles/{id}`` ranges."""

    def __init__(self, app: ASGIApp, ctx: ServerContext, max_range_bytes: int = 4 << 20) -> None:
        self.app = app
        self.ctx = ctx
        self.max_range_bytes = max_range_bytes
        self._files: dict[str, BundleFile] = {}
        self._stmt = select(Bundle.file_path, Bundle.sha256, Bundle.size)

    def _lookup(self, bundle_id: str) -> BundleFile | None:
        with self.ctx.engine.connect() as conn:
            row = conn.execute(self._stmt.where(Bundle.id == bundle_id)).first()
        if row is None:
            return None
        f = BundleFile(row[0], row[1], int(row[2]))
        self._files[bundle_id] = f
        return f

    async def response(self, scope: Scope) -> Response | None:
        """The 206 for this request, or None to let the router answer it."""
        bundle_id = scope["path"][len(BUNDLES_PREFIX) :]
        if not bundle_id or "/" in bundle_id:
            return None
        headers = Headers(scope=scope)
        rng = headers.get("range")
        if rng is None or "if-range" in headers:
            return None
        ctx = self.ctx
        cert = peer_certificate(scope)
        if cert is not None:
            device_id = ctx.device_certs.get(cert)
        else:
            auth = headers.get("authorization") or ""
            ok = auth[:7].lower() == "bearer "
            device_id = ctx.device_auth.get(ctx.hasher.hash(auth[7:].strip())) if ok else None
        if device_id is None:
            return None
        entry = ctx.assignment_cache.get(device_id)
        if entry is None or bundle_id not in assigned_bundle_ids(entry.doc):
            return None
        f = self._files.get(bundle_id) or await run_in_threadpool(self._lookup, bundle_id)
        if f is None:
            return None
        span = parse_single_range(rng, f.size)
        if span is None or span[1] - span[0] > self.max_range_bytes:
            return None
        start, end = span
        data = await run_in_threadpool(_read, f.path, start, end - start)
        if data is None:  # gone or shorter than recorded: the route says what is wrong
            self._files.pop(bundle_id, None)
            return None
        ctx.last_seen.touch(device_id)
        return Response(
            data,
            status_code=206,
            media_type="application/octet-stream",
            headers={
                "content-range": f"bytes {start}-{end - 1}/{f.size}",
                "etag": f'"{f.sha256}"',
                "accept-ranges": "bytes",
            },
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] == "GET"
            and scope["path"].startswith(BUNDLES_PREFIX)
        ):
            response = await self.response(scope)
            if response is not None:
                scope["route"] = _Route()
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
