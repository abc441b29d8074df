"""Pure statistics for telemetry windows: latency histograms, binned drift, PSI, KS.

Everything here works on whole batches with vectorized numpy and does no I/O,
so the telemetry worker can call it off the prediction hot path and tests can
check it against hand-computed values.

Conventions:

* A value ``v`` falls in drift bin ``searchsorted(edges, v, side="right")``
  (as :mod:`device_agent.payloads` specifies); ``k - 1`` edges give ``k`` bins.
* A latency falls in the first :data:`~device_agent.protocol.LATENCY_BUCKETS_MS`
  bucket whose upper bound it does not exceed; the extra last bucket is open.
* PSI = ``sum((a - e) * ln(a / e))`` over bins, where ``a`` and ``e`` are the
  observed and reference proportions, each clipped below at :data:`PSI_EPSILON`
  so empty bins do not make it infinite.
* KS is the largest absolute difference between the two binned CDFs (the
  Kolmogorov-Smirnov statistic evaluated at the bin edges).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..protocol import LATENCY_BUCKETS_MS

#: proportions are clipped below at this value before PSI's logarithm
PSI_EPSILON = 1e-4

_BUCKET_BOUNDS_NS = np.asarray(LATENCY_BUCKETS_MS, dtype=np.float64) * 1e6
#: fine latency histogram: bin i covers [2**(i/64), 2**((i+1)/64)) ns, about 1.1 % wide
FINE_STEPS_PER_OCTAVE = 64
FINE_BINS = FINE_STEPS_PER_OCTAVE * 44  # up to 2**44 ns, about 4.9 hours


def latency_bucket_counts(lat_ns: np.ndarray) -> np.ndarray:
    """Counts per protocol latency bucket (``len(LATENCY_BUCKETS_MS) + 1`` of them)."""
    idx = np.searchsorted(_BUCKET_BOUNDS_NS, lat_ns, side="left")
    return np.bincount(idx, minlength=len(_BUCKET_BOUNDS_NS) + 1).astype(np.int64)


def fine_latency_counts(lat_ns: np.ndarray) -> np.ndarray:
    """Counts per fine log bucket (see :data:`FINE_BINS`), for on-device percentiles."""
    v = np.maximum(np.asarray(lat_ns, dtype=np.float64), 1.0)
    idx = np.floor(np.log2(v) * FINE_STEPS_PER_OCTAVE).astype(np.int64)
    np.clip(idx, 0, FINE_BINS - 1, out=idx)
    return np.bincount(idx, minlength=FINE_BINS).astype(np.int64)


def fine_percentiles_ms(fine: np.ndarray, qs: Sequence[float]) -> list[float | None]:
    """Percentiles (``qs`` in 0..100) in ms from a fine histogram; None when it is empty.

    Each value is the geometric middle of the bucket holding the rank, so the
    relative error is at most about 0.55 %.
    """
    total = int(fine.sum())
    if total == 0:
        return [None for _ in qs]
    cum = np.cumsum(fine)
    out: list[float | None] = []
    for q in qs:
        rank = max(1, int(np.ceil(q / 100.0 * total)))
        i = int(np.searchsorted(cum, rank, side="left"))
        ns = 2.0 ** ((i + 0.5) / FINE_STEPS_PER_OCTAVE)
        out.append(ns / 1e6)
    return out


def binned_counts(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts of ``values`` per bin defined by ascending interior ``edges``."""
    idx = np.searchsorted(edges, values, side="right")
    return np.bincount(idx, minlength=len(edges) + 1).astype(np.int64)


def psi(
    counts: Sequence[float] | np.ndarray,
    reference: Sequence[float] | np.ndarray,
    epsilon: float = PSI_EPSILON,
) -> float | None:
    """Population stability index of observed ``counts`` against ``reference``.

    The project's one PSI: the device's drift summaries and the server's gates both call
    it. Both vectors may be counts or proportions (each is normalised to sum 1); the
    shorter is padded with zero bins; every proportion is floored at ``epsilon`` so an
    empty bin costs a bounded amount. ``sum((a - e) * ln(a / e))``; None when either side
    holds nothing.
    """
    c = np.asarray(counts, dtype=np.float64).ravel()
    r = np.asarray(reference, dtype=np.float64).ravel()
    if len(c) != len(r):
        n = max(len(c), len(r))
        c = np.pad(c, (0, n - len(c)))
        r = np.pad(r, (0, n - len(r)))
    nc, nr = c.sum(), r.sum()
    if nc <= 0 or nr <= 0:
        return None
    a = np.maximum(c / nc, epsilon)
    e = np.maximum(r / nr, epsilon)
    return float(np.sum((a - e) * np.log(a / e)))


def ks_binned(
    counts: Sequence[float] | np.ndarray, reference: Sequence[float] | np.ndarray
) -> float | None:
    """Largest absolute difference between the observed and reference binned CDFs."""
    c = np.asarray(counts, dtype=np.float64)
    n = c.sum()
    if n <= 0:
        return None
    e = np.asarray(reference, dtype=np.float64)
    return float(np.max(np.abs(np.cumsum(c / n) - np.cumsum(e / e.sum()))))


def reduce_features(x: np.ndarray, reduction: str) -> np.ndarray:
    """Turn a batch ``[n, ...]`` into per-row features ``[n, f]`` as the drift profile says.

    ``none`` flattens each row (row-major); ``channel_mean`` averages NCHW inputs
    over the spatial axes, giving one feature per channel.
    """
    x = np.asarray(x)
    if x.ndim == 0:
        x = x.reshape(1, 1)
    elif x.ndim == 1:
        x = x.reshape(1, -1)
    n = x.shape[0]
    if reduction == "channel_mean":
        if x.ndim < 3:
            return x.reshape(n, -1).astype(np.float64)
        return x.reshape(n, x.shape[1], -1).mean(axis=2)
    if reduction != "none":
        raise ValueError(
            f"unknown drift reduction {reduction!r}; expected 'none' or 'channel_mean'"
        )
    return x.reshape(n, -1)
