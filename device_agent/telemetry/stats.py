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

from ..payloads import CHANNEL_POSITIONS
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


def spatial_positions(hw: int, cap: int = CHANNEL_POSITIONS) -> slice:
    """Which of an image's ``hw`` flattened (row-major) positions a channel feature bins:
    all of them, or every ``ceil(hw / cap)``-th one (at most ``cap``, the same for every
    image, so the cost is bounded; a stride, so the values are a view, not a copy)."""
    return slice(None) if hw <= cap else slice(0, hw, -(-hw // cap))


def channel_values(x: np.ndarray, layout: str, cap: int = CHANNEL_POSITIONS) -> np.ndarray:
    """``[C, n, m]`` pixel values per channel of a batch of images (a view when it can be).

    ``x`` is ``[n, C, H, W]`` (``layout`` ``NCHW``) or ``[n, H, W, C]`` (``NHWC``);
    ``m`` is the number of H x W positions taken per image (see
    :func:`spatial_positions`). Raises ValueError for anything that is not rank 4.
    """
    x = np.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"image drift needs a rank-4 input, got shape {x.shape}")
    n = x.shape[0]
    if layout == "NHWC":
        flat = x.reshape(n, -1, x.shape[3])
        return np.moveaxis(flat[:, spatial_positions(flat.shape[1], cap), :], 2, 0)
    if layout not in ("NCHW", ""):
        raise ValueError(f"unknown image layout {layout!r}; expected 'NCHW' or 'NHWC'")
    flat = x.reshape(n, x.shape[1], -1)
    return np.moveaxis(flat[:, :, spatial_positions(flat.shape[2], cap)], 1, 0)


def threshold_counts(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """:func:`binned_counts` for many values and few edges: one comparison pass per
    edge instead of a binary search per value (several times faster on an image
    channel); NaN counts in no bin. ``values`` may be any shape or a strided view."""
    n = values.size - int(np.count_nonzero(np.isnan(values)))
    if values.dtype == np.float32:
        # compare in float32 against each edge rounded up to float32: the same
        # answer as in float64 (v >= e iff v >= that float32), at half the bandwidth
        e32 = edges.astype(np.float32)
        up = e32.astype(np.float64) < edges
        e32[up] = np.nextafter(e32[up], np.float32(np.inf))
        edges = e32
    at_or_above = [int(np.count_nonzero(values >= e)) for e in edges]
    bounds = np.asarray([n, *at_or_above, 0], np.int64)
    return bounds[:-1] - bounds[1:]


def channel_moments(values: np.ndarray) -> tuple[float, float, float]:
    """(number, sum, sum of squares) of ``values`` in float64."""
    v = np.asarray(values)
    # summed in float64 without a float64 copy; einsum, not a BLAS dot, whose threads
    # would contend with the agent for a device's few cores
    axes = "abcdefgh"[: v.ndim]
    squares = np.einsum(f"{axes},{axes}->", v, v, dtype=np.float64)
    return float(v.size), float(v.sum(dtype=np.float64)), float(squares)


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
