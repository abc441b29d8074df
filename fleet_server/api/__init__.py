"""The admin API (``/api/v1``): one router per area, all behind operator tokens."""

from __future__ import annotations

from fastapi import APIRouter

from fleet_server.api import (
    alerts,
    bundles,
    devices,
    operators,
    rollouts,
    samples,
    telemetry,
    uptane,
)

api_router = APIRouter()
api_router.include_router(operators.router)
api_router.include_router(devices.router)
api_router.include_router(bundles.router)
api_router.include_router(rollouts.router)
api_router.include_router(telemetry.router)
api_router.include_router(uptane.router)
api_router.include_router(alerts.router)
api_router.include_router(samples.router)
