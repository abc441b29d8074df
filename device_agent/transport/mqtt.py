"""MQTT transport: the one module of ours that talks to paho-mqtt (2.x, callback API v2).

Shape:

* a supervisor thread of ours connects and reconnects with exponential backoff plus
  jitter (:class:`~device_agent.transport.Backoff`); for each session it runs
  paho's network thread (``loop_start``, with paho's own reconnect turned off),
  which does all socket I/O;
* paho callbacks do nothing but put events on our ``queue.Queue``; the supervisor
  handles them (completing publish handles, tracking the connection,
  re-subscribing, queueing notifications);
* on every connect the device publishes a retained ``{"state": "online", ...}`` on
  its status topic; the last will is a retained ``{"state": "offline"}``; a clean
  :meth:`MqttTransport.stop` publishes ``offline`` itself (a clean disconnect
  does not fire the will);
* QoS 1 messages not yet acknowledged when the connection drops stay queued in
  paho and are re-sent on reconnect, so a :class:`PublishHandle` completes late
  rather than failing;
* the device's notify topic is subscribed on every connect; messages on it land
  in :attr:`MqttTransport.notifications`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import socket
import ssl
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from ..protocol import notify_topic, status_topic
from . import Backoff, PublishHandle, PublishRefusedError, TransportConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TlsOptions:
    """TLS settings; ``ca_file`` None means the system trust store."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None


@dataclass(frozen=True)
class Notification:
    """A message the server sent to this device's notify topic."""

    topic: str
    payload: bytes
    received_at: float


@dataclass(frozen=True)
class _Event:
    kind: str  # connected | connect_failed | disconnected | published | message
    mid: int = 0
    ok: bool = True
    reason: str = ""
    topic: str = ""
    payload: bytes = b""


