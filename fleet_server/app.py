"""The app factory: ``create_app(settings) -> FastAPI``.

There is no module-level app. ``edgefleet server`` runs uvicorn in factory mode
on :func:`app_from_env`, which reads settings from the environment (and the
file named by ``EDGEFLEET_SERVER_CONFIG``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import AsyncIterator
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy.exc import DataError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from fleet_server.alerts.webhook import AlertLoops
from fleet_server.assignments.document import Notifier
from fleet_server.context import ServerContext
from fleet_server.db.session import normalize_url
from fleet_server.errors import ServerError, error_body
from fleet_server.ingest.gaps import records_lost
from fleet_server.metrics import MetricsMiddleware
from fleet_server.rollouts.leader import leader_lock_for
from fleet_server.rollouts.scheduler import RolloutScheduler
from fleet_server.rollouts.service import ServerRolloutRepository
from fleet_server.settings import ServerSettings, load_settings

log = logging.getLogger(__name__)

API_PREFIX = "/api/v1"

_HTTP_CODES = {
    400: "bad_request",
    401: "not_authenticated",
    403: "permission_denied",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    416: "range_not_satisfiable",
    422: "validation_error",
    429: "too_many_requests",
    501: "not_implemented",
}


async def _background(ctx: ServerContext, stop: asyncio.Event) -> None:
    """Flush buffered last-seen times and pick up other replicas' assignment changes."""
    poll_every = max(ctx.settings.assignment_cache_seconds, 0.2)
    flush_every = ctx.settings.last_seen_flush_seconds
    loop = asyncio.get_running_loop()
    next_flush = loop.time() + flush_every
    while not stop.is_set():
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), poll_every)
        try:
            await asyncio.to_thread(ctx.assignment_cache.poll)
            if loop.time() >= next_flush:
                await asyncio.to_thread(ctx.last_seen.flush)
                next_flush = loop.time() + flush_every
        except Exception:  # a database hiccup must not kill the loop
            log.exception("background maintenance failed; retrying")


async def _telemetry_maintenance(ctx: ServerContext, stop: asyncio.Event) -> None:
    """`edgefleet telemetry maintain` every ``telemetry_maintenance_seconds`` (partitions
    ahead, hourly roll-ups, retention; on PostgreSQL one replica at a time), first a
    minute after start."""
    from fleet_server.ingest.retention import TelemetryMaintenance, policy_from_settings

    every = ctx.settings.telemetry_maintenance_seconds
    if not every:
        return
    maintenance = TelemetryMaintenance(ctx.engine, policy_from_settings(ctx.settings))
    wait = min(60.0, every)
    while not stop.is_set():
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), wait)
        if stop.is_set():
            return
        wait = every
        try:
            report = await asyncio.to_thread(maintenance.run, time.time())
            for line in report.lines():
                log.debug("telemetry maintenance: %s", line)
        except Exception:  # a database hiccup must not kill the loop
            log.exception("telemetry maintenance failed; retrying in %s s", every)


def _make_scheduler(ctx: ServerContext) -> RolloutScheduler:
    """The rollout scheduler of this replica (it evaluates only while holding the lock)."""
    repo = ServerRolloutRepository(ctx.rollouts, ctx.session, ctx.metrics)
    lock = leader_lock_for(normalize_url(ctx.settings.database_url))
    return RolloutScheduler(repo, lock, interval=ctx.settings.rollout_interval_seconds)


def _make_alerts(ctx: ServerContext) -> AlertLoops:
    """The alert evaluator and webhook deliverer (every replica runs them; the alert
    state's compare-and-set keeps each alert recorded and sent once)."""
    s = ctx.settings
    return AlertLoops(
        ctx.engine,
        ctx.sessions,
        ctx.metrics,
        interval=s.alert_interval_seconds,
        public_url=s.public_url,
    )


