"""One telemetry window of one model: counters fed in batches, a summary at close.

Pure (no I/O, no threads): the worker in :mod:`device_agent.telemetry.engine`
feeds it batches drained from the hot path, and closes it into the summary
record body that :mod:`device_agent.protocol` specifies.

Units: ``count`` and the latency figures are per ``predict()`` call; drift
bin counts and the prediction distribution are per row (a call with a batch of
8 rows adds 8), except a ``channel_values`` profile's image channels, whose bins
count the pixel values taken from each image (up to
:data:`~device_agent.payloads.CHANNEL_POSITIONS` per channel). A call's
*predicted class* (for sampling and shadow agreement) is the argmax over the
last axis of its first row.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..payloads import CHANNEL_POSITIONS, DriftProfile
from ..protocol import MAX_CONFUSION_CLASSES
from . import stats
from .sampling import FieldMask, StratifiedSampler

Inputs = Mapping[str, np.ndarray]
Outputs = Sequence[np.ndarray]


@dataclass(frozen=True)
class ModelInfo:
    """What the telemetry needs to know about a model."""

    name: str
    version: int
    slot: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    profile: DriftProfile | None = None
    rollout_id: str | None = None
    #: index of the output that carries predictions (the profile's output, else 0)
    pred_output: int = 0
    #: number of classes if the prediction output is a classifier's, else 0
    classes: int = 0

    @classmethod
    def describe(
        cls,
        name: str,
        version: int,
        slot: str,
        input_names: Sequence[str],
        output_names: Sequence[str],
        profile: DriftProfile | None,
        output_shapes: Sequence[Sequence[Any]] = (),
        output_dtypes: Sequence[str] = (),
        rollout_id: str | None = None,
    ) -> ModelInfo:
        """Decide which output holds predictions and whether the model is a classifier.

        With a drift profile its ``output`` says so; without one, output 0 is a
        classifier's when it is floating point with a static last axis of at least 2.
        """
        outs = tuple(output_names)
        pred, classes = 0, 0
        if profile is not None and profile.output is not None:
            if profile.output.name in outs:
                pred = outs.index(profile.output.name)
            if profile.output.kind == "classification":
                classes = max(profile.output.classes, len(profile.output.proportions))
        elif output_shapes:
            shape = list(output_shapes[0])
            dtype = output_dtypes[0] if output_dtypes else "float32"
            last = shape[-1] if shape else None
            floating = "float" in dtype or "double" in dtype
            if isinstance(last, int) and last >= 2 and floating and len(shape) >= 2:
                classes = last
        return cls(
            name, int(version), slot, tuple(input_names), outs, profile, rollout_id, pred, classes
        )


@dataclass
class ShadowStats:
    """Counters of a model run beside the active one within one window: a shadow
    candidate, or the model the active one replaced."""

    name: str
    version: int
    count: int = 0
    agree: int = 0
    errors: int = 0
    lat_sum_ns: int = 0
    fine: np.ndarray = field(default_factory=lambda: np.zeros(stats.FINE_BINS, np.int64))

    def to_json(self) -> dict[str, Any]:
        p50, p95, p99 = stats.fine_percentiles_ms(self.fine, (50, 95, 99))
        n = int(self.fine.sum())
        return {
            "name": self.name,
            "version": self.version,
            "count": self.count,
            "agreement": (self.agree / self.count) if self.count else None,
            "latency_ms": {
                "p50": p50,
                "p95": p95,
                "p99": p99,
                "mean": (self.lat_sum_ns / n / 1e6) if n else None,
            },
            "errors": self.errors,
        }


class Window:
    """Counters of one model over ``[start, end)``."""

    def __init__(
        self,
        info: ModelInfo,
        start: float,
        end: float,
        sampler: StratifiedSampler | None,
        mask: FieldMask | None,
    ) -> None:
        self.info = info
        self.start = start
        self.end = end
        self.sampler = sampler
        self.mask = mask
        self.count = 0
        self.errors = 0
        self.lat_sum_ns = 0
        self.hist = np.zeros(len(stats.LATENCY_BUCKETS_MS) + 1, np.int64)
        self.fine = np.zeros(stats.FINE_BINS, np.int64)
        prof = info.profile
        self.feature_counts: list[np.ndarray] | None = None
        self._edges: list[np.ndarray] = []
        self._index = np.zeros(0, np.int64)
        if prof is not None and prof.features:
            self._edges = [np.asarray(f.edges, np.float64) for f in prof.features]
            self._index = np.asarray([f.index for f in prof.features], np.int64)
            self.feature_counts = [np.zeros(len(e) + 1, np.int64) for e in self._edges]
        #: per feature: number, sum and sum of squares of the binned values
        #: (``channel_values`` profiles: each image channel's mean and std)
        self._moments: np.ndarray | None = None
        if prof is not None and prof.features and prof.reduction == "channel_values":
            self._moments = np.zeros((len(prof.features), 3), np.float64)
        self.pred_counts: np.ndarray | None = None
        self._pred_edges: np.ndarray | None = None
        if prof is not None and prof.output is not None:
            if prof.output.kind == "classification":
                self.pred_counts = np.zeros(max(info.classes, 1), np.int64)
            else:
                self._pred_edges = np.asarray(prof.output.edges, np.float64)
                self.pred_counts = np.zeros(len(self._pred_edges) + 1, np.int64)
        self.drift_failures = 0
        self.shadow: ShadowStats | None = None
        #: the model this one replaced, run on a sample of this window's inputs
        self.previous: ShadowStats | None = None
        #: true labels posted in this window for earlier predictions (classifiers only)
        self.label_count = 0
        self._labelled: np.ndarray | None = None
        self._correct: np.ndarray | None = None
        self._confusion: np.ndarray | None = None

    # ------------------------------------------------------------ feeding
    def add_batch(
        self,
        lat_ns: np.ndarray,
        inputs: Sequence[Inputs | np.ndarray | None],
        outputs: Sequence[Outputs | None],
    ) -> np.ndarray:
        """Add a batch of successful calls; returns each call's predicted class (-1: none).

        ``inputs[i]`` is a dict, the single input's array, or None when the hot
        path did not keep them; ``outputs[i]`` is None when the call was only
        timed (the buffer was over its bound).
        """
        n = len(lat_ns)
        if n == 0:
            return np.zeros(0, np.int64)
        self.count += n
        self.lat_sum_ns += int(lat_ns.sum())
        self.hist += stats.latency_bucket_counts(lat_ns)
        self.fine += stats.fine_latency_counts(lat_ns)
        if self.feature_counts is not None:
            # (not "None in inputs": that would compare arrays elementwise)
            kept = [i for i in inputs if i is not None]
            if kept:
                self._add_drift(kept)
        classes = self._predicted(outputs)
        if self.sampler is not None:
            ok = np.fromiter(
                (i is not None and o is not None for i, o in zip(inputs, outputs, strict=True)),
                dtype=bool,
                count=n,
            )
            rows = np.flatnonzero(ok)
            if len(rows):
                self.sampler.offer(
                    classes[rows],
                    lambda k: (self._as_dict(inputs[int(rows[k])]), outputs[int(rows[k])]),
                )
        return classes

    def add_errors(self, n: int) -> None:
        self.count += n
        self.errors += n

    def _as_dict(self, inputs: Inputs | np.ndarray | None) -> Inputs:
        if isinstance(inputs, np.ndarray):
            return {self.info.input_names[0]: inputs}
        assert inputs is not None
        return inputs

    def _add_drift(self, inputs: Sequence[Inputs | np.ndarray]) -> None:
        prof = self.info.profile
        assert prof is not None and self.feature_counts is not None
        single = len(self.info.input_names) == 1 and self.info.input_names[0] == prof.input
        try:
            arrays = [
                i if isinstance(i, np.ndarray) and single else np.asarray(i[prof.input])  # type: ignore[call-overload]
                for i in inputs
            ]
            if self._moments is not None:
                # one feature per image channel: its pixel values, binned and summed;
                # large images are cut to the binned positions before the batch is
                # joined, so they are not copied whole (small ones: one call is cheaper)
                if arrays[0].size > 4 * CHANNEL_POSITIONS * len(self._index):
                    channels = np.concatenate(
                        [stats.channel_values(a, prof.layout) for a in arrays], axis=1
                    )
                else:
                    channels = np.ascontiguousarray(
                        stats.channel_values(np.concatenate(arrays), prof.layout)
                    )
                if len(self._index) and int(self._index.max()) >= len(channels):
                    raise IndexError(f"no channel {int(self._index.max())} in {arrays[0].shape}")
            else:
                x = np.concatenate(arrays)
                cols = stats.reduce_features(x, prof.reduction)[:, self._index]
        except (KeyError, ValueError, IndexError, TypeError):
            # inputs that do not fit the profile: count, do not break telemetry
            self.drift_failures += len(inputs)
            return
        if self._moments is not None:
            for j, (c, edges) in enumerate(zip(self._index, self._edges, strict=True)):
                v = channels[c]
                self.feature_counts[j] += stats.threshold_counts(v, edges)
                self._moments[j] += stats.channel_moments(v)
            return
        for j, edges in enumerate(self._edges):
            self.feature_counts[j] += stats.binned_counts(cols[:, j], edges)

    def _predicted(self, outputs: Sequence[Outputs | None]) -> np.ndarray:
        n = len(outputs)
        info = self.info
        j = info.pred_output
        classes = np.full(n, -1, np.int64)
        if self.pred_counts is None and info.classes == 0:
            return classes
        rows_of = [r for r in range(n) if outputs[r] is not None]
        if not rows_of:  # only timed calls (the buffer was over its bound)
            return classes
        try:
            parts = [np.asarray(outputs[r][j]) for r in rows_of]  # type: ignore[index]
            y = np.concatenate(parts)
        except (ValueError, IndexError, TypeError):
            return classes
        rows = y.shape[0] if y.ndim else 0
        if rows == 0 or y.size == 0:
            return classes
        if info.classes > 0:
            row_cls = (
                y.reshape(rows, -1).argmax(axis=1) if y.ndim >= 2 else np.zeros(rows, np.int64)
            )
            if self.pred_counts is not None:
                self.pred_counts += np.bincount(
                    np.clip(row_cls, 0, len(self.pred_counts) - 1), minlength=len(self.pred_counts)
                )
            if rows == len(rows_of):
                classes[rows_of] = row_cls
            else:  # batched calls: a call's class is its first row's
                classes[rows_of] = [int(np.argmax(p.reshape(p.shape[0], -1)[0])) for p in parts]
            return classes
        if self._pred_edges is not None and self.pred_counts is not None and rows:
            vals = y.reshape(rows, -1)[:, 0]
            self.pred_counts += stats.binned_counts(vals, self._pred_edges)
        return classes

    def add_labels(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Count ``(true class, predicted class)`` pairs; classes outside the model's are
        skipped (the agent refuses them before they get here)."""
        k = self.info.classes
        if k < 1:
            return
        if self._labelled is None:
            self._labelled = np.zeros(k, np.int64)
            self._correct = np.zeros(k, np.int64)
            if k <= MAX_CONFUSION_CLASSES:
                self._confusion = np.zeros((k, k), np.int64)
        assert self._correct is not None
        for true, pred in pairs:
            if not (0 <= true < k and 0 <= pred < k):
                continue
            self.label_count += 1
            self._labelled[true] += 1
            if pred == true:
                self._correct[true] += 1
            if self._confusion is not None:
                self._confusion[true, pred] += 1

    def labels_json(self) -> dict[str, Any] | None:
        """The summary's ``labels`` field (protocol ``LabelSummary``), None without labels."""
        if not self.label_count or self._labelled is None or self._correct is None:
            return None
        return {
            "count": int(self._labelled.sum()),
            "correct": int(self._correct.sum()),
            "labelled": self._labelled.tolist(),
            "correct_by_class": self._correct.tolist(),
            "confusion": self._confusion.tolist() if self._confusion is not None else None,
        }

    # ------------------------------------------------------------ closing
    def drift_json(self) -> dict[str, Any] | None:
        prof = self.info.profile
        if prof is None or self.feature_counts is None:
            return None
        feats: list[dict[str, Any]] = []
        for j, (f, counts) in enumerate(zip(prof.features, self.feature_counts, strict=True)):
            feat: dict[str, Any] = {
                "name": f.name,
                "psi": stats.psi(counts, f.proportions),
                "ks": stats.ks_binned(counts, f.proportions),
                "counts": counts.tolist(),
            }
            if self._moments is not None and self._moments[j, 0] > 0:
                n, total, squares = self._moments[j]
                mean = total / n
                feat["mean"] = float(mean)
                feat["std"] = float(math.sqrt(max(squares / n - mean * mean, 0.0)))
            feats.append(feat)
        psis = [f["psi"] for f in feats if f["psi"] is not None]
        kss = [f["ks"] for f in feats if f["ks"] is not None]
        pred = None
        if prof.output is not None and self.pred_counts is not None:
            pred = {
                "counts": self.pred_counts.tolist(),
                "psi": stats.psi(self.pred_counts, prof.output.proportions),
            }
        return {
            "features": feats,
            "psi_max": max(psis) if psis else None,
            "ks_max": max(kss) if kss else None,
            "prediction": pred,
        }

    def summary(self, end: float, dropped: Mapping[str, int]) -> dict[str, Any]:
        """The summary record body (protocol.py) for this window, closed at ``end``."""
        p50, p95, p99 = stats.fine_percentiles_ms(self.fine, (50, 95, 99))
        ok = int(self.hist.sum())
        info = self.info
        body: dict[str, Any] = {
            "window_start": self.start,
            "window_end": end,
            "name": info.name,
            "version": info.version,
            "slot": info.slot,
            "rollout_id": info.rollout_id,
            "count": self.count,
            "errors": self.errors,
            "latency_ms": {
                "p50": p50,
                "p95": p95,
                "p99": p99,
                "mean": (self.lat_sum_ns / ok / 1e6) if ok else None,
            },
            "latency_hist": self.hist.tolist(),
            "drift": self.drift_json(),
            "shadow": self.shadow.to_json() if self.shadow is not None else None,
            "dropped": dict(dropped),
        }
        labels = self.labels_json()
        if labels is not None:
            body["labels"] = labels
        if self.previous is not None and self.previous.count:
            body["previous"] = self.previous.to_json()
        return body

    def samples(self) -> list[dict[str, Any]]:
        """Sample record bodies for this window (masked); empty when sampling is off."""
        if self.sampler is None or self.mask is None:
            return []
        info = self.info
        out = []
        for cls, (inputs, outputs) in self.sampler.take(self.count - self.errors):
            out.append(
                {
                    "name": info.name,
                    "version": info.version,
                    "predicted": cls if cls >= 0 else None,
                    "inputs": self.mask.apply(inputs),
                    "outputs": self.mask.apply(dict(zip(info.output_names, outputs, strict=False))),
                }
            )
        return out
