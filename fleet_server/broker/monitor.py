"""What the server knows of its broker: whether it is connected, and which devices are.

:class:`BrokerMonitor` keeps one MQTT session (the one MQTT module,
:class:`device_agent.transport.mqtt.MqttSession`) subscribed to every device's retained
status topic. A device publishes ``{"state": "online", ...}`` there on every connect and
its last will says ``offline``, so the monitor counts the devices connected now without
asking the broker. Status messages are checked against
:class:`device_agent.protocol.DeviceStatus`; the sent high-water marks in them
(``sent``) are kept per device for the loss figures.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any

from pydantic import TypeAdapter, ValidationError

from device_agent.protocol import TOPIC_ROOT, DeviceStatus, SentMark, parse_device_topic
from device_agent.transport.mqtt import MqttSession

log = logging.getLogger(__name__)

_STATUS: TypeAdapter[DeviceStatus] = TypeAdapter(DeviceStatus)


class BrokerMonitor:
    """Tracks broker connectivity and devices' online state from their status topics."""

    def __init__(self, session: MqttSession) -> None:
        self.session = session
        self._online: dict[str, bool] = {}
        self._sent: dict[str, dict[str, SentMark]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def connect(
        cls,
        host: str,
        port: int,
        *,
        username: str | None,
        password: str | None,
        mqtt_version: int,
        tls: Any = None,
        client_id: str = "",
    ) -> BrokerMonitor:
        import os
        import socket

        session = MqttSession(
            client_id or f"edgefleet-monitor-{socket.gethostname()}-{os.getpid()}",
            host,
            port,
            username=username,
            password=password,
            tls=tls,
            mqtt_version=mqtt_version,
            subscriptions=[(f"{TOPIC_ROOT}/+/status", 1)],
            messages_max=10_000,
            name="broker-monitor",
        )
        return cls(session)

    def start(self) -> BrokerMonitor:
        self.session.start()
        self._thread = threading.Thread(target=self._run, name="broker-monitor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        self.session.stop()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                msg = self.session.messages.get(timeout=0.2)
            except queue.Empty:
                continue
            self.observe(msg.topic, msg.payload)

    def observe(self, topic: str, payload: bytes) -> None:
        """Take one status message (an empty retained payload clears the device)."""
        try:
            device_id, channel, _ = parse_device_topic(topic)
        except ValueError:
            return
        if channel != "status":
            return
        if not payload:
            with self._lock:
                self._online.pop(device_id, None)
            return
        try:
            status = _STATUS.validate_json(payload)
        except ValidationError as e:
            log.info("status of %s breaks the contract: %s", device_id, e.errors()[0]["msg"])
            return
        with self._lock:
            self._online[device_id] = status.state == "online"
            if status.sent:
                self._sent[device_id] = dict(status.sent)

    @property
    def connected(self) -> bool:
        return self.session.connected

    def connected_devices(self) -> int:
        with self._lock:
            return sum(1 for v in self._online.values() if v)

    def sent_marks(self) -> dict[str, dict[str, SentMark]]:
        """Per device, the sent high-water marks of its last status (copy)."""
        with self._lock:
            return {d: dict(m) for d, m in self._sent.items()}

    def health(self) -> dict[str, Any]:
        return {
            "connected": self.connected,
            "address": f"{self.session.host}:{self.session.port}",
            "connected_devices": self.connected_devices(),
            "last_error": self.session.last_error or None,
        }


__all__ = ["BrokerMonitor"]
