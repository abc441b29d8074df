"""One error root for telemetry ingestion; subclasses name what was wrong with a message."""

from __future__ import annotations


class IngestError(Exception):
    """Root of ingestion errors."""

    #: short stable code used as the label of the drop counters
    code = "ingest_error"


class NotTelemetryTopicError(IngestError):
    """The topic is not ``edgefleet/v1/devices/{id}/telemetry/{kind}``."""

    code = "bad_topic"


class MalformedTelemetryError(IngestError):
    """The payload is not the protocol's ``{"device_id", "records": [...]}`` JSON."""

    code = "malformed"


class SpoofedDeviceError(IngestError):
    """The payload's ``device_id`` differs from the device id in the topic."""

    code = "spoofed"


class IngestConfigError(IngestError):
    """The ingestion worker's settings are unusable (bad broker address, credentials)."""

    code = "config"
