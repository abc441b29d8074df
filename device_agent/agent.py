"""The embedding API: build an :class:`Agent` from a config and call ``predict()``.

    agent = Agent(AgentConfig.load("agent.toml"), store=TelemetryStore(path))
    agent.install_file("model.efb", TrustStore.load("trust.json"))   # or agent.swap(model)
    probs, = agent.predict(x)          # x: np.ndarray, or {"input name": array, ...}
    agent.close()

Invariants:

* **Atomic swap.** ``predict()`` reads the active model with one attribute
  read and uses only that for the whole call, so a call runs entirely on the
  old or entirely on the new model. :meth:`Agent.swap` installs the new model
  with one assignment, then waits until no call still holds the old one
  (read-copy-update: a call's reference *is* its read lock; CPython's
  reference counting frees the old handle the moment the last call drops it,
  and a weakref finalizer tells the waiting swap) before it returns the old
  model, so its caller may then unload it or overwrite its slot.
* **Cheap hot path.** Besides the runtime call, ``predict()`` does two
  ``perf_counter_ns`` reads, a countdown and one ``deque.append``; the
  telemetry worker does everything else in batches (see
  :mod:`device_agent.telemetry.engine`). The worker reads input arrays after
  ``predict()`` returned, so by default (``copy_inputs=True``) the agent keeps a
  copy of the inputs of every ``stride``-th call, where the worker sets the
  stride so copying costs at most about 0.3 us or 1 % of the model's latency
  per call (1 for small inputs; drift and samples then use those calls).
  Outputs are kept by reference (runtimes return fresh arrays; an application
  that edits returned outputs in place changes what telemetry sees). An
  application that never writes into an input array after passing it may set
  ``copy_inputs=False``: nothing is copied and every call's inputs are kept.
* **Bounded.** The worker wakes when ``wake_batch`` calls are buffered; past
  ``max_buffered`` only latencies are kept (see
  :class:`~device_agent.telemetry.TelemetryOptions`). Without a store,
  summaries stay in memory (``agent.telemetry.recent``) and samples are dropped.
* **Errors.** A runtime failure is counted in the model's window and
  re-raised as :class:`PredictError` with the runtime's exception as its cause.

``predict()`` returns the model's outputs as a list of arrays in the order of
:attr:`Agent.output_names` (what the runtimes return, so no conversion is
paid per call); :meth:`Agent.predict_named` returns a dict.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .bundle import TrustStore
from .config import AgentConfig
from .model import LoadedModel
from .runtime import Runner
from .telemetry import ModelInfo, Recorder, Telemetry, TelemetryOptions, TelemetrySink

log = logging.getLogger("edgefleet.agent")

_perf_ns = time.perf_counter_ns


class AgentError(Exception):
    """Root of the embedding API's errors."""

    code = "agent_error"


class NoActiveModelError(AgentError):
    """``predict()`` was called before any model was installed."""

    code = "no_active_model"


class InputError(AgentError):
    """The inputs do not fit the active model's signature."""

    code = "bad_input"


class PredictError(AgentError):
    """The runtime failed on these inputs; ``__cause__`` is the runtime's exception."""

    code = "predict_failed"


class UnknownPredictionError(AgentError):
    """A label names a prediction id the agent does not hold: never issued, already
    labelled, or older than the last ``max_pending_labels`` predictions with ids."""

    code = "unknown_prediction"


class InstallError(AgentError):
    """Installing a bundle from a file failed; the previous model keeps serving.

    ``code`` is the cause's code (for example ``hash_mismatch`` or
    ``smoke_test_failed``) and ``__cause__`` the underlying error.
    """

    def __init__(self, message: str, code: str = "install_failed") -> None:
        super().__init__(message)
        self.code = code


class _Active:
    """What one ``predict()`` call needs, read with a single attribute access."""

    __slots__ = (
        "model",
        "run",
        "input_name",
        "calls",
        "errors",
        "soft",
        "rec",
        "copy",
        "real",
        "__weakref__",
    )

    def __init__(self, model: LoadedModel, rec: Recorder, copy: bool) -> None:
        self.model = model
        self.run: Runner = model.fast_runner()
        inputs = model.backend.input_names
        self.input_name = inputs[0] if len(inputs) == 1 else None
        #: for a model with quantized inputs: kept inputs passed already quantized ->
        #: real values, so telemetry bins what the drift profile describes
        self.real = model.io.real_inputs if model.io is not None and model.io.inputs else None
        self.rec = rec
        self.calls = rec.calls
        self.errors = rec.errors
        self.soft = rec.wake_batch
        self.copy = copy


