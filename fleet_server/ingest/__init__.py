"""Telemetry ingestion: MQTT 5 shared subscription -> checks -> batched idempotent writes.

:mod:`.parse` (pure) checks and converts one message, :mod:`.store` writes
batches, :mod:`.worker` runs the subscriber, :mod:`.aggregate` turns stored
telemetry into the rollout engine's cohort metrics.
"""

from .aggregate import cohort_metrics, stage_metrics
from .errors import (
    IngestConfigError,
    IngestError,
    MalformedTelemetryError,
    NotTelemetryTopicError,
    SpoofedDeviceError,
)
from .parse import ParsedMessage, parse_message
from .store import TelemetryWriter, WriteResult
from .worker import IngestConfig, IngestStats, IngestWorker

__all__ = [
    "IngestConfig",
    "IngestConfigError",
    "IngestError",
    "IngestStats",
    "IngestWorker",
    "MalformedTelemetryError",
    "NotTelemetryTopicError",
    "ParsedMessage",
    "SpoofedDeviceError",
    "TelemetryWriter",
    "WriteResult",
    "cohort_metrics",
    "parse_message",
    "stage_metrics",
]
