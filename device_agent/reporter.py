"""Store-and-forward reporter: drains the telemetry store to the broker at QoS 1.

Invariants:

* a row is deleted from the store only after the broker acknowledged (PUBACK) the
  batch that carried it; a timeout, a disconnect or a crash deletes nothing, so
  rows are re-sent (by the transport after a reconnect, or from the store after a
  restart). Duplicates are expected: the receiver drops them by (device, seq);
* one batch holds records of one kind, published to
  ``edgefleet/v1/devices/{id}/telemetry/{kind}`` as
  ``{"device_id": ..., "records": [{"seq", "kind", "ts", "body"}, ...]}``;
* at most ``inflight`` batches are unacknowledged at any time;
* kinds drain in priority order: events, then summaries, then samples, so after
  a long outage the small important records go first.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from .protocol import telemetry_topic
from .store import Record, TelemetryStore
from .transport import PublishHandle, TelemetryTransport

log = logging.getLogger(__name__)

#: order in which kinds are drained when several have records waiting
DRAIN_ORDER: tuple[str, ...] = ("events", "summary", "samples")


def encode_batch(device_id: str, records: list[Record]) -> bytes:
    """The wire payload for one batch; bodies are embedded as stored (no re-encoding)."""
    parts = [
        f'{{"seq":{r.seq},"kind":{json.dumps(r.kind)},"ts":{json.dumps(r.ts)},'
        f'"body":{r.body_json}}}'
        for r in records
    ]
    return f'{{"device_id":{json.dumps(device_id)},"records":[{",".join(parts)}]}}'.encode()


@dataclass
class ReporterCounters:
    """What the reporter has done since it started (records unless named batches)."""

    published: int = 0
    acked: int = 0
    batches_published: int = 0
    batches_acked: int = 0
    #: batches acknowledged only after a reconnect (the transport re-sent them)
    retries: int = 0
    #: batches the broker answered with a failure code (rows kept, re-sent next session)
    rejected: int = 0


@dataclass
class _InFlight:
    kind: str
    seqs: list[int]
    handle: PublishHandle
    epoch: int
    sent_at: float = field(default_factory=time.monotonic)


class Reporter:
    """Background thread draining ``store`` through ``transport``; see the module docstring."""

    def __init__(
        self,
        store: TelemetryStore,
        transport: TelemetryTransport,
        device_id: str,
        batch_size: int = 200,
        inflight: int = 100,
        poll_interval: float = 0.5,
    ) -> None:
        if batch_size < 1 or inflight < 1:
            raise ValueError("batch_size and inflight must be at least 1")
        self.store = store
        self.transport = transport
        self.device_id = device_id
        self.batch_size = batch_size
        self.inflight = inflight
        self.poll_interval = poll_interval
        self.counters = ReporterCounters()
        self._topics = {k: telemetry_topic(device_id, k) for k in DRAIN_ORDER}
        self._cursor = dict.fromkeys(DRAIN_ORDER, 0)
        self._epoch_seen = -1
        self._in_flight: deque[_InFlight] = deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- control

    def start(self) -> Reporter:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="reporter", daemon=True)
            self._thread.start()
        return self

    def notify(self) -> None:
        """Wake the reporter now (call after appending records you want sent soon)."""
        self._wake.set()

    def stop(self, drain_timeout: float = 0.0) -> None:
        """Stop the thread; first wait up to ``drain_timeout`` s for in-flight acks."""
        if self._thread is None:
            return
        deadline = time.monotonic() + drain_timeout
        while self._in_flight and time.monotonic() < deadline:
            time.sleep(0.01)
        self._stop.set()
        self._wake.set()
        self._thread.join(10)
        self._thread = None

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def idle(self) -> bool:
        """True when nothing is in flight and the store has nothing left to send."""
        return not self._in_flight and not self.store.pending(limit=1)

    # ---------------------------------------------------------------- loop

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                progressed = self.step()
            except Exception:  # keep reporting alive; the store still holds everything
                log.exception("reporter step failed; retrying")
                progressed = False
            if not progressed:
                self._wake.wait(self.poll_interval)
                self._wake.clear()

    def step(self) -> bool:
        """Reap acknowledgements, then publish until the in-flight window is full.

        Returns True if anything happened.
        """
        progressed = self._reap()
        if not self.transport.connected or len(self._in_flight) >= self.inflight:
            return progressed
        epoch = self.transport.connection_epoch
        if epoch != self._epoch_seen and not self._in_flight:
            # a new session with nothing outstanding: start again from the oldest rows,
            # in case a refused batch is waiting to be re-sent
            self._cursor = dict.fromkeys(DRAIN_ORDER, 0)
        self._epoch_seen = epoch
        while len(self._in_flight) < self.inflight:  # fill the window in one go
            for kind in DRAIN_ORDER:
                records = self.store.pending(
                    limit=self.batch_size, kinds=(kind,), after=self._cursor[kind]
                )
                if records:
                    self._publish(kind, records, epoch)
                    progressed = True
                    break
            else:
                break  # nothing left to send
        return progressed

    def _publish(self, kind: str, records: list[Record], epoch: int) -> None:
        payload = encode_batch(self.device_id, records)
        handle = self.transport.publish(self._topics[kind], payload, qos=1)
        handle.add_done_callback(lambda _h: self._wake.set())
        self._in_flight.append(_InFlight(kind, [r.seq for r in records], handle, epoch))
        self._cursor[kind] = records[-1].seq
        self.counters.published += len(records)
        self.counters.batches_published += 1

    def _reap(self) -> bool:
        reaped = False
        still: deque[_InFlight] = deque()
        for item in self._in_flight:
            if not item.handle.done:
                still.append(item)
                continue
            reaped = True
            if item.handle.ok:
                self.store.ack(item.seqs)
                self.counters.acked += len(item.seqs)
                self.counters.batches_acked += 1
                if self.transport.connection_epoch != item.epoch:
                    self.counters.retries += 1
            else:
                self.counters.rejected += 1
                log.warning(
                    "broker refused a %s batch (%s); rows kept for the next session",
                    item.kind,
                    item.handle.reason,
                )
        self._in_flight = still
        return reaped
