"""MQTT: the one module of the project that talks to paho-mqtt (2.x, callback API v2).

The device's telemetry transport, the server's ingestion worker and the server's
assignment notifier all use :class:`MqttSession`; nothing else imports paho (an
import-linter contract checks it).

Shape of a session:

* a supervisor thread of ours connects and reconnects with exponential backoff plus
  jitter (:class:`~device_agent.transport.Backoff`, the one reconnect policy); for each
  connection it runs paho's network thread (``loop_start``, paho's own reconnect turned
  off), which does all socket I/O;
* paho callbacks only enqueue: connection, publish and subscribe events go on our event
  queue, handled by the supervisor (completing publish handles, tracking the connection,
  re-subscribing); incoming messages go on :attr:`MqttSession.messages`, which may be
  bounded (a full queue blocks paho's thread: back-pressure on the broker);
* QoS 1 messages not yet acknowledged when the connection drops stay queued in paho and
  are re-sent on reconnect, so a :class:`PublishHandle` completes late rather than failing;
* with ``manual_ack`` the consumer acknowledges each received message itself
  (:meth:`MqttSession.ack`), after it has stored it.

:class:`MqttTransport` is the device's session: on every connect it publishes a
retained ``{"state": "online", ...}`` on its status topic (last will: a retained
``{"state": "offline"}``; a clean :meth:`~MqttTransport.stop` publishes ``offline``
itself) and subscribes to its notify topic; notices land in
:attr:`MqttTransport.notifications`.
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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

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
class Message:
    """A message received on a subscription (``mid`` is what :meth:`MqttSession.ack` takes)."""

    topic: str
    payload: bytes
    received_at: float
    mid: int = 0
    qos: int = 0


#: a message the server sent to a device's notify topic
Notification = Message


@dataclass(frozen=True)
class _Event:
    kind: str  # connected | connect_failed | disconnected | published | subscribed
    mid: int = 0
    ok: bool = True
    reason: str = ""


class MqttSession:
    """One MQTT client session over paho, kept connected by our supervisor thread.

    ``subscriptions`` are (re)subscribed on every connect; :attr:`subscribed` is set
    once the broker granted all of them. ``will`` is ``(topic, payload)`` published
    retained at QoS 1 by the broker if the session dies. ``messages_max`` bounds the
    queue of received messages (0: unbounded).
    """

    def __init__(
        self,
        client_id: str,
        host: str,
        port: int = 1883,
        *,
        username: str | None = None,
        password: str | None = None,
        tls: TlsOptions | None = None,
        keepalive: int = 60,
        max_inflight: int = 100,
        mqtt_version: int = 4,
        backoff: Backoff | None = None,
        connect_timeout: float = 5.0,
        subscriptions: Sequence[tuple[str, int]] = (),
        will: tuple[str, bytes] | None = None,
        manual_ack: bool = False,
        clean_start: bool = True,
        session_expiry: int | None = None,
        messages_max: int = 0,
        name: str = "mqtt",
    ) -> None:
        if not host:
            raise TransportConfigError("MQTT host is empty; set the broker address")
        if not 0 < port < 65536:
            raise TransportConfigError(f"MQTT port {port} is not a TCP port")
        if mqtt_version not in (4, 5):
            raise TransportConfigError("mqtt_version must be 4 (MQTT 3.1.1) or 5")
        self.client_id = client_id
        self.host, self.port = host, port
        self.keepalive = keepalive
        self.mqtt_version = mqtt_version
        self.backoff = backoff or Backoff()
        self.subscriptions = list(subscriptions)
        self.messages: queue.Queue[Message] = queue.Queue(messages_max)
        self.subscribed = threading.Event()
        self.last_error = ""
        self._name = name
        self._clean_start = clean_start
        self._session_expiry = session_expiry
        self._events: queue.Queue[_Event] = queue.Queue()
        self._handles: dict[int, PublishHandle] = {}
        #: PUBACKs handled before publish() registered the handle (mid -> outcome)
        self._early_acks: dict[int, tuple[bool, str]] = {}
        #: mids of the session's own publishes, which have no handle
        self._own_mids: set[int] = set()
        self._sub_mids: set[int] = set()
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._stop = threading.Event()
        self._closing = threading.Event()
        self._epoch = 0
        self._thread: threading.Thread | None = None
        self._handshake_timeout = connect_timeout + 10.0
        self._tls = tls
        self._ssl_context: ssl.SSLContext | None = None
        protocol = mqtt.MQTTv5 if mqtt_version == 5 else mqtt.MQTTv311
        kwargs: dict[str, Any] = {
            "protocol": protocol,
            "reconnect_on_failure": False,
            "manual_ack": manual_ack,
        }
        if protocol == mqtt.MQTTv311:
            kwargs["clean_session"] = clean_start
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, **kwargs)
        c.connect_timeout = connect_timeout
        if username:
            c.username_pw_set(username, password)
        if tls is not None:
            for attr in ("ca_file", "cert_file", "key_file"):
                p = getattr(tls, attr)
                if p is not None and not Path(p).is_file():
                    raise TransportConfigError(f"TLS {attr} {p} does not exist")
            # our own context, kept: a renewed client certificate is loaded into it and
            # used from the next connection on (reload_client_certificate)
            self._ssl_context = ssl.create_default_context(
                cafile=str(tls.ca_file) if tls.ca_file else None
            )
            if tls.cert_file:
                self._ssl_context.load_cert_chain(
                    str(tls.cert_file), str(tls.key_file) if tls.key_file else None
                )
            c.tls_set_context(self._ssl_context)
        c.max_inflight_messages_set(max_inflight)
        c.max_queued_messages_set(0)
        if will is not None:
            c.will_set(will[0], will[1], qos=1, retain=True)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_publish = self._on_publish
        c.on_subscribe = self._on_subscribe
        c.on_message = self._on_message
        self._client = c

    # ---------------------------------------------------------------- public API

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def connection_epoch(self) -> int:
        return self._epoch

    def reload_client_certificate(self) -> None:
        """Use the TLS client certificate and key files again (after a renewal): the open
        connection keeps going, every later handshake presents the new certificate."""
        tls, context = self._tls, self._ssl_context
        if tls is None or context is None or tls.cert_file is None:
            return
        try:
            context.load_cert_chain(str(tls.cert_file), str(tls.key_file) if tls.key_file else None)
        except (OSError, ssl.SSLError) as e:
            raise TransportConfigError(f"cannot load TLS client certificate: {e}") from e

    def start(self) -> MqttSession:
        """Start the supervisor; it connects (and keeps reconnecting) in the background."""
        if self._thread is None:
            self._stop.clear()
            self._closing.clear()
            self._thread = threading.Thread(
                target=self._run, name=f"{self._name}-{self.client_id}", daemon=True
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

    def ack(self, mid: int, qos: int = 1) -> None:
        """Acknowledge a received message (sessions built with ``manual_ack``)."""
        if mid:
            self._client.ack(mid, qos)

    def stop(self, timeout: float = 5.0) -> None:
        """Disconnect cleanly and stop the supervisor and paho's network thread."""
        if self._thread is None:
            return
        self._before_stop(timeout)
        self._closing.set()
        self._stop.set()
        self._thread.join(timeout + 5)
        self._thread = None

    def pending_handles(self) -> int:
        """QoS 1 messages published but not yet acknowledged."""
        with self._lock:
            return len(self._handles)

    # ---------------------------------------------------------------- hooks

    def _before_stop(self, timeout: float) -> None:
        """Called by :meth:`stop` while still connected."""

    def _after_connect(self) -> None:
        """Called on the supervisor thread after each successful connect."""

    def _own_publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        """A QoS 1 publish of the session's own, with no handle."""
        info = self._client.publish(topic, payload, qos=1, retain=retain)
        with self._lock:
            self._own_mids.add(info.mid)

    # ---------------------------------------------------------------- paho callbacks
    # They run on paho's network thread and only enqueue.

    def _on_connect(self, _c: Any, _u: Any, _flags: Any, rc: Any, _props: Any) -> None:
        if rc.is_failure:
            self._events.put(_Event("connect_failed", ok=False, reason=str(rc)))
        else:
            self._events.put(_Event("connected"))

    def _on_disconnect(self, _c: Any, _u: Any, _flags: Any, rc: Any, _props: Any) -> None:
        self._events.put(_Event("disconnected", reason=str(rc)))

    def _on_publish(self, _c: Any, _u: Any, mid: int, rc: Any, _props: Any) -> None:
        self._events.put(_Event("published", mid=mid, ok=not rc.is_failure, reason=str(rc)))

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, rcs: Any, _props: Any) -> None:
        ok = all(not rc.is_failure for rc in rcs)
        self._events.put(
            _Event("subscribed", mid=mid, ok=ok, reason=", ".join(str(r) for r in rcs))
        )

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        item = Message(msg.topic, bytes(msg.payload), time.time(), msg.mid, msg.qos)
        while not self._closing.is_set():
            try:
                self.messages.put(item, timeout=0.2)
                return
            except queue.Full:
                continue
        # closing: not acknowledged, so the broker delivers it again later

    # ---------------------------------------------------------------- supervisor thread

    def _connect(self) -> None:
        if self.mqtt_version == 5:
            props = Properties(PacketTypes.CONNECT)
            if self._session_expiry is not None:
                props.SessionExpiryInterval = self._session_expiry
            self._client.connect(
                self.host,
                self.port,
                self.keepalive,
                clean_start=self._clean_start,
                properties=props,
            )
        else:
            self._client.connect(self.host, self.port, self.keepalive)

    def _run(self) -> None:
        """Connect, let paho's network thread serve the session, handle events, back off."""
        while not self._stop.is_set():
            try:
                self._connect()
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
            self.subscribed.clear()
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
            self._sub_mids.clear()
            for topic, qos in self.subscriptions:
                _rc, mid = self._client.subscribe(topic, qos=qos)
                if mid is not None:
                    self._sub_mids.add(mid)
            if not self.subscriptions:
                self.subscribed.set()
            self._after_connect()
            self._connected.set()
        elif ev.kind == "subscribed":
            if not ev.ok:
                self.last_error = f"broker refused a subscription: {ev.reason}"
                log.error("%s (%s)", self.last_error, self.subscriptions)
            else:
                self._sub_mids.discard(ev.mid)
                if not self._sub_mids:
                    self.subscribed.set()
        elif ev.kind == "connect_failed":
            self.last_error = f"broker refused the connection: {ev.reason}"
            log.warning("%s; check the MQTT credentials", self.last_error)
            return False
        elif ev.kind == "disconnected":
            self._connected.clear()
            self.subscribed.clear()
            if not self.last_error and not self._stop.is_set():
                self.last_error = f"connection lost: {ev.reason}"
            return False
        return True


