"""A real Mosquitto broker for tests, started on a free loopback port, plus a collector.

``MosquittoBroker`` writes its own config (listener on 127.0.0.1, persistence in
its own directory, raised queue limits, password file made with
``mosquitto_passwd``, per-device ACL), starts the broker, waits until it listens,
and stops or kills it by its own PID. ``restart()`` comes back on the same port,
so clients reconnect to the address they already know.

``MessageCollector`` is a paho subscriber that records every message it receives
(reconnecting and resubscribing on its own) and can wait for a condition.

Use the ``broker`` fixture (``from tests.brokers import broker_fixture  # noqa: F401``
in the test module) or build one:

    with MosquittoBroker(tmp_path, users={"dev-a": "pw"}) as b:
        ...
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"

SERVER_USER = "fleet-server"

#: the production ACL shape: a device writes only under its own id and reads its notify topic;
#: the server user reads and writes everything under edgefleet/v1/
DEVICE_ACL = f"""\
pattern write edgefleet/v1/devices/%u/#
pattern read edgefleet/v1/devices/%u/notify

user {SERVER_USER}
topic readwrite edgefleet/v1/#
"""


class BrokerError(RuntimeError):
    """The test broker could not be started or stopped; the message carries its log."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MosquittoBroker:
    """One Mosquitto process with its own config, data directory and loopback port."""

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        users: Mapping[str, str] | None = None,
        acl: str | None = None,
        *,
        persistence: bool = True,
        max_queued_messages: int = 100_000,
        max_inflight_messages: int = 1000,
        autosave_on_changes: int | None = None,
        port: int | None = None,
    ) -> None:
        if not os.path.exists(MOSQUITTO):
            raise BrokerError(f"mosquitto not found at {MOSQUITTO}; apt-get install mosquitto")
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.users = dict(users or {})
        self.acl = acl
        self.persistence = persistence
        self.max_queued_messages = max_queued_messages
        self.max_inflight_messages = max_inflight_messages
        self.autosave_on_changes = autosave_on_changes
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._fixed_port = port is not None
        self._log_offset = 0

    # ---------------------------------------------------------------- config

    @property
    def config_path(self) -> Path:
        return self.dir / "mosquitto.conf"

    @property
    def log_path(self) -> Path:
        return self.dir / "mosquitto.log"

    def _write_config(self) -> None:
        lines = [
            f"listener {self.port} 127.0.0.1",
            f"max_queued_messages {self.max_queued_messages}",
            "max_queued_bytes 0",
            f"max_inflight_messages {self.max_inflight_messages}",
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
        ]
        if os.geteuid() == 0:
            lines.append("user root")
        if self.persistence:
            data = self.dir / "data"
            data.mkdir(exist_ok=True)
            lines += ["persistence true", f"persistence_location {data}/"]
            if self.autosave_on_changes:
                # save after every N changes, so a SIGKILL loses (almost) nothing the
                # broker already acknowledged
                lines += [
                    "autosave_on_changes true",
                    f"autosave_interval {self.autosave_on_changes}",
                ]
            else:
                lines.append("autosave_interval 1800")
        if self.users:
            pw = self.dir / "passwd"
            pw.write_text("".join(f"{u}:{p}\n" for u, p in self.users.items()))
            pw.chmod(0o600)
            if not os.path.exists(MOSQUITTO_PASSWD):
                raise BrokerError(
                    f"{MOSQUITTO_PASSWD} not found; apt-get install mosquitto-clients"
                )
            subprocess.run([MOSQUITTO_PASSWD, "-U", str(pw)], check=True, capture_output=True)
            lines += ["allow_anonymous false", f"password_file {pw}"]
        else:
            lines.append("allow_anonymous true")
        if self.acl is not None:
            acl = self.dir / "acl"
            acl.write_text(self.acl)
            acl.chmod(0o600)
            lines.append(f"acl_file {acl}")
        self.config_path.write_text("\n".join(lines) + "\n")

    # ---------------------------------------------------------------- lifecycle

    def start(self, timeout: float = 10.0) -> MosquittoBroker:
        """Start the broker and wait until it accepts connections."""
        if self.running:
            return self
        for attempt in range(5):
            self._write_config()
            self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            self.proc = subprocess.Popen(
                [MOSQUITTO, "-c", str(self.config_path)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            try:
                self.wait_listening(timeout)
                self._fixed_port = True  # later starts come back on the same port
                return self
            except BrokerError:
                in_use = "Address already in use" in self.log()
                self._reap()
                if in_use and not self._fixed_port and attempt < 4:
                    self.port = free_port()
                    continue
                raise
        raise AssertionError("unreachable")

    def wait_listening(self, timeout: float = 10.0) -> None:
        """Poll until the port accepts a TCP connection; raise if the process exits first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise BrokerError(f"mosquitto exited during start-up; log:\n{self.log()}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection((self.host, self.port), timeout=0.2),
            ):
                return
            time.sleep(0.02)
        raise BrokerError(f"mosquitto did not listen on {self.port} in {timeout}s:\n{self.log()}")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop gracefully (SIGTERM: the broker saves its persistence file)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        self._reap()

    def kill(self) -> None:
        """Kill with SIGKILL: no goodbye, no persistence save."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self._reap()

    def pause(self) -> None:
        """SIGSTOP the broker: connections stay open but nothing is answered (no PUBACK)."""
        if self.proc is not None:
            os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        if self.proc is not None:
            os.kill(self.proc.pid, signal.SIGCONT)

    def restart(self, timeout: float = 10.0, *, kill: bool = False) -> None:
        """Stop (or kill) and start again on the same port."""
        if kill:
            self.kill()
        else:
            self.stop()
        self._fixed_port = True
        deadline = time.monotonic() + timeout
        while True:  # the old socket may linger for a moment
            try:
                self.start(timeout)
                return
            except BrokerError:
                if time.monotonic() > deadline or "Address already in use" not in self.log():
                    raise
                time.sleep(0.1)

    def _reap(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)
            if self.proc.stderr is not None:
                self.proc.stderr.close()
        self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def log(self) -> str:
        """The broker's log since the last start."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_offset)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def __enter__(self) -> MosquittoBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class Received:
    topic: str
    payload: bytes
    retain: bool
    qos: int

    def json(self) -> Any:
        return json.loads(self.payload)


@dataclass
class MessageCollector:
    """A paho subscriber that keeps every message it receives; for assertions.

    A persistent session (``clean_session=False``) with QoS 1 subscriptions, so the
    broker queues messages for it while it is disconnected.
    """

    broker: MosquittoBroker
    topics: Iterable[str]
    username: str | None = None
    password: str | None = None
    client_id: str = "collector"
    clean_session: bool = False
    messages: list[Received] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.topics = list(self.topics)
        self._cond = threading.Condition()
        self._seqs: set[int] = set()
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=self.clean_session,
            protocol=mqtt.MQTTv311,
        )
        if self.username is not None:
            self._client.username_pw_set(self.username, self.password)
        self._client.reconnect_delay_set(0.1, 0.5)  # type: ignore[arg-type]
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_subscribe = self._on_subscribe

    def start(self, timeout: float = 10.0) -> MessageCollector:
        self._client.connect_async(self.broker.host, self.broker.port, keepalive=10)
        self._client.loop_start()
        if not self.subscribed.wait(timeout):
            raise TimeoutError("collector did not connect and subscribe in time")
        return self

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        if rc.is_failure:
            return
        self.connected.set()
        client.subscribe([(t, 1) for t in self.topics])

    def _on_subscribe(self, *_args: Any) -> None:
        self.subscribed.set()

    def _on_disconnect(self, *_args: Any) -> None:
        self.connected.clear()
        self.subscribed.clear()

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        # parse outside the lock so a waiting test never slows the network thread
        seqs: list[int] = []
        if "/telemetry/" in msg.topic:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                seqs = [r["seq"] for r in json.loads(msg.payload)["records"]]
        with self._cond:
            self.messages.append(Received(msg.topic, bytes(msg.payload), msg.retain, msg.qos))
            self._seqs.update(seqs)
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[list[Received]], bool], timeout: float) -> bool:
        """Wait until ``predicate(messages)`` holds; return whether it did before the timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self.messages):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.5))
            return True

    def snapshot(self) -> list[Received]:
        with self._cond:
            return list(self.messages)

    def telemetry_seqs(self) -> set[int]:
        """Sequence numbers of every telemetry record received (duplicates collapse)."""
        with self._cond:
            return set(self._seqs)

    def wait_for_seqs(self, seqs: set[int], timeout: float) -> bool:
        """Wait until every sequence number in ``seqs`` has been received."""
        return self.wait_for(lambda _m: self._seqs >= seqs, timeout)

    def wait_for_count(self, n: int, timeout: float) -> bool:
        """Wait until at least ``n`` distinct telemetry records have been received."""
        return self.wait_for(lambda _m: len(self._seqs) >= n, timeout)

    def telemetry_records(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for m in self.snapshot():
            if "/telemetry/" in m.topic:
                out.extend(m.json()["records"])
        return out

    def __enter__(self) -> MessageCollector:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def publish_once(
    broker: MosquittoBroker,
    username: str,
    password: str,
    topic: str,
    payload: bytes,
    *,
    qos: int = 1,
    retain: bool = False,
    timeout: float = 10.0,
) -> None:
    """Connect as ``username``, publish one message, wait for PUBACK, disconnect."""
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"once-{time.monotonic_ns()}")
    c.username_pw_set(username, password)
    c.connect(broker.host, broker.port, keepalive=10)
    c.loop_start()
    try:
        c.publish(topic, payload, qos=qos, retain=retain).wait_for_publish(timeout)
    finally:
        c.disconnect()
        c.loop_stop()


#: users of the ``broker`` fixture: two devices and the server
FIXTURE_USERS = {"dev-a": "pw-a", "dev-b": "pw-b", SERVER_USER: "pw-server"}


@pytest.fixture(name="broker")
def broker_fixture(tmp_path: Path) -> Iterator[MosquittoBroker]:
    """A started Mosquitto with :data:`FIXTURE_USERS` and :data:`DEVICE_ACL`; stopped after."""
    b = MosquittoBroker(tmp_path / "broker", users=FIXTURE_USERS, acl=DEVICE_ACL)
    b.start()
    try:
        yield b
    finally:
        b.stop()
