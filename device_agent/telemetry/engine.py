"""Telemetry engine: cheap hot-path buffers, batched work on a worker thread.

Invariants:

* The prediction hot path only appends ``(latency_ns, inputs, outputs)`` to a
  per-model :class:`collections.deque` (thread-safe without a lock) and, when the
  buffer is past ``wake_batch``, wakes the worker. No binning, sampling,
  serialization or I/O happens on the caller's thread.
* The worker drains every buffer at least every ``flush_interval_seconds`` and
  at each window boundary, and folds the batch into the model's
  :class:`~device_agent.telemetry.window.Window` with vectorized numpy. Calls
  are attributed to the window that is open when they are drained, so a call
  lands at most one flush interval late.
* Windows are aligned to multiples of ``window_seconds`` of wall-clock time,
  so windows of different devices line up. A model swap closes the old model's
  window early (``window_end`` = swap time) once its in-flight calls drained.
* Records go to the sink in one ``append_many`` per tick; a failed write is
  retried on the next tick (up to ``max_unwritten`` records, oldest dropped
  and counted first), and a record the sink refuses as invalid is dropped and
  counted, never retried forever.
* Shadow candidates run on the worker over the buffered inputs, within a time
  budget per tick; calls left over when the budget is spent are not compared.
* The model an update replaced (``set_previous``) runs the same way on a random
  share of the kept inputs (``telemetry.compare_previous_rate``) within its own,
  smaller budget (``telemetry.compare_previous_budget`` of each flush interval: a
  share of one core, counted as the time spent running it, so the rest of a busy
  round does not use it up), so every canary is also judged by its agreement with the
  model it replaced; its figures go in the summary's ``previous`` field.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ..config import TelemetryConfig
from . import stats
from .sampling import FieldMask, FieldMaskError, StratifiedSampler, compile_mask
from .window import Inputs, ModelInfo, Outputs, ShadowStats, Window

log = logging.getLogger("edgefleet.agent.telemetry")

Record = tuple[str, Mapping[str, Any], float]

_CHUNK = 512
#: copying inputs on the hot path may cost this much per call on average ...
_COPY_NS_FLOOR = 300.0
#: ... or this share of the model's mean latency, whichever is larger
_COPY_FRACTION = 0.01


class TelemetrySink(Protocol):
    """Where records go (:class:`device_agent.store.TelemetryStore` in production)."""

    def append_many(self, records: Iterable[Record]) -> list[int]: ...

    def take_dropped(self) -> dict[str, int]: ...


@dataclass(frozen=True)
class TelemetryOptions:
    """Tuning knobs beyond :class:`~device_agent.config.TelemetryConfig` (safe defaults)."""

    #: most sampled predictions stored per window and model
    max_samples_per_window: int = 256
    #: the hot path wakes the worker once this many calls are buffered
    wake_batch: int = 2048
    #: past this many buffered calls, only latencies are kept (no drift, no samples)
    max_buffered: int = 32768
    #: share of a flush interval the worker may spend running a shadow candidate
    shadow_budget: float = 0.5
    #: records kept for retry while the sink fails
    max_unwritten: int = 10000
    #: shadow outputs agree when ``allclose`` with these (non-classifiers)
    shadow_atol: float = 1e-4
    shadow_rtol: float = 1e-3
    seed: int | None = None


class Recorder:
    """Hot-path buffers of one model plus its open window (the worker owns the window)."""

    __slots__ = (
        "calls",
        "errors",
        "wake_batch",
        "max_buffered",
        "wake",
        "info",
        "mask",
        "window",
        "total_count",
        "total_errors",
        "closed",
        "countdown",
        "stride",
        "copy_ns",
        "labels",
    )

    def __init__(
        self,
        info: ModelInfo,
        wake: threading.Event,
        opts: TelemetryOptions,
        mask: FieldMask | None,
        window: Window,
    ) -> None:
        self.calls: deque[tuple[int, Inputs | np.ndarray | None, Outputs | None]] = deque()
        self.errors: deque[str] = deque()
        #: (true class, predicted class) of labels posted for earlier predictions
        self.labels: deque[tuple[int, int]] = deque()
        self.wake_batch = opts.wake_batch
        self.max_buffered = opts.max_buffered
        self.wake = wake
        self.info = info
        self.mask = mask
        self.window = window
        self.total_count = 0
        self.total_errors = 0
        self.closed = False
        #: the hot path keeps the inputs of every ``stride``-th call (see ``copy_ns``)
        self.countdown = 1
        self.stride = 1
        #: measured cost of copying one call's inputs; 0 = inputs are not copied
        self.copy_ns = 0

    def set_copy_cost(self, copy_ns: int) -> None:
        """Inputs are copied at ``copy_ns`` per call; until the model's latency is known,
        keep every stride-th call so copying costs at most the floor on average."""
        self.copy_ns = int(copy_ns)
        self.stride = self.countdown = max(1, math.ceil(self.copy_ns / _COPY_NS_FLOOR))

    def spill(self, latency_ns: int, inputs: Inputs | np.ndarray | None, outputs: Outputs) -> None:
        """Slow path of the hot path: the buffer is past ``wake_batch``."""
        if not self.wake.is_set():
            self.wake.set()
        if len(self.calls) < self.max_buffered:
            self.calls.append((latency_ns, inputs, outputs))
        else:  # the worker is behind: keep the latency, let go of the arrays
            self.calls.append((latency_ns, None, None))


class _Shadow:
    def __init__(
        self, run: Callable[[dict[str, np.ndarray]], list[np.ndarray]], name: str, version: int
    ) -> None:
        self.run = run
        self.name = name
        self.version = version


class Telemetry:
    """Window counters, drift, samples and shadow comparison for the agent's models."""

    def __init__(
        self,
        config: TelemetryConfig,
        sink: TelemetrySink | None = None,
        *,
        options: TelemetryOptions | None = None,
        wall: Callable[[], float] = time.time,
        perf_ns: Callable[[], int] = time.perf_counter_ns,
    ) -> None:
        self.config = config
        self.sink = sink
        self.options = options or TelemetryOptions()
        self.wall = wall
        self.perf_ns = perf_ns
        self.rng = np.random.default_rng(self.options.seed)
        self.wake = threading.Event()
        #: the most recent summary bodies, newest last (for status and probation checks)
        self.recent: deque[dict[str, Any]] = deque(maxlen=64)
        self.write_failures = 0
        self.invalid_records = 0
        self.unwritten_dropped = 0
        self._unwritten: list[Record] = []
        self._recs: list[Recorder] = []
        self._active: Recorder | None = None
        self._shadow: _Shadow | None = None
        self._previous: _Shadow | None = None
        #: ns the replaced model may still run in this round (its budget, spent per call)
        self._previous_left_ns = 0
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ models
    def attach(self, info: ModelInfo, now: float | None = None) -> Recorder:
        """Start recording for a model that becomes the active one."""
        now = self.wall() if now is None else now
        events: list[Record] = []
        mask: FieldMask | None = None
        try:
            mask = compile_mask(
                self.config.drop_fields,
                self.config.hash_fields,
                info.input_names,
                info.output_names,
                info.profile,
            )
        except FieldMaskError as e:
            log.warning("no samples will be stored for %s v%s: %s", info.name, info.version, e)
            events.append(
                (
                    "event",
                    {
                        "type": "telemetry",
                        "outcome": "samples_disabled",
                        "name": info.name,
                        "version": info.version,
                        "message": str(e),
                        "ts": now,
                    },
                    now,
                )
            )
        with self._lock:
            rec = Recorder(
                info, self.wake, self.options, mask, self._new_window(info, mask, now, shadow=True)
            )
            self._recs.append(rec)
            self._active = rec
            self._write(events)
        return rec

    def detach(self, rec: Recorder, now: float | None = None) -> None:
        """Stop recording for ``rec``: fold what it buffered and close its window now."""
        with self._lock:
            if rec.closed:
                return
            now = self.wall() if now is None else now
            self._drain(rec, deadline=None)
            out = self._close(rec, now)
            rec.closed = True
            self._recs.remove(rec)
            if self._active is rec:
                self._active = None
            self._write(out)

    def set_shadow(
        self,
        run: Callable[[dict[str, np.ndarray]], list[np.ndarray]] | None,
        name: str = "",
        version: int = 0,
    ) -> None:
        """Run ``run`` beside the active model (None stops). Returns once the old one is idle."""
        with self._lock:
            self._shadow = _Shadow(run, name, version) if run is not None else None
            if self._active is not None:
                self._drain(self._active, deadline=None, shadow=False)
                w = self._active.window
                w.shadow = ShadowStats(name, version) if run is not None else None

    def set_previous(
        self,
        run: Callable[[dict[str, np.ndarray]], list[np.ndarray]] | None,
        name: str = "",
        version: int = 0,
    ) -> None:
        """Compare the active model with ``run``, the model it replaced, on a sample of
        inputs (None stops). Returns once the old comparison is idle."""
        with self._lock:
            self._previous = _Shadow(run, name, version) if run is not None else None
            if self._active is not None:
                self._drain(self._active, deadline=None, shadow=False)
                w = self._active.window
                w.previous = ShadowStats(name, version) if run is not None else None

    @property
    def previous(self) -> tuple[str, int] | None:
        """(name, version) of the replaced model being compared with, if any."""
        p = self._previous
        return (p.name, p.version) if p is not None else None

    def retag(self, rec: Recorder, rollout_id: str | None) -> None:
        """Set the rollout id reported for ``rec``, starting with its open window."""
        with self._lock:
            rec.info = dataclasses.replace(rec.info, rollout_id=rollout_id)
            rec.window.info = rec.info

    @property
    def active(self) -> Recorder | None:
        return self._active

    def totals(self, rec: Recorder) -> tuple[int, int]:
        """Calls and errors of ``rec`` since it was attached, including what is buffered."""
        return (
            rec.total_count + len(rec.calls) + len(rec.errors),
            rec.total_errors + len(rec.errors),
        )

    # ------------------------------------------------------------ worker
    def tick(self, now: float | None = None) -> int:
        """Drain buffers, close windows that ended by ``now``, write; returns records written."""
        with self._lock:
            now = self.wall() if now is None else now
            interval = self.config.flush_interval_seconds
            budget = interval * self.options.shadow_budget
            t0 = self.perf_ns()
            deadline = t0 + int(budget * 1e9)
            # the replaced model's budget is the time spent running it, not the time since
            # the round began: draining the active model's calls on a busy core must not
            # use it up before a single comparison
            self._previous_left_ns = int(interval * self.config.compare_previous_budget * 1e9)
            out: list[Record] = []
            for rec in list(self._recs):
                self._drain(rec, deadline=deadline, yield_gil=True)
                while rec.window.end <= now:
                    out.extend(self._close(rec, rec.window.end))
                    start = rec.window.end
                    if start + self.config.window_seconds <= now:  # idle gap: skip ahead
                        start = (
                            math.floor(now / self.config.window_seconds)
                            * self.config.window_seconds
                        )
                    rec.window = self._new_window(
                        rec.info, rec.mask, start, shadow=rec is self._active
                    )
            return self._write(out)

    def close_all(self, now: float | None = None) -> int:
        """Drain and close every open window at ``now`` (shutdown); returns records written."""
        with self._lock:
            now = self.wall() if now is None else now
            out: list[Record] = []
            for rec in self._recs:
                self._drain(rec, deadline=None)
                out.extend(self._close(rec, now))
                rec.window = self._new_window(rec.info, rec.mask, now, shadow=rec is self._active)
            return self._write(out)

    def next_deadline(self, now: float) -> float:
        """Seconds until the worker must run again."""
        with self._lock:
            ends = [r.window.end for r in self._recs]
        wait = self.config.flush_interval_seconds
        if ends:
            wait = min(wait, min(ends) - now)
        return max(0.0, wait)

    def start(self) -> None:
        """Start the background worker thread (idempotent)."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="edgefleet-telemetry", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the worker and write the open windows so nothing recorded is lost."""
        t = self._thread
        if t is not None:
            self._stop.set()
            self.wake.set()
            t.join(timeout)
            self._thread = None
        self.close_all()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.wake.wait(self.next_deadline(self.wall()))
            self.wake.clear()
            if self._stop.is_set():
                return
            try:
                self.tick()
            except Exception:  # the worker must outlive any one bad batch
                log.exception("telemetry tick failed; continuing")

    # ------------------------------------------------------------ internals
    def _new_window(
        self, info: ModelInfo, mask: FieldMask | None, start: float, shadow: bool = False
    ) -> Window:
        w_len = self.config.window_seconds
        end = (math.floor(start / w_len) + 1) * w_len
        sampler = None
        if mask is not None and self.config.sample_rate > 0:
            sampler = StratifiedSampler(
                self.config.sample_rate,
                self.options.max_samples_per_window,
                max(1, info.classes),
                self.rng,
            )
        w = Window(info, start, end, sampler, mask)
        if shadow and self._shadow is not None:
            w.shadow = ShadowStats(self._shadow.name, self._shadow.version)
        if shadow and self._previous is not None:
            w.previous = ShadowStats(self._previous.name, self._previous.version)
        return w

    def _drain(
        self, rec: Recorder, deadline: int | None, shadow: bool = True, yield_gil: bool = False
    ) -> None:
        calls, errs = rec.calls, rec.errors
        n_err = len(errs)
        for _ in range(n_err):
            errs.popleft()
        if n_err:
            rec.window.add_errors(n_err)
            rec.total_count += n_err
            rec.total_errors += n_err
        labels = rec.labels
        if labels:
            rec.window.add_labels([labels.popleft() for _ in range(len(labels))])
        n = len(calls)
        if n == 0:
            return
        rec.total_count += n
        w = rec.window
        pop = calls.popleft
        while n > 0:
            # chunks; the worker hands the GIL back in between, so a predict() waiting
            # for it is delayed by one chunk at most, not by a whole switch interval
            # (a swap's final drain does not: under contention each hand-back costs a
            # switch interval, and the swap caller is waiting)
            k = min(n, _CHUNK)
            items = [pop() for _ in range(k)]
            n -= k
            lat = np.fromiter([c[0] for c in items], dtype=np.int64, count=k)
            ins = [c[1] for c in items]
            outs = [c[2] for c in items]
            w.add_batch(lat, ins, outs)
            if shadow and rec is self._active:
                if self._shadow is not None and w.shadow is not None:
                    self._compare(self._shadow, w.shadow, w, ins, outs, deadline)
                prev = self._previous
                if prev is not None and w.previous is not None and deadline is not None:
                    rate = self.config.compare_previous_rate
                    if rate < 1.0:
                        pick = self.rng.random(len(ins)) < rate
                        ins = [i if p else None for i, p in zip(ins, pick, strict=True)]
                    left = self._previous_left_ns
                    until = min(deadline, self.perf_ns() + left) if left > 0 else -1
                    self._previous_left_ns -= self._compare(prev, w.previous, w, ins, outs, until)
            if n and yield_gil:
                time.sleep(0)
        if rec.copy_ns and w.count > w.errors and w.lat_sum_ns:
            mean = w.lat_sum_ns / (w.count - w.errors)
            allowed = max(_COPY_NS_FLOOR, _COPY_FRACTION * mean)
            rec.stride = max(1, math.ceil(rec.copy_ns / allowed))

    def _compare(
        self,
        sh: _Shadow,
        st: ShadowStats,
        w: Window,
        ins: Sequence[Inputs | np.ndarray | None],
        outs: Sequence[Outputs | None],
        deadline: int | None,
    ) -> int:
        """Run ``sh`` on the calls whose inputs were kept and count agreement with the
        active model's outputs in ``st``, until ``deadline`` (perf ns); returns the ns
        spent running ``sh``."""
        info = w.info
        j = info.pred_output
        lats: list[int] = []
        spent = 0
        perf = self.perf_ns
        name = info.input_names[0] if len(info.input_names) == 1 else ""
        for inputs, active_out in zip(ins, outs, strict=True):
            if inputs is None or active_out is None:
                continue
            feed = dict(inputs) if isinstance(inputs, Mapping) else {name: inputs}
            t0 = perf()
            if deadline is not None and t0 > deadline:
                break
            try:
                cand = sh.run(feed)
                lats.append(perf() - t0)
                spent += lats[-1]
                a = np.asarray(active_out[j])
                c = np.asarray(cand[j])
                if info.classes > 0:
                    same = a.shape == c.shape and bool(
                        np.array_equal(
                            a.reshape(a.shape[0], -1).argmax(1), c.reshape(c.shape[0], -1).argmax(1)
                        )
                    )
                else:
                    same = a.shape == c.shape and bool(
                        np.allclose(
                            a, c, atol=self.options.shadow_atol, rtol=self.options.shadow_rtol
                        )
                    )
            except Exception:  # a failing candidate is what shadow mode is meant to find
                spent += perf() - t0
                st.errors += 1
                st.count += 1
                continue
            st.count += 1
            st.agree += int(same)
        if lats:
            arr = np.asarray(lats, np.int64)
            st.lat_sum_ns += int(arr.sum())
            st.fine += stats.fine_latency_counts(arr)
        return spent

    def _close(self, rec: Recorder, end: float) -> list[Record]:
        w = rec.window
        out: list[Record] = [("sample", body, end) for body in w.samples()]
        if w.count or w.label_count or (w.shadow is not None and w.shadow.count):
            dropped = {"samples": 0, "summaries": 0}
            if self.sink is not None:
                try:
                    dropped.update(self.sink.take_dropped())
                except Exception as e:  # a failing store must not stop the summary
                    log.warning("could not read dropped counts: %s", e)
            body = w.summary(end, dropped)
            self.recent.append(body)
            out.append(("summary", body, end))
        return out

    def _write(self, records: list[Record]) -> int:
        if self.sink is None:
            return len(records)
        batch = self._unwritten + records
        self._unwritten = []
        if not batch:
            return 0
        try:
            self.sink.append_many(batch)
            return len(batch)
        except Exception as e:
            log.warning("telemetry write of %d records failed: %s", len(batch), e)
            self.write_failures += 1
        written = 0
        for i, r in enumerate(batch):
            try:
                self.sink.append_many([r])
                written += 1
            except ValueError as e:  # the store refuses this record; retrying cannot help
                log.warning("dropping a %s record the store refuses: %s", r[0], e)
                self.invalid_records += 1
            except Exception:
                self._unwritten = batch[i:]
                break
        over = len(self._unwritten) - self.options.max_unwritten
        if over > 0:
            self.unwritten_dropped += over
            del self._unwritten[:over]
        return written