class MqttTransport:
    """A device's MQTT session: status, last will, QoS 1 publishes, notify subscription."""

    def __init__(
        self,
        device_id: str,
        host: str,
        port: int = 1883,
        *,
        username: str | None = None,
        password: str | None = None,
        tls: TlsOptions | None = None,
        keepalive: int = 60,
        client_id: str | None = None,
        max_inflight: int = 100,
        mqtt_version: int = 4,
        backoff: Backoff | None = None,
        status_extra: Mapping[str, Any] | None = None,
        connect_timeout: float = 5.0,
    ) -> None:
        if not host:
            raise TransportConfigError("MQTT host is empty; set [mqtt] host in the agent config")
        if not 0 < port < 65536:
            raise TransportConfigError(f"MQTT port {port} is not a TCP port")
        if mqtt_version not in (4, 5):
            raise TransportConfigError("mqtt_version must be 4 (MQTT 3.1.1) or 5")
        self.device_id = device_id
        self.host, self.port = host, port
        self.keepalive = keepalive
        self.backoff = backoff or Backoff()
        self.status_extra = dict(status_extra or {})
        self.notifications: queue.Queue[Notification] = queue.Queue()
        self.last_error = ""
        self._events: queue.Queue[_Event] = queue.Queue()
        self._handles: dict[int, PublishHandle] = {}
        #: PUBACKs handled before publish() registered the handle (mid -> outcome)
        self._early_acks: dict[int, tuple[bool, str]] = {}
        #: mids of the transport's own status publishes, which have no handle
        self._own_mids: set[int] = set()
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._stop = threading.Event()
        self._epoch = 0
        self._thread: threading.Thread | None = None
        self._handshake_timeout = connect_timeout + 10.0
        self._status_topic = status_topic(device_id)
        self._notify_topic = notify_topic(device_id)
        protocol = mqtt.MQTTv5 if mqtt_version == 5 else mqtt.MQTTv311
        kwargs: dict[str, Any] = {"protocol": protocol, "reconnect_on_failure": False}
        if protocol == mqtt.MQTTv311:
            kwargs["clean_session"] = True
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or device_id, **kwargs)
        c.connect_timeout = connect_timeout
        if username:
            c.username_pw_set(username, password)
        if tls is not None:
            for name in ("ca_file", "cert_file", "key_file"):
                p = getattr(tls, name)
                if p is not None and not Path(p).is_file():
                    raise TransportConfigError(f"TLS {name} {p} does not exist")
            c.tls_set(
                ca_certs=str(tls.ca_file) if tls.ca_file else None,
                certfile=str(tls.cert_file) if tls.cert_file else None,
                keyfile=str(tls.key_file) if tls.key_file else None,
                cert_reqs=ssl.CERT_REQUIRED,
            )
        c.max_inflight_messages_set(max_inflight)
        c.max_queued_messages_set(0)
        c.will_set(self._status_topic, self._status_payload("offline"), qos=1, retain=True)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_publish = self._on_publish
        c.on_message = self._on_message
        self._client = c

    @classmethod
    def from_config(cls, cfg: Any, **overrides: Any) -> MqttTransport:
        """Build from an :class:`~device_agent.config.AgentConfig` (reads the password file)."""
        m = cfg.mqtt
        password = None
        if m.password_file is not None:
            try:
                password = Path(m.password_file).read_text().strip()
            except OSError as e:
                raise TransportConfigError(
                    f"cannot read mqtt.password_file {m.password_file}: {e}"
                ) from e
        tls = TlsOptions(ca_file=m.ca_file) if m.tls else None
        kwargs: dict[str, Any] = dict(
            username=m.username or cfg.device.id,
            password=password,
            tls=tls,
            keepalive=m.keepalive,
            max_inflight=m.inflight,
        )
        kwargs.update(overrides)
        return cls(cfg.device.id, m.host, m.port, **kwargs)

    # ---------------------------------------------------------------- public API

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def connection_epoch(self) -> int:
        return self._epoch

    def start(self) -> MqttTransport:
        """Start the network thread; it connects (and keeps reconnecting) in the background."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(
                target=self._run, name=f"mqtt-{self.device_id}", daemon=True
            )
            self._thread.start()
        return self

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def publish(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False
    ) -> PublishHandle:
        """Queue a message at QoS 1 or 2; the handle completes on PUBACK (PUBCOMP)."""
        if qos not in (1, 2):
            raise ValueError("the transport publishes at QoS 1 or 2 only (it tracks every ack)")
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            raise PublishRefusedError(
                f"paho refused to queue a message on {topic}: {mqtt.error_string(info.rc)}"
            )
        handle = PublishHandle(info.mid)
        with self._lock:
            # the PUBACK may already have been handled before we got here
            early = self._early_acks.pop(info.mid, None)
            if early is None:
                self._handles[info.mid] = handle
        if early is not None:
            handle._complete(*early)
        return handle

    def set_status(self, **fields: Any) -> PublishHandle:
        """Publish a new retained ``online`` status with extra fields (kept for reconnects)."""
        self.status_extra.update(fields)
        return self.publish(self._status_topic, self._status_payload("online"), qos=1, retain=True)

    def stop(self, timeout: float = 5.0) -> None:
        """Publish a retained ``offline`` status, disconnect, and stop the network thread."""
        if self._thread is None:
            return
        if self.connected:
            h = self.publish(
                self._status_topic, self._status_payload("offline"), qos=1, retain=True
            )
            h.wait(timeout)
        self._stop.set()
        self._thread.join(timeout + 5)
        self._thread = None

    def pending_handles(self) -> int:
        """QoS 1 messages published but not yet acknowledged."""
        with self._lock:
            return len(self._handles)

    # ---------------------------------------------------------------- paho callbacks
    # They run on paho's network thread and only enqueue events.

    def _on_connect(self, _c: Any, _u: Any, _flags: Any, rc: Any, _props: Any) -> None:
        if rc.is_failure:
            self._events.put(_Event("connect_failed", ok=False, reason=str(rc)))
        else:
            self._events.put(_Event("connected"))

    def _on_disconnect(self, _c: Any, _u: Any, _flags: Any, rc: Any, _props: Any) -> None:
        self._events.put(_Event("disconnected", reason=str(rc)))

    def _on_publish(self, _c: Any, _u: Any, mid: int, rc: Any, _props: Any) -> None:
        self._events.put(_Event("published", mid=mid, ok=not rc.is_failure, reason=str(rc)))

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        self._events.put(_Event("message", topic=msg.topic, payload=bytes(msg.payload)))

    # ---------------------------------------------------------------- supervisor thread

    def _run(self) -> None:
        """Connect, let paho's network thread serve the session, handle events, back off."""
        while not self._stop.is_set():
            try:
                self._client.connect(self.host, self.port, self.keepalive)
            except (OSError, ValueError) as e:
                self.last_error = f"connect to {self.host}:{self.port} failed: {e}"
                log.info("%s; retrying", self.last_error)
                self._stop.wait(self.backoff.next())
                continue
            # paho's thread does all socket I/O; it returns when the session ends
            # because the client is built with reconnect_on_failure=False
            self._client.loop_start()
            self._serve()
            self._client.loop_stop()
            self._connected.clear()
            self._drain_events()
            if not self._stop.is_set():
                self._stop.wait(self.backoff.next())
        self._connected.clear()

    def _serve(self) -> None:
        """Handle events until the session ends; on stop, disconnect cleanly first."""
        started = time.monotonic()
        stop_deadline: float | None = None
        while True:
            if self._stop.is_set() and stop_deadline is None:
                stop_deadline = time.monotonic() + 2.0
                self._client.disconnect()
            try:
                ev = self._events.get(timeout=0.1)
            except queue.Empty:
                now = time.monotonic()
                if stop_deadline is not None and now > stop_deadline:
                    self._abort_socket()
                    return
                if not self._connected.is_set() and now - started > self._handshake_timeout:
                    self.last_error = "no CONNACK from the broker; reconnecting"
                    self._abort_socket()
                    return
                continue
            if not self._handle(ev):
                return

    def _abort_socket(self) -> None:
        """Shut the socket down so paho's thread ends even if the peer never answers."""
        sock = self._client.socket()
        if isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _drain_events(self) -> None:
        """Handle whatever events are already queued."""
        while True:
            try:
                ev = self._events.get_nowait()
            except queue.Empty:
                return
            self._handle(ev)

    def _handle(self, ev: _Event) -> bool:
        """Act on one callback event; False once the session is gone."""
        if ev.kind == "published":
            with self._lock:
                handle = self._handles.pop(ev.mid, None)
                if handle is None:
                    if ev.mid in self._own_mids:
                        self._own_mids.discard(ev.mid)
                    else:
                        self._early_acks[ev.mid] = (ev.ok, ev.reason)
            if handle is not None:
                handle._complete(ev.ok, ev.reason)
        elif ev.kind == "connected":
            self._epoch += 1
            self.backoff.reset()
            self.last_error = ""
            self._client.subscribe(self._notify_topic, qos=1)
            info = self._client.publish(
                self._status_topic, self._status_payload("online"), qos=1, retain=True
            )
            with self._lock:
                self._own_mids.add(info.mid)
            self._connected.set()
        elif ev.kind == "connect_failed":
            self.last_error = f"broker refused the connection: {ev.reason}"
            log.warning("%s; check mqtt username/password", self.last_error)
            return False
        elif ev.kind == "disconnected":
            self._connected.clear()
            if not self.last_error and not self._stop.is_set():
                self.last_error = f"connection lost: {ev.reason}"
            return False
        elif ev.kind == "message" and ev.topic == self._notify_topic:
            self.notifications.put(Notification(ev.topic, ev.payload, time.time()))
        return True

    def _status_payload(self, state: str) -> bytes:
        body: dict[str, Any] = {"state": state, "device_id": self.device_id}
        if state == "online":
            body.update(self.status_extra)
            body["ts"] = time.time()
        return json.dumps(body, separators=(",", ":")).encode()
