"""Telling devices over MQTT that their assignment changed.

:class:`MqttNotifier` publishes QoS 1 messages to ``edgefleet/v1/devices/{id}/notify``
through an :class:`~device_agent.transport.mqtt.MqttSession` (the project's one module
over paho, with its reconnect policy); publishing only enqueues. With no broker
configured the server uses :class:`NullNotifier` and devices simply poll.
"""

from __future__ import annotations

import json
import logging
import os

from device_agent.protocol import notify_topic
from device_agent.transport import Backoff, TransportError
from device_agent.transport.mqtt import MqttSession

log = logging.getLogger(__name__)


class NullNotifier:
    """Used when no broker is configured: devices find changes by polling."""

    def notify(self, device_id: str, assignment_id: str) -> None:
        return None

    def close(self) -> None:
        return None


class MqttNotifier:
    """Publishes assignment-changed notices; reconnects by itself."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        username: str = "",
        password: str = "",
        client_id: str = "",
        mqtt_version: int = 5,
    ) -> None:
        self._session = MqttSession(
            client_id or f"edgefleet-notify-{os.getpid()}-{id(self):x}",
            host,
            port,
            username=username or None,
            password=password or None,
            mqtt_version=mqtt_version,
            backoff=Backoff(initial=1.0, maximum=30.0),
            name="notify",
        ).start()

    def notify(self, device_id: str, assignment_id: str) -> None:
        payload = json.dumps({"assignment_id": assignment_id}).encode()
        try:
            self._session.publish(notify_topic(device_id), payload, qos=1)
        except TransportError as e:
            log.warning("notify %s not queued (%s); the device will poll", device_id, e)

    def close(self) -> None:
        self._session.stop()
