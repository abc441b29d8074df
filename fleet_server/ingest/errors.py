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


class RejectionCounter:
    """Telemetry rejected since start, per device and reason (thread-safe).

    Device ids come from topics the broker authenticated, so their number is bounded by
    the fleet; past ``max_devices`` distinct devices further ones count under ``"_other"``
    so a flood of ids cannot grow the metrics without bound.
    """

    def __init__(self, max_devices: int = 10_000) -> None:
        import threading

        self.max_devices = max_devices
        self._counts: dict[tuple[str, str], int] = {}
        self._devices: set[str] = set()
        self._lock = threading.Lock()

    def add(self, device_id: str, reasons: dict[str, int]) -> None:
        if not reasons:
            return
        with self._lock:
            if device_id not in self._devices:
                if len(self._devices) >= self.max_devices:
                    device_id = "_other"
                self._devices.add(device_id)
            for reason, n in reasons.items():
                key = (device_id, reason)
                self._counts[key] = self._counts.get(key, 0) + n

    def snapshot(self) -> dict[tuple[str, str], int]:
        """``{(device_id, reason): count}``."""
        with self._lock:
            return dict(self._counts)

    def by_device(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for (device, reason), n in self.snapshot().items():
            out.setdefault(device, {})[reason] = n
        return out

    def message(self, topic: str, error: IngestError) -> None:
        """Count a whole message refused with ``error`` under the device of ``topic``."""
        from device_agent.protocol import parse_device_topic

        try:
            device_id = parse_device_topic(topic)[0] or "_unknown"
        except ValueError:
            device_id = "_unknown"
        self.add(device_id, {f"{error.code}_message": 1})
