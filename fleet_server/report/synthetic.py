"""A synthetic but realistic review dataset, for tests and for previewing the renderer.

The story matches the fleet demo: a fleet of three device classes runs ``kws v1``;
``kws v2`` is rolled out in four canary stages and succeeds; ``kws v3`` has a
broken model (errors and slow inferences), its first canary stage breaches the
``error_rate`` gate and the engine rolls it back, re-publishing the previous
model as ``kws v4``. One site's inputs drift. Deterministic for a given seed.
"""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone

from fleet_server.report.dataset import (
    AdoptionPoint,
    Decision,
    DeviceRow,
    DriftCell,
    GateRow,
    PredictionDist,
    ReviewDataset,
    RolloutRow,
    StageSpan,
    VersionPoint,
)

CLASSES = ("gateway-x86", "board-arm64", "board-legacy")
SITES = ("north", "south", "east")
FEATURES = ("rms", "zcr", "centroid", "rolloff", "mfcc0", "mfcc1")
LABELS = ("silence", "unknown", "yes", "no", "stop", "go")


def synthetic_dataset(
    *,
    devices: int = 120,
    hours: float = 24.0,
    until: datetime | None = None,
    seed: int = 7,
) -> ReviewDataset:
    """A dataset for ``devices`` devices over the last ``hours`` before ``until``."""
    rng = random.Random(seed)
    until = until or datetime(2026, 11, 21, 18, 0, tzinfo=timezone.utc)
    since = until - timedelta(hours=hours)
    span = until - since

    def at(frac: float) -> datetime:
        return since + span * frac

    ids = [f"dev-{i:04d}" for i in range(devices)]
    # rank of each device in the rollout order (the engine's hash order)
    order = {d: rng.random() for d in ids}

    # rollout 1: kws v2, stages 1/10/50/100 percent, all gates pass
    r1_stages = [(1, 0.10, 0.18), (10, 0.18, 0.26), (50, 0.26, 0.34), (100, 0.34, 0.42)]
    # rollout 2: kws v3, breaches error_rate at 10 %, rolled back to kws v4 (= v2's model)
    r2_stages = [(1, 0.60, 0.68), (10, 0.68, 0.71)]
    rollback_at = 0.71

    def version_at(dev: str, frac: float) -> str:
        share = order[dev] * 100
        v = "kws v1"
        for pct, start, _ in r1_stages:
            if frac >= start and share < pct:
                v = "kws v2"
        for pct, start, _ in r2_stages:
            if start <= frac < rollback_at and share < pct:
                v = "kws v3"
        if frac >= rollback_at and any(share < pct for pct, _, _ in r2_stages):
            v = "kws v4"
        return v

    bins = 48
    adoption = []
    for i in range(bins + 1):
        frac = i / bins
        counts: dict[str, int] = {}
        for d in ids:
            v = version_at(d, frac)
            counts[v] = counts.get(v, 0) + 1
        adoption.append(AdoptionPoint(at(frac), counts))

    by_version = []
    base = {"kws v1": 4.1, "kws v2": 3.6, "kws v3": 9.8, "kws v4": 3.6}
    err = {"kws v1": 0.002, "kws v2": 0.0015, "kws v3": 0.09, "kws v4": 0.0015}
    for i in range(bins):
        frac = (i + 0.5) / bins
        running: dict[str, int] = {}
        for d in ids:
            v = version_at(d, frac)
            running[v] = running.get(v, 0) + 1
        for v, n in sorted(running.items()):
            count = n * rng.randint(280, 320)
            errors = sum(1 for _ in range(count) if rng.random() < err[v])
            p95 = base[v] * rng.uniform(0.92, 1.08)
            by_version.append(VersionPoint(v, at(frac), count, errors, p95 * 0.45, p95))

    drift = []
    for site in SITES:
        for f in FEATURES:
            psi = rng.uniform(0.01, 0.06)
            if site == "east" and f in ("rms", "centroid", "mfcc0"):
                psi = rng.uniform(0.3, 0.55)
            drift.append(DriftCell(f"site={site}", f, psi))

    def dist(skew: float) -> tuple[float, ...]:
        raw = [0.30, 0.20, 0.13, 0.13, 0.12, 0.12]
        raw = [max(0.005, p + skew * rng.uniform(-1, 1)) for p in raw]
        if skew > 0.05:
            raw[1] += 0.35  # the broken model answers "unknown" far too often
        total = sum(raw)
        return tuple(p / total for p in raw)

    predictions = [
        PredictionDist("r-good", "canary", LABELS, dist(0.01), 41_200),
        PredictionDist("r-good", "control", LABELS, dist(0.01), 398_000),
        PredictionDist("r-bad", "canary", LABELS, dist(0.08), 5_300),
        PredictionDist("r-bad", "control", LABELS, dist(0.01), 96_400),
    ]

    def gate_rows(bad: bool, n: int) -> tuple[GateRow, ...]:
        return (
            GateRow("install_failure_rate", 0.0, None, 0.05, "pass", n // 300, 0),
            GateRow(
                "error_rate",
                0.091 if bad else 0.0016,
                0.0019,
                0.01,
                "breach" if bad else "pass",
                n,
                n * 9,
            ),
            GateRow(
                "latency_p95_ratio",
                9.9 if bad else 3.5,
                3.6,
                1.5,
                "breach" if bad else "pass",
                n,
                n * 9,
            ),
            GateRow("drift_psi", 0.04, None, 0.25, "pass", n, 0),
            GateRow(
                "prediction_shift",
                0.41 if bad else 0.012,
                0.0,
                0.25,
                "breach" if bad else "pass",
                n,
                n * 9,
            ),
        )

    r1 = RolloutRow(
        "r-good",
        "kws v2",
        "staged_canary",
        "succeeded",
        "rollback",
        tuple(StageSpan(i, p, at(s), at(e)) for i, (p, s, e) in enumerate(r1_stages)),
        tuple(
            [Decision(at(0.10), "start", 0, "operator started the rollout", (), "op:alice")]
            + [
                Decision(
                    at(e),
                    "advance" if i < 3 else "complete",
                    i,
                    "all gates passed",
                    gate_rows(False, 600 * (i + 1) ** 2),
                    "system:rollout-engine",
                )
                for i, (_, _, e) in enumerate(r1_stages)
            ]
        ),
        name="kws v2 to all",
        previous="kws v1",
        group="all devices",
    )
    r2 = RolloutRow(
        "r-bad",
        "kws v3",
        "staged_canary",
        "rolled_back",
        "rollback",
        tuple(StageSpan(i, p, at(s), at(e)) for i, (p, s, e) in enumerate(r2_stages)),
        (
            Decision(at(0.60), "start", 0, "operator started the rollout", (), "op:alice"),
            Decision(
                at(0.68),
                "advance",
                0,
                "all gates passed (too few samples to judge latency)",
                gate_rows(False, 400),
                "system:rollout-engine",
            ),
            Decision(
                at(rollback_at),
                "rollback",
                1,
                "gate error_rate breached",
                gate_rows(True, 5300),
                "system:rollout-engine",
            ),
        ),
        name="kws v3 to all",
        previous="kws v2",
        group="all devices",
    )

    rows = []
    for i, d in enumerate(ids):
        seen = until - timedelta(seconds=rng.randint(5, 600))
        health = "ok"
        if i % 37 == 5:
            health, seen = "offline", until - timedelta(hours=rng.uniform(2, 9))
        elif i % 29 == 3:
            health = "degraded"
        rows.append(
            DeviceRow(d, CLASSES[i % 3], {"site": SITES[i % 3]}, version_at(d, 1.0), seen, health)
        )

    return ReviewDataset(
        generated_at=until,
        since=since,
        until=until,
        devices=tuple(rows),
        adoption=tuple(adoption),
        rollouts=(r1, r2),
        by_version=tuple(by_version),
        drift=tuple(drift),
        predictions=tuple(predictions),
    )
