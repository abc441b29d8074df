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

from fleet_server.report.dataset import AdoptionPoint, DriftCell, PredictionDist, VersionPoint
from fleet_server.rollouts.gates import hist_quantile, psi

MAX_BINS = 48


def time_edges(
    lo: datetime,
    hi: datetime,
    *,
    min_width: timedelta = timedelta(seconds=1),
    max_bins: int = MAX_BINS,
) -> list[datetime]:
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


def adoption_series(
    seen: Iterable[Seen], registry: Mapping[str, tuple[str, datetime]], times: Sequence[datetime]
) -> list[AdoptionPoint]:
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


class VersionSeries:
    """Accumulates windows into per-version, per-bin figures (one pass, bounded memory)."""

    def __init__(self, edges: Sequence[datetime]) -> None:
        self.edges = list(edges)
        self._count: dict[tuple[str, int], int] = defaultdict(int)
        self._errors: dict[tuple[str, int], int] = defaultdict(int)
        self._hist: dict[tuple[str, int], list[int]] = {}
        self._p95w: dict[tuple[str, int], list[float]] = defaultdict(lambda: [0.0, 0.0])

    def add(self, r: WindowFigures) -> None:
        b = min(max(bisect.bisect_right(self.edges, r.ts) - 1, 0), len(self.edges) - 2)
        key = (r.label, b)
        self._count[key] += r.count
        self._errors[key] += r.errors
        if r.latency_hist:
            add_into(self._hist.setdefault(key, []), r.latency_hist)
        elif r.p95_ms is not None and r.count:
            self._p95w[key][0] += r.p95_ms * r.count
            self._p95w[key][1] += r.count

    def clamp(self, b: int) -> int:
        """A bin index computed elsewhere (the database), clamped to this series' bins."""
        return min(max(b, 0), len(self.edges) - 2)

    def add_totals(
        self, label: str, b: int, count: int, errors: int, p95_sum: float | None, p95_count: int
    ) -> None:
        """Sums of a bin computed elsewhere; the p95 fallback counts only without a histogram."""
        key = (label, self.clamp(b))
        self._count[key] += int(count or 0)
        self._errors[key] += int(errors or 0)
        if p95_sum is not None and p95_count:
            self._p95w[key][0] += float(p95_sum)
            self._p95w[key][1] += int(p95_count)

    def add_bucket(self, label: str, b: int, idx: int, n: int) -> None:
        """One latency bucket's summed count for a bin."""
        h = self._hist.setdefault((label, self.clamp(b)), [])
        if len(h) <= idx:
            h.extend([0] * (idx + 1 - len(h)))
        h[idx] += int(n)

    def points(self) -> list[VersionPoint]:
        out = []
        edges = self.edges
        for (label, b), n in sorted(self._count.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            mid = edges[b] + (edges[b + 1] - edges[b]) / 2
            merged = self._hist.get((label, b))
            if merged and sum(merged):
                p50, p95 = hist_quantile(merged, 0.5), hist_quantile(merged, 0.95)
            else:
                w = self._p95w.get((label, b))
                p50, p95 = None, (w[0] / w[1] if w and w[1] else None)
            out.append(VersionPoint(label, mid, n, self._errors[(label, b)], p50, p95))
        return out


def add_into(total: list[int], counts: Sequence[int]) -> None:
    """``total += counts`` element-wise, growing ``total`` as needed."""
    if len(total) < len(counts):
        total.extend([0] * (len(counts) - len(total)))
    for i, c in enumerate(counts):
        total[i] += int(c)


def version_series(rows: Iterable[WindowFigures], edges: Sequence[datetime]) -> list[VersionPoint]:
    """Per version and time bin: inferences, errors, p50 and p95 latency."""
    acc = VersionSeries(edges)
    for r in rows:
        acc.add(r)
    return acc.points()


@dataclass(frozen=True)
class FeatureWindow:
    """One window's binned input counts, tagged with the device's group."""

    group: str
    label: str
    count: int
    feature_counts: Mapping[str, Sequence[int]]


class DriftMap:
    """Accumulates binned input counts per (group, version, feature) in one pass."""

    def __init__(self) -> None:
        self._merged: dict[tuple[str, str, str], list[int]] = {}
        self._weight: dict[tuple[str, str], int] = defaultdict(int)
        self._fleet: dict[tuple[str, str], list[int]] = {}

    def add(
        self,
        groups: Sequence[str],
        label: str,
        weight: int,
        feature_counts: Mapping[str, Sequence[int]],
    ) -> None:
        """Counts of one device (one window, or summed) that belongs to ``groups``.

        ``weight`` is the inferences behind the counts (each window at least 1); the
        fleet-wide fallback reference counts each input once, whatever its groups.
        """
        for g in groups:
            self._weight[(g, label)] += weight
        for f, counts in feature_counts.items():
            for g in groups:
                add_into(self._merged.setdefault((g, label, f), []), counts)
            add_into(self._fleet.setdefault((label, f), []), counts)

    def cells(
        self, references: Mapping[str, Mapping[str, Sequence[float]]]
    ) -> tuple[list[DriftCell], list[str]]:
        """PSI per (group, feature), and the versions that had no reference profile."""
        acc: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0.0])
        missing: set[str] = set()
        for (group, label, f), counts in self._merged.items():
            if not any(counts):
                # nothing binned (e.g. an agent too old for the bundle's image features):
                # no figure, rather than a PSI of 0 that reads as "no drift"
                continue
            ref = references.get(label, {}).get(f)
            if ref is None:
                missing.add(label)
                ref = self._fleet[(label, f)]
            w = self._weight[(group, label)]
            acc[(group, f)][0] += psi(counts, ref) * w
            acc[(group, f)][1] += w
        cells = [DriftCell(g, f, s / w) for (g, f), (s, w) in acc.items() if w]
        cells.sort(key=lambda c: (c.group, c.feature))
        return cells, sorted(missing)


def drift_cells(
    rows: Iterable[FeatureWindow], references: Mapping[str, Mapping[str, Sequence[float]]]
) -> tuple[list[DriftCell], list[str]]:
    """PSI per (group, feature), and the versions that had no reference profile.

    Counts are merged per (group, version, feature); each is compared with that
    version's reference proportions (or, lacking one, the fleet-wide merged
    counts of the version); a group's figure is the inference-weighted mean
    over the versions it ran.
    """
    acc = DriftMap()
    for r in rows:
        acc.add([r.group], r.label, max(r.count, 1), r.feature_counts)
    return acc.cells(references)


def prediction_dist(
    rollout: str, cohort: str, windows: Iterable[Sequence[int]], labels: Sequence[str] | None = None
) -> PredictionDist | None:
    """Merge prediction counts of one cohort; None if it made no predictions."""
    total: list[int] = []
    for counts in windows:
        add_into(total, counts)
    n = sum(total)
    if n <= 0:
        return None
    names = list(labels or [])[: len(total)]
    names += [f"class {i}" for i in range(len(names), len(total))]
    return PredictionDist(rollout, cohort, tuple(names), tuple(c / n for c in total), n)
