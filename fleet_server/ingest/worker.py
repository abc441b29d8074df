"""The telemetry ingestion worker: MQTT 5 shared subscription -> queue -> batched writes.

Shape (the MQTT session is :class:`device_agent.transport.mqtt.MqttSession`, the
project's one module over paho):

* one MQTT 5 session subscribes to
  ``$share/{group}/edgefleet/v1/devices/+/telemetry/#`` at QoS 1, so the broker
  hands each message to exactly one of the replicas sharing the group;
* received messages land on the session's bounded queue (a full queue blocks the
  network thread, which is back-pressure on the broker);
* one writer thread of ours parses messages (:mod:`.parse`: topic/payload device
  id check, record validation), collects up to ``batch_records`` records or
  ``batch_interval`` seconds, writes them in one transaction (:mod:`.store`),
  and only then acknowledges the messages (manual PUBACK). A message whose batch
  was not committed is never acknowledged, so the broker delivers it again after
  a reconnect, and ``(device_id, seq)`` keys drop what was already stored;
* rejected messages (spoofed device id, malformed payload) are counted and
  acknowledged, never retried;
* a database outage holds the batch and retries it with backoff; nothing is
  acknowledged meanwhile.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from device_agent.protocol import TOPIC_ROOT
from device_agent.transport import Backoff, TransportConfigError
from device_agent.transport.mqtt import Message, MqttSession, TlsOptions
from fleet_server.ingest.errors import (
    IngestConfigError,
    IngestError,
    MalformedTelemetryError,
    RejectionCounter,
    SpoofedDeviceError,
)
from fleet_server.ingest.parse import ParsedMessage, parse_message
from fleet_server.ingest.store import TelemetryWriter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IngestConfig:
    """Where the broker is and how to batch; safe defaults."""

    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password: str | None = None
    #: unique per replica; the default names host and process
    client_id: str = field(
        default_factory=lambda: f"edgefleet-ingest-{socket.gethostname()}-{os.getpid()}"
    )
    share_group: str = "edgefleet-ingest"
    batch_records: int = 5000
    batch_interval: float = 0.1
    queue_messages: int = 1000
    keepalive: int = 30
    #: seconds the broker keeps this replica's session (and unacknowledged messages)
    session_expiry: int = 300
    ca_file: str | None = None
    #: 5 (MQTT 5: shared subscription, replicas split the load) or 4 (MQTT 3.1.1, for
    #: brokers without MQTT 5 such as the embedded one: one replica ingests everything)
    mqtt_version: int = 5
    #: False for a single ingesting server (the broker beside it): a plain subscription,
    #: which Mosquitto 2.0 restores from persistence after a restart (a shared one it
    #: does not, and what devices send before the worker resubscribes would be dropped)
    shared: bool = True

    @property
    def subscription(self) -> str:
        if self.mqtt_version == 4 or not self.shared:
            return f"{TOPIC_ROOT}/+/telemetry/#"
        return f"$share/{self.share_group}/{TOPIC_ROOT}/+/telemetry/#"

    def check(self) -> None:
        if not self.host or not 0 < self.port < 65536:
            raise IngestConfigError(f"broker address {self.host}:{self.port} is not valid")
        if "/" in self.share_group or "+" in self.share_group or "#" in self.share_group:
            raise IngestConfigError("share_group must not contain '/', '+' or '#'")
        if self.batch_records < 1 or self.batch_interval <= 0 or self.queue_messages < 1:
            raise IngestConfigError("batch_records, batch_interval, queue_messages must be > 0")


@dataclass
class IngestStats:
    """Counters since start (written by the writer thread only)."""

    messages: int = 0
    records: int = 0
    stored: int = 0
    duplicates: int = 0
    spoofed_messages: int = 0
    malformed_messages: int = 0
    bad_topic_messages: int = 0
    bad_records: int = 0
    batches: int = 0
    write_errors: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class IngestWorker:
    """One replica's share of telemetry ingestion."""

    def __init__(self, config: IngestConfig, engine: Engine) -> None:
        config.check()
        self.config = config
        self.writer = TelemetryWriter(engine)
        self.stats = IngestStats()
        #: rejected records and messages per device and reason (for /metrics)
        self.rejections = RejectionCounter()
        self._stop = threading.Event()
        self._done = threading.Event()
        self._writer_thread: threading.Thread | None = None
        try:
            self._session = MqttSession(
                config.client_id,
                config.host,
                config.port,
                username=config.username,
                password=config.password,
                tls=TlsOptions(ca_file=Path(config.ca_file)) if config.ca_file else None,
                keepalive=config.keepalive,
                mqtt_version=config.mqtt_version,
                backoff=Backoff(initial=0.2, maximum=5.0),
                subscriptions=[(config.subscription, 1)],
                manual_ack=True,
                # keep this replica's session (and unacknowledged messages) across reconnects
                clean_start=not config.client_id,
                session_expiry=config.session_expiry,
                messages_max=config.queue_messages,
                name="ingest",
            )
        except TransportConfigError as e:
            raise IngestConfigError(str(e)) from e
        self.subscribed = self._session.subscribed

    # -- lifecycle ---------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> IngestWorker:
        """Connect, subscribe and start writing; raise IngestConfigError if not subscribed."""
        self._stop.clear()
        self._done.clear()
        self._writer_thread = threading.Thread(
            target=self._write_loop, name="telemetry-writer", daemon=True
        )
        self._writer_thread.start()
        self._session.start()
        if not self.subscribed.wait(timeout):
            err = self._session.last_error
            self.stop()
            raise IngestConfigError(
                f"not subscribed to {self.config.subscription} on {self.config.host}:"
                f"{self.config.port} within {timeout}s ({err or 'no answer'}); check the "
                "address, credentials and that the ACL lets the server user read edgefleet/v1/#"
            )
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Write and acknowledge what is queued, then disconnect.

        Messages still arriving meanwhile stay unacknowledged; the broker keeps
        them in this replica's session (or hands them to another) for later.
        """
        if self._writer_thread is not None:
            self._done.set()
            self._writer_thread.join(timeout)
            if self._writer_thread.is_alive():  # stuck on a database outage
                self._stop.set()
                self._writer_thread.join(timeout)
            self._writer_thread = None
        self._session.stop()

    def __enter__(self) -> IngestWorker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- writer thread -----------------------------------------------------------------

    def _next(self, timeout: float) -> Message | None:
        try:
            return self._session.messages.get(timeout=timeout)
        except queue.Empty:
            return None

    def _write_loop(self) -> None:
        cfg = self.config
        messages = self._session.messages
        while True:
            item = self._next(0.1)
            if item is None:
                if self._done.is_set() and messages.empty():
                    return
                continue
            batch: list[ParsedMessage] = []
            mids: list[int] = []
            records = 0
            deadline = time.monotonic() + cfg.batch_interval
            while item is not None:
                records += self._take(item, batch, mids)
                if records >= cfg.batch_records:
                    break
                left = deadline - time.monotonic()
                try:
                    item = messages.get(timeout=left) if left > 0 else messages.get_nowait()
                except queue.Empty:
                    break
            self._commit(batch, mids)

    def _take(self, item: Message, batch: list[ParsedMessage], mids: list[int]) -> int:
        topic, payload, mid = item.topic, item.payload, item.mid if item.qos else 0
        self.stats.messages += 1
        mids.append(mid)
        try:
            parsed = parse_message(topic, payload, time.time())
        except SpoofedDeviceError as e:
            self.rejections.message(topic, e)
            self.stats.spoofed_messages += 1
            log.warning("dropped telemetry: %s", e)
            return 0
        except MalformedTelemetryError as e:
            self.rejections.message(topic, e)
            self.stats.malformed_messages += 1
            log.warning("dropped telemetry: %s", e)
            return 0
        except IngestError as e:
            self.rejections.message(topic, e)
            self.stats.bad_topic_messages += 1
            log.warning("dropped telemetry: %s", e)
            return 0
        self.stats.records += parsed.records
        self.stats.bad_records += parsed.bad_records
        self.rejections.add(parsed.device_id, parsed.rejected)
        batch.append(parsed)
        return parsed.records

    def _commit(self, batch: list[ParsedMessage], mids: list[int]) -> None:
        delay = 0.1
        while batch:
            try:
                result = self.writer.write(batch)
                break
            except SQLAlchemyError as e:
                self.stats.write_errors += 1
                log.error("telemetry batch not written (%s); retrying in %.1fs", e, delay)
                if self._stop.wait(delay):
                    return  # not acknowledged: the broker re-delivers after reconnect
                delay = min(delay * 2, 5.0)
        else:
            result = None
        if result is not None:
            self.stats.batches += 1
            self.stats.stored += result.stored
            self.stats.duplicates += result.duplicates
        for mid in mids:
            self._session.ack(mid)