class MqttTransport(MqttSession):
    """A device's MQTT session: status, last will, QoS 1 publishes, notify subscription."""

    def __init__(
        self,
        device_id: str,
        host: str,
        port: int = 1883,
        *,
        client_id: str | None = None,
        status_extra: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self.device_id = device_id
        self.status_extra = dict(status_extra or {})
        self._status_topic = status_topic(device_id)
        self._notify_topic = notify_topic(device_id)
        super().__init__(
            client_id or device_id,
            host,
            port,
            subscriptions=[(self._notify_topic, 1)],
            will=(self._status_topic, self._status_payload("offline")),
            **kwargs,
        )
        #: server notices (the device subscribes to its notify topic only)
        self.notifications = self.messages

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
        tls = TlsOptions(m.ca_file, m.cert_file, m.key_file) if m.tls else None
        kwargs: dict[str, Any] = dict(
            username=m.username or cfg.device.id,
            password=password,
            tls=tls,
            keepalive=m.keepalive,
            max_inflight=m.inflight,
            mqtt_version=m.mqtt_version,
        )
        kwargs.update(overrides)
        return cls(cfg.device.id, m.host, m.port, **kwargs)

    def set_status(self, **fields: Any) -> PublishHandle:
        """Publish a new retained ``online`` status with extra fields (kept for reconnects)."""
        self.status_extra.update(fields)
        return self.publish(self._status_topic, self._status_payload("online"), qos=1, retain=True)

    def _after_connect(self) -> None:
        self._own_publish(self._status_topic, self._status_payload("online"), retain=True)

    def _before_stop(self, timeout: float) -> None:
        if self.connected:
            h = self.publish(
                self._status_topic, self._status_payload("offline"), qos=1, retain=True
            )
            h.wait(timeout)

    def _status_payload(self, state: str) -> bytes:
        body: dict[str, Any] = {"state": state, "device_id": self.device_id}
        if state == "online":
            body.update(self.status_extra)
            body["ts"] = time.time()
        return json.dumps(body, separators=(",", ":")).encode()
