"""Telling devices over MQTT that their assignment changed.

paho stays behind this one module: :class:`MqttNotifier` publishes QoS 1
messages to ``edgefleet/v1/devices/{id}/notify`` from paho's own network
thread (``loop_start``); publishing only enqueues. With no broker configured
the server uses :class:`NullNotifier` and devices simply poll.
"""

from __future__ import annotations

import json
import logging
import threading

from device_agent.protocol import notify_topic

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
        import paho.mqtt.client as mqtt

        self._client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv311 if mqtt_version == 4 else mqtt.MQTTv5,
        )
        if username:
            self._client.username_pw_set(username, password or None)
        self._client.reconnect_delay_set(1, 30)
        self._lock = threading.Lock()
        self._client.connect_async(host, port, keepalive=60)
        self._client.loop_start()

    def notify(self, device_id: str, assignment_id: str) -> None:
        payload = json.dumps({"assignment_id": assignment_id}).encode()
        with self._lock:
            info = self._client.publish(notify_topic(device_id), payload, qos=1)
        if info.rc != 0:
            log.warning("notify %s not queued (rc=%s); the device will poll", device_id, info.rc)

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()