class Agent:
    """Serves ``predict()`` on the active model and records telemetry about it."""

    def __init__(
        self,
        config: AgentConfig,
        store: TelemetrySink | None = None,
        *,
        model: LoadedModel | None = None,
        copy_inputs: bool = True,
        telemetry_options: TelemetryOptions | None = None,
        wall: Callable[[], float] = time.time,
        start_worker: bool = True,
    ) -> None:
        """``store`` receives summaries, samples and events (None keeps them in memory).

        ``wall`` is the wall clock for window boundaries; ``start_worker=False``
        leaves the telemetry worker off so a caller (a test) drives
        :meth:`Telemetry.tick` itself.
        """
        self.config = config
        self.telemetry = Telemetry(config.telemetry, store, options=telemetry_options, wall=wall)
        self.copy_inputs = copy_inputs
        self._active: _Active | None = None
        self._shadow: LoadedModel | None = None
        self._previous: LoadedModel | None = None
        self._swap_lock = threading.Lock()
        self._rollout_id: str | None = None
        self._ids = itertools.count(1)
        #: prediction id -> (its model's recorder, the predicted class of each row)
        self._pending: OrderedDict[str, tuple[Recorder, tuple[int, ...]]] = OrderedDict()
        self._pending_lock = threading.Lock()
        self.max_pending_labels = MAX_PENDING_LABELS
        if model is not None:
            self.swap(model)
        if start_worker:
            self.telemetry.start()

    # ------------------------------------------------------------ serving
    def apply_telemetry_policy(self, policy: Mapping[str, Any]) -> dict[str, float]:
        """Take the server's telemetry policy (``sample_rate``, ``window_seconds``).

        It applies from the next window on; values out of range raise ValueError and
        change nothing. Returns what is in force.
        """
        cfg = self.telemetry.config
        rate = float(policy.get("sample_rate", cfg.sample_rate))
        window = float(policy.get("window_seconds", cfg.window_seconds))
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"sample_rate {rate} is not between 0 and 1")
        if not 1.0 <= window <= 86400.0:
            raise ValueError(f"window_seconds {window} is not between 1 and 86400")
        cfg.sample_rate, cfg.window_seconds = rate, window
        return {"sample_rate": rate, "window_seconds": window}

    def predict(
        self,
        inputs: Mapping[str, np.ndarray] | np.ndarray,
        _ns: Callable[[], int] = time.perf_counter_ns,
        _nd: type = np.ndarray,
    ) -> list[np.ndarray]:
        """Run the active model; returns its outputs in :attr:`output_names` order.

        ``inputs`` is a dict of input name to array, or one array for a
        single-input model. Raises :class:`PredictError` (runtime failure),
        :class:`InputError` or :class:`NoActiveModelError`. (The underscored
        parameters are local bindings for speed; do not pass them.)
        """
        a = self._active
        if a is None:
            raise NoActiveModelError(
                "no model is installed yet; call install_file() or swap() first"
            )
        single = inputs.__class__ is _nd
        if single and a.input_name is not None:
            feed: Any = {a.input_name: inputs}
        elif inputs.__class__ is dict:
            feed = inputs
        else:
            feed = self._feed(a, inputs)
            single = False
        t0 = _ns()
        try:
            out = a.run(feed)
        except Exception as e:
            a.errors.append(type(e).__name__)
            name, version = a.model.name, a.model.version
            del a  # the traceback must not keep the old model alive after a swap
            raise PredictError(f"{name} v{version} failed: {type(e).__name__}: {e}") from e
        dt = _ns() - t0
        rec = a.rec
        left = rec.countdown - 1  # a lost update between threads only shifts the stride
        if left:
            rec.countdown = left
            kept: Any = None
        else:
            rec.countdown = rec.stride
            if single:
                kept = inputs.copy() if a.copy else inputs  # type: ignore[union-attr]
            else:
                kept = {k: np.array(v) for k, v in feed.items()} if a.copy else feed
            if a.real is not None:
                kept = a.real(kept, a.input_name if single else None)
        calls = a.calls
        if len(calls) < a.soft:
            calls.append((dt, kept, out))
        else:
            rec.spill(dt, kept, out)
        return out  # type: ignore[no-any-return]

    def predict_with_id(
        self, inputs: Mapping[str, np.ndarray] | np.ndarray
    ) -> tuple[str, list[np.ndarray]]:
        """Like :meth:`predict`, plus an id to pass to :meth:`label` once the app learns
        the true class (a user's correction, a downstream sensor).

        For classifiers the id remembers each row's predicted class; the last
        ``max_pending_labels`` ids are kept. Costs an argmax and a dict entry more than
        :meth:`predict`, which stays as cheap as before.
        """
        a = self._active
        out = self.predict(inputs)
        if a is None or a is not self._active:  # first install or a swap raced this call
            a = self._active
        assert a is not None
        pid = f"{a.model.name}-{a.model.version}-{next(self._ids)}"
        predicted: tuple[int, ...] = ()
        info = a.rec.info
        if info.classes > 0:
            try:
                y = np.asarray(out[info.pred_output])
                if y.ndim >= 2:
                    predicted = tuple(int(c) for c in y.reshape(y.shape[0], -1).argmax(axis=1))
            except (IndexError, ValueError, TypeError):
                predicted = ()
        with self._pending_lock:
            self._pending[pid] = (a.rec, predicted)
            while len(self._pending) > self.max_pending_labels:
                self._pending.popitem(last=False)
        return pid, out

    def label(self, prediction_id: str, label: int | Sequence[int]) -> bool:
        """Post the true class of a prediction from :meth:`predict_with_id` (a list, one
        per row, for a batched call).

        The pair (true, predicted) counts in the open window's ``labels`` summary
        (accuracy per class and, up to 32 classes, the confusion matrix), uploaded with
        the window. Returns False if that model is no longer active (the label is not
        counted). Raises :class:`UnknownPredictionError`, or :class:`InputError` for a
        class the model does not have, a wrong number of labels, or a model that is
        not a classifier (the prediction stays open for a corrected label).
        """
        with self._pending_lock:
            entry = self._pending.pop(prediction_id, None)
        if entry is None:
            raise UnknownPredictionError(
                f"no prediction {prediction_id!r} awaits a label (never issued, already "
                f"labelled, or older than the last {self.max_pending_labels})"
            )
        rec, predicted = entry
        truths: list[Any] = (
            [label]
            if isinstance(label, (int, np.integer))
            else list(label)
            if isinstance(label, (list, tuple))
            else []
        )
        classes = rec.info.classes
        problem = None
        if not predicted:
            problem = f"{rec.info.name} v{rec.info.version} is not a classifier"
        elif not truths:
            problem = f"a label is a class index or a list of them, got {label!r:.80}"
        elif len(truths) != len(predicted):
            problem = f"{len(truths)} labels for a prediction of {len(predicted)} rows"
        elif not all(
            isinstance(t, (int, np.integer)) and not isinstance(t, bool) and 0 <= t < classes
            for t in truths
        ):
            problem = f"labels must be class indices in [0, {classes}), got {truths}"
        if problem is not None:
            if predicted:
                with self._pending_lock:
                    self._pending[prediction_id] = entry
            raise InputError(f"cannot label {prediction_id}: {problem}")
        if rec.closed:
            return False
        rec.labels.extend(zip((int(t) for t in truths), predicted, strict=True))
        return True

    def predict_named(self, inputs: Mapping[str, np.ndarray] | np.ndarray) -> dict[str, Any]:
        """Like :meth:`predict`, but returns ``{output name: array}``."""
        a = self._active
        out = self.predict(inputs)
        names = a.model if a is not None else self.model
        assert names is not None
        return dict(zip(names.backend.output_names, out, strict=True))

    @staticmethod
    def _feed(a: _Active, inputs: Any) -> dict[str, np.ndarray]:
        if isinstance(inputs, Mapping):
            return dict(inputs)
        if a.input_name is None:
            raise InputError(
                f"{a.model.name} v{a.model.version} has inputs "
                f"{a.model.backend.input_names}; pass a dict of name -> array"
            )
        if not isinstance(inputs, np.ndarray):
            try:
                inputs = np.asarray(inputs)
            except Exception as e:
                raise InputError(
                    f"cannot turn {type(inputs).__name__} into an array: {e}; pass a numpy array"
                ) from e
        return {a.input_name: inputs}

    # ------------------------------------------------------------ models
    @property
    def model(self) -> LoadedModel | None:
        """The active model (None before the first install)."""
        a = self._active
        return a.model if a is not None else None

    @property
    def output_names(self) -> list[str]:
        a = self._active
        return list(a.model.backend.output_names) if a is not None else []

    def swap(
        self, new: LoadedModel, *, rollout_id: str | None = None, drain_timeout: float | None = 30.0
    ) -> LoadedModel | None:
        """Make ``new`` the active model; returns the previous one (or None).

        Atomic for concurrent ``predict()`` callers. Returns once every call
        that was running on the previous model has finished (or after
        ``drain_timeout`` seconds, with a warning), and after the previous
        model's partial window has been written.
        """
        if self._previous is not None:  # it was compared with the model being replaced
            self.set_previous(None)
        with self._swap_lock:
            if rollout_id is not None:
                self._rollout_id = rollout_id
            rec = self.telemetry.attach(_describe(new, self._rollout_id))
            if self.copy_inputs:
                rec.set_copy_cost(_copy_cost_ns(new))
            handle = _Active(new, rec, self.copy_inputs)
            old, self._active = self._active, handle
        if old is None:
            return None
        old_model, old_rec = old.model, old.rec
        released = threading.Event()
        weakref.finalize(old, released.set)
        del old, handle
        if not released.wait(drain_timeout):
            log.warning(
                "calls on %s v%s still running after %.1fs; returning without them",
                old_model.name,
                old_model.version,
                drain_timeout or 0.0,
            )
        self.telemetry.detach(old_rec)
        return old_model

    def set_shadow(self, model: LoadedModel | None) -> LoadedModel | None:
        """Run ``model`` beside the active one on the same inputs (None stops); returns the old.

        The candidate runs on the telemetry worker over buffered inputs, never
        on the caller's thread; only the active model's outputs are served.
        Agreement (top-1 for classifiers, ``allclose`` otherwise), latency and
        errors land in the window summary's ``shadow`` field. When this
        returns, the previous candidate is no longer running.
        """
        if model is None:
            self.telemetry.set_shadow(None)
        else:
            self.telemetry.set_shadow(model.fast_runner(), model.name, model.version)
        old, self._shadow = self._shadow, model
        return old

    @property
    def compares_previous(self) -> bool:
        """Whether a model an update replaced is kept and compared with its successor
        (``telemetry.compare_previous_rate`` > 0)."""
        return self.telemetry.config.compare_previous_rate > 0

    def set_previous(self, model: LoadedModel | None) -> LoadedModel | None:
        """Keep ``model``, the one the active model replaced, loaded and run it on a
        sample of inputs (None stops); returns the model compared with before.

        Like a shadow candidate it runs on the telemetry worker, never on the caller's
        thread, on a random ``telemetry.compare_previous_rate`` share of the kept
        inputs within ``telemetry.compare_previous_budget`` of a core; agreement,
        latency and errors land in the window summary's ``previous`` field, so the
        fleet judges a canary by its agreement with the model it replaces. Ignored
        (nothing kept) when the rate is 0, or when the two models' input or output
        signatures differ (a new class, a new feature: their outputs are not
        comparable, and counting them as disagreement would fail a sound update).
        :meth:`swap` stops the comparison.
        """
        if model is not None and not self.compares_previous:
            model = None
        active = self.model
        if model is not None and active is not None and _signature(model) != _signature(active):
            log.info(
                "not comparing %s v%s with v%s: their inputs or outputs differ",
                active.name,
                active.version,
                model.version,
            )
            model = None
        if model is None:
            self.telemetry.set_previous(None)
        else:
            self.telemetry.set_previous(model.fast_runner(), model.name, model.version)
        old, self._previous = self._previous, model
        return old

    @property
    def previous(self) -> LoadedModel | None:
        """The model the active one replaced, while it is compared with it."""
        return self._previous

    def set_rollout_id(self, rollout_id: str | None) -> None:
        """Tag the active model's summaries (from the open window on) with ``rollout_id``."""
        with self._swap_lock:
            self._rollout_id = rollout_id
            a = self._active
            if a is not None:
                self.telemetry.retag(a.rec, rollout_id)

    @property
    def shadow(self) -> LoadedModel | None:
        return self._shadow

    def stats(self) -> dict[str, Any]:
        """Calls and errors of the active model since it became active."""
        a = self._active
        if a is None:
            return {"active": None}
        count, errors = self.telemetry.totals(a.rec)
        return {
            "active": {
                "name": a.model.name,
                "version": a.model.version,
                "slot": a.model.slot,
                "count": count,
                "errors": errors,
            },
            "shadow": (
                {"name": self._shadow.name, "version": self._shadow.version}
                if self._shadow is not None
                else None
            ),
            "previous": (
                {"name": self._previous.name, "version": self._previous.version}
                if self._previous is not None
                else None
            ),
        }

    # ------------------------------------------------------------ installing
    def install_file(
        self,
        bundle_path: str | Path,
        trust_store: TrustStore | str | Path,
        *,
        state_dir: str | Path | None = None,
        probation: bool = False,
    ) -> LoadedModel:
        """Verify a bundle file, install it into the inactive slot, smoke-test it, swap.

        For devices without a server. This runs the same persisted, crash-safe
        update state machine as the daemon (:class:`device_agent.update.Updater`)
        over ``state_dir`` (default ``device.state_dir``): A/B slots, an atomic
        active pointer, a report in the telemetry store. On any failure the
        active model keeps serving and :class:`InstallError` says why (its
        ``code`` is the update's error code, for example ``hash_mismatch``,
        ``rollback`` or ``smoke_test_failed``). With ``probation=True`` the
        update stays in probation until the daemon (or
        :meth:`~device_agent.update.Updater.tick`) commits or rolls it back.
        """
        from .update import Updater
        from .update.errors import UpdateError

        trust = (
            trust_store
            if isinstance(trust_store, TrustStore)
            else TrustStore.load(Path(trust_store))
        )
        root = Path(state_dir) if state_dir is not None else Path(self.config.device.state_dir)
        sink = self.telemetry.sink
        updater = Updater(
            root,
            trust,
            self,
            config=self.config.update,
            events=sink if hasattr(sink, "append") else None,  # type: ignore[arg-type]
            error_rate_since=self.counts_since,
        )
        try:
            if self.model is None:
                updater.boot()
            updater.install_file(bundle_path, probation=probation)
        except UpdateError as e:
            raise InstallError(
                f"cannot install {bundle_path}: {e}", getattr(e, "code", "install_failed")
            ) from e
        finally:
            updater.unlock()
        report = updater.reports[-1] if updater.reports else None
        if report is not None and report.get("outcome") not in ("installed", None):
            code = str(report.get("error_code") or "failed")
            raise InstallError(
                f"{report['outcome']} {bundle_path} [{code}]: "
                f"{report.get('message') or 'no reason given'}; the previous model keeps serving",
                code,
            )
        model = self.model
        if model is None:
            raise InstallError(f"installing {bundle_path} left no active model", "install_failed")
        return model

    def counts_since(self, since: float) -> tuple[int, int]:
        """Calls and errors of the active model (counted from its swap, when probation starts)."""
        active = self.stats().get("active") or {}
        return int(active.get("count", 0)), int(active.get("errors", 0))

    # ------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Stop the telemetry worker after writing every open window."""
        self.telemetry.stop()

    def __enter__(self) -> Agent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


