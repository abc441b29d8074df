"""A Mosquitto broker started beside the server, for one-machine set-ups and the demo.

It writes its own configuration into a directory: a loopback listener on a
free port, a password file (PBKDF2-SHA512, Mosquitto's ``$7$`` format, so no
external tool is needed), per-device ACLs (a device may publish only under its
own id and read only its own notify topic), and queue limits raised so QoS 1
messages are not dropped past 1,000 in flight. Credentials added later take
effect on :meth:`reload` (SIGHUP), without dropping connections.
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

SERVER_USER = "edgefleet-server"

ACL = """\
# the fleet server: ingests every device's telemetry, notifies devices
user {server_user}
topic readwrite edgefleet/v1/#

# every device: its own topics only (%u is the MQTT username = device id)
pattern write edgefleet/v1/devices/%u/telemetry/#
pattern readwrite edgefleet/v1/devices/%u/status
pattern read edgefleet/v1/devices/%u/notify
"""


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


class LocalMosquitto:
    """A Mosquitto process with its own config in ``root``; stop it with :meth:`stop`."""

    def __init__(self, root: Path, *, port: int | None = None, binary: str | None = None) -> None:
        self.root = Path(root)
        self.port = port or free_port()
        self.binary = binary or shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.users: dict[str, str] = {}
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> bool:
        return bool(shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists())

    def add_user(self, username: str, password: str) -> None:
        self.users[username] = mosquitto_hash(password)

    def _write(self) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        pw = self.root / "passwords"
        tmp = pw.with_suffix(".tmp")
        tmp.write_text("".join(f"{u}:{h}\n" for u, h in sorted(self.users.items())))
        os.chmod(tmp, 0o600)
        os.replace(tmp, pw)
        (self.root / "acl").write_text(ACL.format(server_user=SERVER_USER))
        conf = self.root / "mosquitto.conf"
        conf.write_text(
            # run as whoever started us: as root, mosquitto would otherwise drop to the
            # "mosquitto" user, which cannot read this directory's files
            f"user {getpass.getuser()}\n"
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous false\n"
            f"password_file {pw}\n"
            f"acl_file {self.root / 'acl'}\n"
            "persistence false\n"
            "max_queued_messages 200000\n"
            "max_inflight_messages 0\n"
            "max_keepalive 600\n"
            f"log_dest file {self.root / 'mosquitto.log'}\n"
            "log_type error\nlog_type warning\nlog_type notice\n"
        )
        return conf

    def start(self, timeout: float = 10.0) -> LocalMosquitto:
        if not Path(self.binary).exists():
            raise BrokerError("mosquitto is not installed; `apt-get install mosquitto`")
        conf = self._write()
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
        """Rewrite the password file and make Mosquitto re-read it (SIGHUP)."""
        self._write()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGHUP)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None
