"""A Mosquitto broker started beside the server, for one-machine set-ups and the demo.

It writes its own configuration into a directory: a loopback listener on a
free port, the dynamic security plugin's file with every user's password hash
(PBKDF2-SHA512, Mosquitto's ``$7$`` format, so no external tool is needed) and
one role per device (see :mod:`fleet_server.broker.dynsec`: a device may publish
only under its own id, subscribe only to its own notify and status topics, and
never join a shared group), and queue limits raised so QoS 1 messages are not
dropped past 1,000 in flight. Users added or removed later take effect on
:meth:`reload`, through the plugin's control topic, without dropping other
connections; a removed user's sessions are closed at once.
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from device_agent._fsutil import atomic_write_bytes
from fleet_server.broker import dynsec

SERVER_USER = "edgefleet-server"


class BrokerError(RuntimeError):
    """The broker could not be started; the message says what to install or free."""


def mosquitto_hash(password: str, *, iterations: int = 101, salt: bytes | None = None) -> str:
    """A password-file hash in Mosquitto 2's ``$7$`` (PBKDF2-SHA512) format."""
    salt = salt or os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def check_mosquitto_hash(stored: str, password: str) -> bool:
    """True if ``password`` matches a ``$7$`` hash made by :func:`mosquitto_hash`."""
    import hmac

    try:
        _, kind, iterations, salt, digest = stored.split("$")
        if kind != "7":
            return False
        got = hashlib.pbkdf2_hmac(
            "sha512", password.encode(), base64.b64decode(salt), int(iterations)
        )
        return hmac.compare_digest(base64.b64encode(got).decode(), digest)
    except (ValueError, TypeError):
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class TlsListener:
    """A TLS listener for devices: client certificates from the fleet CA required, the
    certificate's CN is the MQTT username (the device id)."""

    port: int
    ca_file: Path
    cert_file: Path
    key_file: Path
    bind: str = "127.0.0.1"
    #: revoked device certificates (PEM CRL from the fleet CA), re-read on SIGHUP
    crl_file: Path | None = None

    def config(self) -> str:
        return (
            f"listener {self.port} {self.bind}\n"
            + (f"crlfile {self.crl_file}\n" if self.crl_file is not None else "")
            + f"cafile {self.ca_file}\n"
            + f"certfile {self.cert_file}\n"
            f"keyfile {self.key_file}\n"
            "require_certificate true\n"
            "use_identity_as_username true\n"
            "tls_version tlsv1.2\n"
        )


class LocalMosquitto:
    """A Mosquitto process with its own config in ``root``; stop it with :meth:`stop`."""

    def __init__(
        self,
        root: Path,
        *,
        port: int | None = None,
        binary: str | None = None,
        tls: TlsListener | None = None,
    ) -> None:
        self.root = Path(root)
        #: devices connect here when set; ``port`` stays a loopback listener for the
        #: server's own sessions (password, 127.0.0.1 only)
        self.tls = tls
        self.port = port or free_port()
        self.binary = binary or shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        #: username -> ``$7$`` hash; users named SERVER_USER get the server role
        self.users: dict[str, str] = {}
        self.server_users: set[str] = {SERVER_USER}
        self.proc: subprocess.Popen[bytes] | None = None
        #: passwords given to add_user since the broker last learned its users
        self._pending: dict[str, str | None] = {}
        #: the users the running broker knows
        self._applied: set[str] = set()
        #: a fresh admin password per start; only this object uses it
        self._admin_password = secrets.token_urlsafe(24)

    @staticmethod
    def available() -> bool:
        return bool(shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists())

    def add_user(self, username: str, password: str) -> None:
        """Admit ``username`` (a device id, or SERVER_USER); effective on start/reload."""
        self.users[username] = mosquitto_hash(password)
        self._pending[username] = password

    def add_certificate_user(self, username: str) -> None:
        """Admit ``username`` by client certificate only (no password can log it in)."""
        self.users[username] = ""
        self._pending[username] = None

    def remove_user(self, username: str) -> None:
        """Refuse ``username`` from the next :meth:`reload` on (its sessions are closed)."""
        self.users.pop(username, None)
        self._pending.pop(username, None)

    def _write(self) -> Path:
        plugin = dynsec.find_plugin()
        if plugin is None:
            raise BrokerError(
                "mosquitto_dynamic_security.so was not found; install Mosquitto 2 from your "
                "distribution (Debian/Ubuntu: `apt-get install mosquitto`)"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in ("passwords", "acl"):  # the file ACL of earlier versions
            (self.root / stale).unlink(missing_ok=True)
        doc = dynsec.config_document(
            {**self.users, dynsec.ADMIN_USER: mosquitto_hash(self._admin_password)},
            server_users=sorted(self.server_users),
            admin_users=[dynsec.ADMIN_USER],
        )
        rules = self.root / "dynamic-security.json"
        atomic_write_bytes(rules, json.dumps(doc, indent=1).encode(), mode=0o600)
        conf = self.root / "mosquitto.conf"
        conf.write_text(
            # run as whoever started us: as root, mosquitto would otherwise drop to the
            # "mosquitto" user, which cannot read this directory's files
            f"user {getpass.getuser()}\n"
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous false\n"
            f"plugin {plugin}\n"
            f"plugin_opt_config_file {rules}\n"
            # the ingest worker's session and the messages queued for it survive a
            # restart of the server (and of this broker with it)
            "persistence true\n"
            f"persistence_location {self.root}/\n"
            "autosave_interval 60\n"
            "max_queued_messages 200000\n"
            "max_inflight_messages 0\n"
            "max_keepalive 600\n"
            + (self.tls.config() if self.tls is not None else "")
            + f"log_dest file {self.root / 'mosquitto.log'}\n"
            "log_type error\nlog_type warning\nlog_type notice\n"
        )
        return conf

    def start(self, timeout: float = 10.0) -> LocalMosquitto:
        if not Path(self.binary).exists():
            raise BrokerError("mosquitto is not installed; `apt-get install mosquitto`")
        conf = self._write()
        self._applied = set(self.users)
        self._pending.clear()
        self.proc = subprocess.Popen(
            [self.binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise BrokerError(f"mosquitto exited at start: {err.strip()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise BrokerError(f"mosquitto did not listen on 127.0.0.1:{self.port} in {timeout}s")

    def reload(self) -> None:
        """Tell the running broker about users added or removed since it last learned them.

        Raises :class:`~fleet_server.broker.dynsec.DynsecError` if the broker refused.
        """
        if self.proc is None or self.proc.poll() is not None:
            return
        commands: list[dict[str, object]] = []
        for user in sorted(self._applied - set(self.users)):
            commands += dynsec.remove_device_commands(user)
        for user, password in sorted(self._pending.items()):
            if user not in self.users:
                continue
            if user in self.server_users:
                commands += dynsec.add_client_commands(user, password, dynsec.SERVER_ROLE)
            else:
                commands += dynsec.add_device_commands(user, password)
        self.control().run(commands)
        self._applied = set(self.users)
        self._pending.clear()

    def reload_tls(self) -> None:
        """Make Mosquitto re-read its TLS files, the CRL among them (SIGHUP)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGHUP)

    def control(self) -> dynsec.DynsecControl:
        """A client for the broker's dynamic-security control topic, as its admin."""
        endpoint = dynsec.ControlEndpoint(
            "127.0.0.1", self.port, dynsec.ADMIN_USER, self._admin_password
        )
        return dynsec.DynsecControl(endpoint)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None
