"""Telemetry worker cost of input drift per prediction: image channels vs the older
per-image channel means, beside a tabular input.

The agent bins inputs on its telemetry thread, never on the caller's (``predict()``
only appends to a buffer), so this is CPU the device spends per prediction off the
hot path. Each row feeds batches of 512 single-image calls (what the worker drains at
once) into a real :class:`~device_agent.telemetry.window.Window` with a real reference
profile and reports the median over repeats, in microseconds per prediction.

    python bench/bench_drift.py [--repeats 9]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from converters.reference import drift_profile  # noqa: E402
from device_agent.payloads import DriftProfile  # noqa: E402
from device_agent.telemetry.window import ModelInfo, Window  # noqa: E402
from tests.agent_models import make_profile  # noqa: E402

BATCH = 512


def per_prediction_us(profile: DriftProfile, calls: list[np.ndarray], repeats: int) -> float:
    info = ModelInfo("m", 1, "a", ("x",), ("probs",), profile)
    lat = np.full(len(calls), 1000, np.int64)
    outs: list[None] = [None] * len(calls)
    times = []
    for _ in range(repeats):
        w = Window(info, 0.0, 60.0, None, None)
        t = time.perf_counter_ns()
        w.add_batch(lat, calls, outs)  # type: ignore[arg-type]
        times.append(time.perf_counter_ns() - t)
        assert w.drift_failures == 0
    return float(np.median(times)) / len(calls) / 1000.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    ref = rng.normal(size=(512, 16)).astype(np.float32)
    calls = [rng.normal(size=(1, 16)).astype(np.float32) for _ in range(BATCH)]
    us = per_prediction_us(make_profile(ref, None), calls, args.repeats)
    rows.append(("tabular 16 features", "per feature (`none`)", us))
    for shape in ((3, 32, 32), (3, 224, 224)):
        ref = rng.normal(size=(128, *shape)).astype(np.float32)
        calls = [rng.normal(size=(1, *shape)).astype(np.float32) for _ in range(BATCH)]
        label = "image " + "x".join(map(str, shape))
        old = make_profile(ref, None, reduction="channel_mean")
        new = drift_profile("x", ref, None, None, "classification")
        rows.append((label, "channel means (`channel_mean`, before)", 0.0))
        rows.append((label, "per-channel pixel values (`channel_values`)", 0.0))
        # alternate the two so a change in machine load hits both
        a, b = [], []
        for _ in range(3):
            a.append(per_prediction_us(old, calls, args.repeats))
            b.append(per_prediction_us(new, calls, args.repeats))
        rows[-2] = (rows[-2][0], rows[-2][1], float(np.median(a)))
        rows[-1] = (rows[-1][0], rows[-1][1], float(np.median(b)))
    print("| input | drift features | worker us per prediction |")
    print("|---|---|---:|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.1f} |")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\nbatches of {BATCH} calls; load average {load:.1f}; numpy {np.__version__}")


if __name__ == "__main__":
    main()
