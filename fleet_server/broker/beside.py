"""A broker started beside the server (one-machine set-ups), with device credentials kept
in step with enrollment.

``broker = "mosquitto"`` runs :class:`~fleet_server.broker.mosquitto.LocalMosquitto`,
``broker = "embedded"`` the in-process :class:`~fleet_server.broker.embedded.EmbeddedBroker`
(MQTT 3.1.1). The server's own MQTT password and every enrolled device's credential hash
(never the credential) are kept in ``broker_dir/users.json`` so a restart keeps them; a device
enrolled through the device API can connect at once, a revoked one no longer can.
"""

from __future__ import annotations

import json
import secrets
import threading
from pathlib import Path
from typing import Any

from device_agent._fsutil import atomic_write_bytes
from fleet_server.broker.embedded import EmbeddedBroker
from fleet_server.broker.mosquitto import SERVER_USER, LocalMosquitto, free_port


class BrokerBeside:
    """Owns the broker process/thread and its user table."""

    def __init__(self, kind: str, root: Path, port: int | None = None) -> None:
        if kind not in ("mosquitto", "embedded"):
            raise ValueError(f"broker must be none, mosquitto or embedded, not {kind!r}")
        self.kind = kind
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self._users_file = self.root / "users.json"
        self._lock = threading.Lock()
        users = self._load()
        secret_file = self.root / "server-password"
        if not secret_file.exists():
            atomic_write_bytes(secret_file, secrets.token_urlsafe(24).encode(), mode=0o600)
        self.server_password = secret_file.read_text().strip()
        users.pop(SERVER_USER, None)
        self.broker: LocalMosquitto | EmbeddedBroker = (
            LocalMosquitto(self.root / "mosquitto", port=self.port)
            if kind == "mosquitto"
            else EmbeddedBroker(self.root / "embedded", port=self.port)
        )
        self.broker.users.update(users)
        self.broker.add_user(SERVER_USER, self.server_password)
        self._save()

    @property
    def mqtt_version(self) -> int:
        return 4 if self.kind == "embedded" else 5

    def _load(self) -> dict[str, str]:
        try:
            data: Any = json.loads(self._users_file.read_text())
        except FileNotFoundError:
            return {}
        return {str(k): str(v) for k, v in dict(data).items()}

    def _save(self) -> None:
        atomic_write_bytes(
            self._users_file,
            json.dumps(self.broker.users, indent=1, sort_keys=True).encode(),
            mode=0o600,
        )

    def start(self) -> None:
        """Start the broker and write ``broker_dir/broker.json`` (where devices connect)."""
        self.broker.start()
        info = {
            "kind": self.kind,
            "host": "127.0.0.1",
            "port": self.port,
            "mqtt_version": self.mqtt_version,
        }
        atomic_write_bytes(self.root / "broker.json", json.dumps(info).encode() + b"\n")

    def stop(self) -> None:
        self.broker.stop()

    def add_device(self, device_id: str, credential: str) -> None:
        """Let ``device_id`` connect with ``credential`` (its MQTT password)."""
        with self._lock:
            self.broker.add_user(device_id, credential)
            self._save()
            self.broker.reload()

    def remove_device(self, device_id: str) -> None:
        """Refuse ``device_id`` from now on; its open sessions are closed."""
        with self._lock:
            if device_id in self.broker.users:
                self.broker.remove_user(device_id)
                self._save()
                self.broker.reload()


__all__ = ["BrokerBeside"]