#: predictions with ids kept for a later label (see Agent.predict_with_id)
MAX_PENDING_LABELS = 10_000

#: what keeping a copied input costs per byte: the copy plus first-touching fresh pages,
#: since kept copies are not freed (and their memory not reused) until the worker ran
_COPY_NS_PER_BYTE = 0.4


def _copy_cost_ns(model: LoadedModel) -> int:
    """Estimated cost of copying and keeping one call's inputs (batch 1)."""
    nbytes = [spec.nbytes_per_call() for spec in model.inputs]
    if not nbytes:
        return 0
    return int(150 * len(nbytes) + _COPY_NS_PER_BYTE * sum(nbytes))


def _signature(model: LoadedModel) -> tuple[Any, ...]:
    """Names, dtypes and static dimensions of a model's inputs and outputs as the
    application sees them (quantized I/O as float32: an int8-I/O model is compared
    with the float model it replaces)."""
    return tuple(
        (t.name, str(t.dtype), tuple(d if isinstance(d, int) else None for d in t.shape))
        for t in (*model.inputs, *model.outputs)
    )


def _describe(model: LoadedModel, rollout_id: str | None) -> ModelInfo:
    backend = model.backend
    shapes: list[list[Any]] = []
    dtypes: list[str] = []
    for spec in model.manifest.outputs:
        shapes.append(list(spec.shape))
        dtypes.append("float32" if spec.quantization is not None else spec.dtype)
    if not shapes:
        for o in backend.outputs:
            shapes.append(list(o.shape))
            dtypes.append(o.dtype.name)
    return ModelInfo.describe(
        model.name,
        model.version,
        model.slot,
        backend.input_names,
        backend.output_names,
        model.profile,
        shapes,
        dtypes,
        rollout_id,
    )
