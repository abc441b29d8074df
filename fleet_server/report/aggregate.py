"""Pure aggregation of telemetry rows into the review dataset's series.

No database here: :mod:`.load` queries rows and hands them to these functions,
which the tests drive directly with hand-made rows. Times are UTC datetimes.

* adoption: a device runs, at time ``t``, the version it was most recently seen
  starting to run at or before ``t`` (install events and the first summary of
  each version both count as "seen starting"); devices never seen in telemetry
  count with the version the registry says they run, from their enrollment on.
* by version: counts and errors summed per time bin; latency histograms merged
  per bin and p50/p95 read off the merged histogram (count-weighted mean of the
  devices' own p95 when no histogram was sent).
* drift: per group and feature, binned input counts are merged over the period
  and compared with the bundle's reference proportions (PSI); without a
  reference profile, with the fleet-wide merged counts of the same version
  (and the dataset says so).
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from ..rollouts.gates import hist_quantile, psi
from .dataset import AdoptionPoint, DriftCell, PredictionDist, VersionPoint

MAX_BINS = 48


def time_edges(lo: datetime, hi: datetime, *, min_width: timedelta = timedelta(seconds=1),
               max_bins: int = MAX_BINS) -> list[datetime]:
    """Bin edges covering ``lo`` .. ``hi``: at most ``max_bins`` bins, none narrower than
    ``min_width`` (so bins are not finer than the telemetry windows)."""
    if hi <= lo:
        return [lo, lo + min_width]
    width = max((hi - lo) / max_bins, min_width)
    n = max(1, min(max_bins, int(-(-(hi - lo) // width))))
    return [lo + width * i for i in range(n)] + [hi]


@dataclass(frozen=True)
class Seen:
    """A device seen starting to run ``label`` at ``ts``."""

    device_id: str
    label: str
    ts: datetime


def adoption_series(seen: Iterable[Seen], registry: Mapping[str, tuple[str, datetime]],
                    times: Sequence[datetime]) -> list[AdoptionPoint]:
    """Devices per version at each of ``times``.

    ``registry`` maps every device to (the version it runs now, enrolled at); it
    is used for devices that ``seen`` says nothing about.
    """
    per_device: dict[str, list[Seen]] = defaultdict(list)
    for s in seen:
        per_device[s.device_id].append(s)
    for obs in per_device.values():
        obs.sort(key=lambda s: s.ts)
    stamps = {d: [s.ts for s in obs] for d, obs in per_device.items()}
    points = []
    for t in times:
        counts: dict[str, int] = defaultdict(int)
        for d, obs in per_device.items():
            i = bisect.bisect_right(stamps[d], t)
            if i:
                counts[obs[i - 1].label] += 1
        for d, (label, enrolled) in registry.items():
            if d not in per_device and enrolled <= t:
                counts[label] += 1
        points.append(AdoptionPoint(t, dict(counts)))
    return points


@dataclass(frozen=True)
class WindowFigures:
    """One telemetry window's inference figures."""

    ts: datetime
    label: str
    count: int
    errors: int
    latency_hist: Sequence[int] | None
    p95_ms: float | None


def version_series(rows: Iterable[WindowFigures], edges: Sequence[datetime]) -> list[VersionPoint]:
    """Per version and time bin: inferences, errors, p50 and p95 latency."""
    count: dict[tuple[str, int], int] = defaultdict(int)
    errors: dict[tuple[str, int], int] = defaultdict(int)
    hist: dict[tuple[str, int], list[int]] = {}
    p95w: dict[tuple[str, int], list[float]] = defaultdict(lambda: [0.0, 0.0])
    last = len(edges) - 2
    for r in rows:
        b = min(max(bisect.bisect_right(edges, r.ts) - 1, 0), last)
        key = (r.label, b)
        count[key] += r.count
        errors[key] += r.errors
        if r.latency_hist:
            h = hist.setdefault(key, [0] * len(r.latency_hist))
            if len(h) < len(r.latency_hist):
                h.extend([0] * (len(r.latency_hist) - len(h)))
            for i, c in enumerate(r.latency_hist):
                h[i] += int(c)
        elif r.p95_ms is not None and r.count:
            p95w[key][0] += r.p95_ms * r.count
            p95w[key][1] += r.count
    out = []
    for (label, b), n in sorted(count.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        mid = edges[b] + (edges[b + 1] - edges[b]) / 2
        merged = hist.get((label, b))
        if merged and sum(merged):
            p50, p95 = hist_quantile(merged, 0.5), hist_quantile(merged, 0.95)
        else:
            w = p95w.get((label, b))
            p50, p95 = None, (w[0] / w[1] if w and w[1] else None)
        out.append(VersionPoint(label, mid, n, errors[(label, b)], p50, p95))
    return out


@dataclass(frozen=True)
class FeatureWindow:
    """One window's binned input counts, tagged with the device's group."""

    group: str
    label: str
    count: int
    feature_counts: Mapping[str, Sequence[int]]


def drift_cells(rows: Iterable[FeatureWindow],
                references: Mapping[str, Mapping[str, Sequence[float]]]
                ) -> tuple[list[DriftCell], list[str]]:
    """PSI per (group, feature), and the versions that had no reference profile.

    Counts are merged per (group, version, feature); each is compared with that
    version's reference proportions (or, lacking one, the fleet-wide merged
    counts of the version); a group's figure is the inference-weighted mean
    over the versions it ran.
    """
    merged: dict[tuple[str, str, str], list[int]] = {}
    weight: dict[tuple[str, str], int] = defaultdict(int)
    fleet: dict[tuple[str, str], list[int]] = {}
    for r in rows:
        weight[(r.group, r.label)] += max(r.count, 1)
        for f, counts in r.feature_counts.items():
            for target in (merged.setdefault((r.group, r.label, f), []),
                           fleet.setdefault((r.label, f), [])):
                if len(target) < len(counts):
                    target.extend([0] * (len(counts) - len(target)))
                for i, c in enumerate(counts):
                    target[i] += int(c)
    acc: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0.0])
    missing: set[str] = set()
    for (group, label, f), counts in merged.items():
        ref = references.get(label, {}).get(f)
        if ref is None:
            missing.add(label)
            ref = fleet[(label, f)]
        w = weight[(group, label)]
        acc[(group, f)][0] += psi(counts, ref) * w
        acc[(group, f)][1] += w
    cells = [DriftCell(g, f, s / w) for (g, f), (s, w) in acc.items() if w]
    cells.sort(key=lambda c: (c.group, c.feature))
    return cells, sorted(missing)


def prediction_dist(rollout: str, cohort: str, windows: Iterable[Sequence[int]],
                    labels: Sequence[str] | None = None) -> PredictionDist | None:
    """Merge prediction counts of one cohort; None if it made no predictions."""
    total: list[int] = []
    for counts in windows:
        if len(total) < len(counts):
            total.extend([0] * (len(counts) - len(total)))
        for i, c in enumerate(counts):
            total[i] += int(c)
    n = sum(total)
    if n <= 0:
        return None
    names = list(labels or [])[: len(total)]
    names += [f"class {i}" for i in range(len(names), len(total))]
    return PredictionDist(rollout, cohort, tuple(names), tuple(c / n for c in total), n)
