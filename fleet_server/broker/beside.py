"""A broker started beside the server (one-machine set-ups), with device credentials kept
in step with enrollment.

``broker = "mosquitto"`` runs :class:`~fleet_server.broker.mosquitto.LocalMosquitto`,
``broker = "embedded"`` the in-process :class:`~fleet_server.broker.embedded.EmbeddedBroker`
(MQTT 3.1.1). The server's own MQTT password and every enrolled device's credential hash
(never the credential) are kept in ``broker_dir/users.json`` so a restart keeps them; a device
enrolled through the device API can connect at once, a revoked one no longer can.

The broker keeps its port across restarts: ``port`` when given (the ``broker_port``
setting), else the port recorded in ``broker_dir/broker.json`` by the last start, else a
free port chosen once and recorded. A server holds ``broker_dir/server.lock`` while it
runs, so a second server pointed at the same directory refuses to start instead of
rewriting the running server's broker files.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import sys
import threading
from pathlib import Path
from typing import IO, Any

from device_agent._fsutil import atomic_write_bytes
from fleet_server.broker.embedded import EmbeddedBroker
from fleet_server.broker.mosquitto import (
    SERVER_USER,
    BrokerError,
    LocalMosquitto,
    TlsListener,
    free_port,
)
from fleet_server.pki.ca import FleetCA, write_server_files


def _hold_lock(root: Path) -> IO[str]:
    """Take ``root/server.lock`` for this process, or raise BrokerError naming the holder."""
    f = open(root / "server.lock", "a+")  # noqa: SIM115 - held for the server's lifetime
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise BrokerError(
            f"broker_dir {root} is in use by a running server (pid {holder}); stop it, or "
            "give this server its own broker_dir"
        ) from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f


def _recorded_port(root: Path, key: str = "port") -> int | None:
    try:
        port = json.loads((root / "broker.json").read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        return None
    return port if isinstance(port, int) and 0 < port < 65536 else None


class BrokerBeside:
    """Owns the broker process/thread and its user table."""

    def __init__(
        self,
        kind: str,
        root: Path,
        port: int | None = None,
        *,
        ca: FleetCA | None = None,
        tls_port: int | None = None,
        tls_names: list[str] | None = None,
    ) -> None:
        if kind not in ("mosquitto", "embedded"):
            raise ValueError(f"broker must be none, mosquitto or embedded, not {kind!r}")
        if ca is not None and kind != "mosquitto":
            raise BrokerError("device TLS (ca_dir) needs broker = mosquitto")
        self.kind = kind
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self._lockfile: IO[str] | None = _hold_lock(self.root)
        self.port = port or _recorded_port(self.root) or free_port()
        self.ca = ca
        self.tls: TlsListener | None = None
        self._certs_file = self.root / "certificates.json"
        if ca is not None:
            tls_dir = self.root / "tls"
            key, cert = write_server_files(ca, tls_dir, tls_names or ["127.0.0.1", "localhost"])
            self._crl_file = tls_dir / "crl.pem"
            self.tls = TlsListener(
                tls_port or _recorded_port(self.root, "tls_port") or free_port(),
                ca.cert_path,
                cert,
                key,
                crl_file=self._crl_file,
            )
            self._write_crl()
        self._users_file = self.root / "users.json"
        self._lock = threading.Lock()
        users = self._load()
        secret_file = self.root / "server-password"
        if not secret_file.exists():
            atomic_write_bytes(secret_file, secrets.token_urlsafe(24).encode(), mode=0o600)
        self.server_password = secret_file.read_text().strip()
        users.pop(SERVER_USER, None)
        self.broker: LocalMosquitto | EmbeddedBroker = (
            LocalMosquitto(self.root / "mosquitto", port=self.port, tls=self.tls)
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
        try:
            self.broker.start()
        except BrokerError as e:
            raise BrokerError(
                f"{e}; the broker keeps port {self.port} across restarts (recorded in "
                f"{self.root / 'broker.json'}): free it or set broker_port"
            ) from e
        info = {
            "kind": self.kind,
            "host": "127.0.0.1",
            "port": self.port,
            "mqtt_version": self.mqtt_version,
        }
        if self.tls is not None:
            info["tls_port"] = self.tls.port
        atomic_write_bytes(self.root / "broker.json", json.dumps(info).encode() + b"\n")
        print(
            f"edgefleet: {self.kind} broker listening on mqtt://127.0.0.1:{self.port} "
            + (
                f"(server sessions only) and mqtts://127.0.0.1:{self.tls.port} for devices "
                "(client certificates from the fleet CA) "
                if self.tls is not None
                else "(plain TCP, passwords: development only; set ca_dir for TLS) "
            )
            + f"(MQTT {'3.1.1' if self.mqtt_version == 4 else '5'}; files in {self.root})",
            file=sys.stderr,
            flush=True,
        )

    def stop(self) -> None:
        try:
            self.broker.stop()
        finally:
            self.release()

    def release(self) -> None:
        """Let another server use this broker_dir (called by :meth:`stop`)."""
        if self._lockfile is not None:
            self._lockfile.close()
            self._lockfile = None

    def add_device(self, device_id: str, credential: str) -> None:
        """Let ``device_id`` connect with ``credential`` (its MQTT password)."""
        with self._lock:
            self.broker.add_user(device_id, credential)
            self._save()
            self.broker.reload()

    def add_certificate_device(self, device_id: str, serial: int) -> None:
        """Let ``device_id`` connect with the client certificate of ``serial`` (TLS)."""
        if not isinstance(self.broker, LocalMosquitto) or self.tls is None:
            raise BrokerError("this broker has no TLS listener for devices (set ca_dir)")
        with self._lock:
            certs = self._certificates()
            certs.setdefault(device_id, []).append(serial)
            atomic_write_bytes(self._certs_file, json.dumps(certs).encode(), mode=0o600)
            self.broker.add_certificate_user(device_id)
            self._save()
            self.broker.reload()

    def add_certificate_serial(self, device_id: str, serial: int) -> None:
        """Record a renewed certificate of an admitted device (revoked with the device)."""
        with self._lock:
            certs = self._certificates()
            certs.setdefault(device_id, []).append(serial)
            atomic_write_bytes(self._certs_file, json.dumps(certs).encode(), mode=0o600)

    def remove_device(self, device_id: str) -> None:
        """Refuse ``device_id`` from now on: its open sessions are closed and, with TLS,
        its certificates are revoked (CRL re-read by the broker at once)."""
        with self._lock:
            # the CRL first: once the session is closed, a reconnect must fail the handshake
            certs = self._certificates()
            if self.tls is not None and certs.get(device_id):
                revoked = certs.setdefault("_revoked", [])
                revoked.extend(certs.pop(device_id))
                atomic_write_bytes(self._certs_file, json.dumps(certs).encode(), mode=0o600)
                self._write_crl()
                if isinstance(self.broker, LocalMosquitto):
                    self.broker.reload_tls()
            if device_id in self.broker.users:
                self.broker.remove_user(device_id)
                self._save()
                self.broker.reload()

    def _certificates(self) -> dict[str, list[int]]:
        try:
            data: Any = json.loads(self._certs_file.read_text())
        except FileNotFoundError:
            return {}
        return {str(k): [int(x) for x in v] for k, v in dict(data).items()}

    def _write_crl(self) -> None:
        if self.ca is not None:
            revoked = self._certificates().get("_revoked", [])
            atomic_write_bytes(self._crl_file, self.ca.crl(revoked))


__all__ = ["BrokerBeside"]
