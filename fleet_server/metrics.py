"""Prometheus metrics for the server itself (one registry per app instance)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from device_agent.protocol import ASSIGNMENT_PATH


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "edgefleet_http_requests",
            "HTTP requests served",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "edgefleet_http_request_seconds",
            "HTTP request latency",
            ["route"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
        )
        self.checkins = Counter(
            "edgefleet_checkins",
            "Device check-ins by result",
            ["result"],
            registry=self.registry,
        )
        # children resolved once: the check-in path must not pay for label lookups
        self.not_modified = self.checkins.labels("not_modified")
        self.changed = self.checkins.labels("changed")
        self.audit_entries = Counter(
            "edgefleet_audit_entries",
            "Audit entries written",
            registry=self.registry,
        )
        self.notifications = Counter(
            "edgefleet_assignment_notifications",
            "Assignment-changed notices published",
            registry=self.registry,
        )
        self.cached_assignments = Gauge(
            "edgefleet_cached_assignments",
            "Assignments held in memory",
            registry=self.registry,
        )
        self.ingest = Gauge(
            "edgefleet_ingest",
            "Telemetry ingestion counters of this replica since start "
            "(messages, records, stored, duplicates, spoofed_messages, ...)",
            ["counter"],
            registry=self.registry,
        )
        self.rejected = Gauge(
            "edgefleet_ingest_rejected",
            "Telemetry records (and whole messages, reason *_message) this replica refused "
            "since start, by device and reason (negative_count, errors_exceed_count, "
            "histogram_mismatch, not_finite, out_of_bounds, bad_fields, bad_type, ...)",
            ["device", "reason"],
            registry=self.registry,
        )
        self.records_lost = Gauge(
            "edgefleet_records_lost",
            "Telemetry records missing from the database: holes in a device's sequence "
            "numbers whose neighbours arrived over a minute ago (kind: of the next record)",
            ["device", "kind"],
            registry=self.registry,
        )
        self._lost_at = 0.0
        self.rollout_rounds = Gauge(
            "edgefleet_rollout_rounds",
            "Rollout evaluation rounds run by this replica (non-zero only on the leader)",
            registry=self.registry,
        )
        self.alert_figure = Gauge(
            "edgefleet_alert_figure",
            "The figure an alert rule judges, as of its last evaluation, by figure (drift_psi, "
            "error_rate, latency_p99_ms, accuracy, devices_silent, devices_stale, "
            "records_lost), group, model ('' for group figures) and window; absent while "
            "the window holds too little data",
            ["figure", "group", "model", "window"],
            registry=self.registry,
        )
        self.alert_firing = Gauge(
            "edgefleet_alert_firing",
            "1 while an alert rule fires (the server's own evaluation, with hysteresis), else 0",
            ["rule", "kind", "group", "model"],
            registry=self.registry,
        )

    def export_ingest(
        self, worker: Any, records_lost: Callable[[], Iterable[Any]], *, every: float = 15.0
    ) -> None:
        """Copy the ingestion counters, rejections and (at most every ``every`` seconds,
        ``records_lost()``: the losses per device and kind read from the database) into
        the gauges."""
        if worker is not None:
            for name, value in worker.stats.as_dict().items():
                self.ingest.labels(name).set(value)
            for (device, reason), n in worker.rejections.snapshot().items():
                self.rejected.labels(device, reason).set(n)
        now = time.monotonic()
        if now - self._lost_at < every:
            return
        self._lost_at = now
        from sqlalchemy.exc import SQLAlchemyError

        try:
            losses = list(records_lost())
        except SQLAlchemyError:  # e.g. no telemetry tables yet: nothing was lost
            return
        self.records_lost.clear()
        for loss in losses:
            self.records_lost.labels(loss.device_id, loss.kind).set(loss.records)


class MetricsMiddleware:
    """Pure ASGI middleware: counts requests by route template and status."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = [500]

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route: Any = scope.get("route")
            name = getattr(route, "path", None) or (
                ASSIGNMENT_PATH if scope["path"] == ASSIGNMENT_PATH else "unmatched"
            )
            self.metrics.requests.labels(scope["method"], name, str(status[0])).inc()
            self.metrics.latency.labels(name).observe(time.perf_counter() - start)
