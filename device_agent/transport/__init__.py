"""Telemetry transport: the interface the reporter publishes through, and its errors.

The only implementation is :class:`device_agent.transport.mqtt.MqttTransport`
(paho-mqtt kept behind one small module). Everything else in the agent speaks to
:class:`TelemetryTransport` and :class:`PublishHandle`, never to paho.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol


class TransportError(Exception):
    """Root of transport errors."""


class TransportConfigError(TransportError, ValueError):
    """The transport settings are unusable (missing TLS file, bad port, no host)."""


class PublishRefusedError(TransportError):
    """The client library refused to queue a message (it says why)."""


class PublishHandle:
    """Completion of one QoS 1 publish: done when the broker's PUBACK arrived.

    A handle stays pending across disconnects: the transport re-sends unacknowledged
    messages when it reconnects. ``ok`` is False only when the broker answered
    with a failure reason code (MQTT 5).
    """

    __slots__ = ("mid", "_event", "ok", "reason", "_callbacks", "_lock")

    def __init__(self, mid: int) -> None:
        self.mid = mid
        self._event = threading.Event()
        self.ok = False
        self.reason = ""
        self._callbacks: list[Callable[[PublishHandle], None]] = []
        self._lock = threading.Lock()

    @property
    def done(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until acknowledged or ``timeout``; return whether it is done."""
        return self._event.wait(timeout)

    def add_done_callback(self, fn: Callable[[PublishHandle], None]) -> None:
        """Call ``fn(handle)`` once done (at once if it already is)."""
        with self._lock:
            if not self._event.is_set():
                self._callbacks.append(fn)
                return
        fn(self)

    def _complete(self, ok: bool, reason: str = "") -> None:
        with self._lock:
            if self._event.is_set():
                return
            self.ok, self.reason = ok, reason
            self._event.set()
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            fn(self)

    def __repr__(self) -> str:
        state = "pending" if not self.done else ("ok" if self.ok else f"failed:{self.reason}")
        return f"PublishHandle(mid={self.mid}, {state})"


class TelemetryTransport(Protocol):
    """What the reporter needs from a transport."""

    @property
    def connected(self) -> bool:
        """True while a session with the broker is up."""
        ...

    @property
    def connection_epoch(self) -> int:
        """Number of successful connects so far (tells a re-sent message from a first send)."""
        ...

    def publish(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False
    ) -> PublishHandle:
        """Queue a message; the handle completes on PUBACK."""
        ...


@dataclass
class Backoff:
    """Exponential reconnect delay with jitter, bounded by ``maximum`` (pure; no sleeping).

    The n-th delay is drawn uniformly from ``[(1 - jitter) * d, d]`` where
    ``d = min(maximum, initial * multiplier ** n)``; :meth:`reset` after a success.
    """

    initial: float = 0.5
    maximum: float = 30.0
    multiplier: float = 2.0
    jitter: float = 0.5
    rng: random.Random = field(default_factory=random.Random)
    attempts: int = 0

    def __post_init__(self) -> None:
        if not (0 < self.initial <= self.maximum):
            raise TransportConfigError("backoff needs 0 < initial <= maximum")
        if not 0.0 <= self.jitter <= 1.0 or self.multiplier < 1.0:
            raise TransportConfigError("backoff needs 0 <= jitter <= 1 and multiplier >= 1")

    def next(self) -> float:
        """The delay before the next attempt."""
        ceiling = min(self.maximum, self.initial * self.multiplier ** min(self.attempts, 64))
        self.attempts += 1
        return ceiling * (1.0 - self.jitter * self.rng.random())

    def reset(self) -> None:
        self.attempts = 0


__all__ = [
    "Backoff",
    "PublishHandle",
    "PublishRefusedError",
    "TelemetryTransport",
    "TransportConfigError",
    "TransportError",
]