def _start_ingest(ctx: ServerContext) -> Any:
    """This replica's share of telemetry ingestion, if a broker is configured."""
    s = ctx.settings
    if not (s.ingest and s.mqtt_host):
        return None
    from fleet_server.ingest.worker import IngestConfig, IngestWorker

    config = IngestConfig(
        host=s.mqtt_host,
        port=s.mqtt_port,
        username=s.mqtt_username or None,
        password=s.mqtt_password or None,
        share_group=s.ingest_share_group,
        mqtt_version=s.mqtt_version,
        shared=ctx.broker is None,  # the broker beside the server has one ingesting server
    )
    if s.ingest_client_id:
        config = dataclasses.replace(config, client_id=s.ingest_client_id)
    return IngestWorker(config, ctx.engine).start()


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServerError)
    async def _server_error(_: Request, exc: ServerError) -> JSONResponse:
        return JSONResponse(
            error_body(exc.code, exc.message, exc.details), status_code=exc.status_code
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 304:
            return Response(status_code=304, headers=exc.headers)
        code = _HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
        message = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        return JSONResponse(
            error_body(code, message), status_code=exc.status_code, headers=exc.headers
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": e.get("type")}
            for e in exc.errors()
        ]
        first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
        where = ".".join(str(p) for p in first["loc"])
        return JSONResponse(
            error_body("validation_error", f"{where}: {first['msg']}", errors), status_code=422
        )

    @app.exception_handler(DataError)
    async def _data_error(_: Request, exc: DataError) -> JSONResponse:
        # e.g. PostgreSQL refuses NUL characters in text, or a number out of range
        return JSONResponse(
            error_body("invalid_value", f"the database refused a value: {exc.orig}"),
            status_code=422,
        )

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error", exc_info=exc)
        return JSONResponse(
            error_body("internal_error", "internal server error; see the server log"),
            status_code=500,
        )


def create_app(settings: ServerSettings, *, notifier: Notifier | None = None) -> FastAPI:
    """Build a server app. Migrations run and background tasks start in the lifespan."""
    from fleet_server.api import api_router
    from fleet_server.api.bundle_fastpath import BundleFastPath
    from fleet_server.api.device import CheckinFastPath
    from fleet_server.api.device import router as device_router

    ctx = ServerContext(settings, notifier=notifier)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await asyncio.to_thread(ctx.start)
        stop = asyncio.Event()
        task = asyncio.create_task(_background(ctx, stop))
        telemetry_task = asyncio.create_task(_telemetry_maintenance(ctx, stop))
        scheduler = _make_scheduler(ctx)
        app.state.scheduler = scheduler
        if settings.run_scheduler:
            scheduler.start()
        worker = await asyncio.to_thread(_start_ingest, ctx)
        app.state.ingest = worker
        alerts = _make_alerts(ctx)
        app.state.alerts = alerts
        if settings.run_alerts:
            alerts.start()
        try:
            yield
        finally:
            stop.set()
            await task
            await telemetry_task
            if worker is not None:
                await asyncio.to_thread(worker.stop)
            await asyncio.to_thread(scheduler.stop)
            await asyncio.to_thread(alerts.stop)
            await asyncio.to_thread(ctx.close)

    app = FastAPI(
        title="edgefleet server",
        version="1",
        description="Admin API (operators, `/api/v1`) and device API (`/device/v1`).",
        lifespan=lifespan,
    )
    app.state.ctx = ctx
    _install_error_handlers(app)
    app.include_router(device_router)
    from fleet_server.api.uptane import device_router as uptane_device_router

    app.include_router(uptane_device_router)
    app.include_router(api_router, prefix=API_PREFIX)
    if settings.dashboard:
        from fleet_server.api.dashboard import dashboard_router

        # kept out of the OpenAPI schema: an HTML page, authenticated by cookie or header
        app.include_router(dashboard_router(), include_in_schema=False)
        from fleet_server.api.console import console_router

        # the operator console: a page and its script; it acts through /api/v1
        app.include_router(console_router(), include_in_schema=False)

    @app.get("/healthz", tags=["server"])
    def healthz() -> dict[str, Any]:
        """Liveness, database reachability, and how many rollout rounds this replica ran
        (only the replica holding the leader lock runs them)."""
        from sqlalchemy import text

        with ctx.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        scheduler = getattr(app.state, "scheduler", None)
        worker = getattr(app.state, "ingest", None)
        return {
            "status": "ok",
            "database": ctx.engine.dialect.name,
            "rollout_rounds": scheduler.rounds if scheduler is not None else 0,
            "ingesting": worker is not None,
            "ingest": worker.stats.as_dict() if worker is not None else None,
            "broker": ctx.monitor.health() if ctx.monitor is not None else None,
        }

    @app.get("/metrics", tags=["server"], response_class=Response)
    def metrics() -> Response:
        """Prometheus metrics of this server instance."""
        ctx.metrics.cached_assignments.set(len(ctx.assignment_cache._entries))
        ctx.metrics.export_ingest(
            getattr(app.state, "ingest", None), lambda: records_lost(ctx.engine)
        )
        scheduler = getattr(app.state, "scheduler", None)
        if scheduler is not None:
            ctx.metrics.rollout_rounds.set(scheduler.rounds)
        return Response(generate_latest(ctx.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(BundleFastPath, ctx=ctx)
    app.add_middleware(CheckinFastPath, ctx=ctx)
    app.add_middleware(MetricsMiddleware, metrics=ctx.metrics)
    return app


def app_from_env() -> FastAPI:
    """uvicorn factory: settings from ``EDGEFLEET_SERVER_CONFIG`` (optional) and the environment."""
    return create_app(load_settings(os.environ.get("EDGEFLEET_SERVER_CONFIG")))
