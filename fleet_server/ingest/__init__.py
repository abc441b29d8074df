"""Telemetry ingestion: MQTT 5 shared subscription -> checks -> batched idempotent writes.

:mod:`.parse` (pure) checks and converts one message, :mod:`.store` writes
batches, :mod:`.worker` runs the subscriber. Stored telemetry becomes the rollout
engine's cohort figures in :mod:`fleet_server.rollouts.figures`.
"""

from fleet_server.ingest.errors import (
    IngestConfigError,
    IngestError,
    MalformedTelemetryError,
    NotTelemetryTopicError,
    SpoofedDeviceError,
)
from fleet_server.ingest.parse import ParsedMessage, parse_message
from fleet_server.ingest.store import TelemetryWriter, WriteResult
from fleet_server.ingest.worker import IngestConfig, IngestStats, IngestWorker

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
    "parse_message",
]
