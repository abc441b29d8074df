"""Benchmark: conversion time and parity for the test model zoo.

For each zoo model (torch CNN and MLP, scikit-learn pipeline and random
forests, an onnx.helper MLP) and each target (ONNX float32/float16/int8
dynamic/int8 static, TFLite float32/float16/int8 weights), measures in one run:

* ``intake``: taking the model in (torch export / skl2onnx / ONNX check);
* ``convert``: lowering, offline optimization, quantization, parity check on
  the calibration samples, drift reference and smoke samples;
* the parity figures of the variant against the source's own runtime;
* ``latency``: best-of-N time for one batch of calibration samples, the
  artifact in its runtime next to its peer, the source in its own runtime.

Prints markdown tables. Run it on a quiet machine for figures worth quoting:

    python bench/bench_convert.py [--runs 20] [--models cnn,mlp]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TARGETS = [
    "onnx",
    "onnx:float16",
    "onnx:int8-dynamic",
    "onnx:int8-static",
    "onnx@onnxruntime-1.16",
    "tflite",
    "tflite:float16",
    "tflite:int8-dynamic",
]


def best_of(fn: Any, runs: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    from tests import models

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20, help="latency repetitions (best of)")
    parser.add_argument("--models", default=",".join(models.ZOO), help="comma-separated zoo models")
    args = parser.parse_args()

    from converters.errors import ConverterError, error_code
    from converters.pipeline import convert
    from converters.targets import parse_target
    from device_agent.runtime import load_backend

    intake_rows, rows = [], []
    for name in args.models.split(","):
        t = time.perf_counter()
        source, x = models.zoo_source(name)
        intake_s = time.perf_counter() - t
        feed = {source.inputs[0].name: x}
        src_latency = best_of(lambda s=source, f=feed: s.reference(f), args.runs)
        intake_rows.append(
            [
                name,
                source.origin,
                source.reference_runtime,
                f"{intake_s:.2f}",
                f"{len(x)}",
                f"{src_latency * 1e3:.2f}",
            ]
        )
        for spec in TARGETS:
            target = parse_target(spec)
            t = time.perf_counter()
            try:
                art = convert(source, target, samples=x)
            except ConverterError as e:
                report = getattr(e, "report", None)
                status = "refused"
                detail = error_code(e)
                if hasattr(e, "op_type"):
                    detail = f"unsupported op {e.op_type}"
                rows.append(
                    [
                        name,
                        target.name,
                        f"{time.perf_counter() - t:.2f}",
                        *(_parity(report) if report else ["", "", ""]),
                        f"{status} ({detail})",
                        "",
                        "",
                        "",
                        "",
                    ]
                )
                continue
            convert_s = time.perf_counter() - t
            with tempfile.TemporaryDirectory() as d:
                path = Path(d) / f"m.{target.format}"
                path.write_bytes(art.data)
                backend = load_backend(path, target.format)
                afeed = {backend.input_names[0]: x}
                lat = best_of(lambda b=backend, f=afeed: b.run(f), args.runs)
            rows.append(
                [
                    name,
                    target.name,
                    f"{convert_s:.2f}",
                    *_parity(art.parity),
                    "ok",
                    f"{len(art.data) / 1024:.1f}",
                    _quantized(art),
                    f"{lat * 1e3:.2f}",
                    f"{src_latency * 1e3:.2f}",
                ]
            )

    print("### Intake (source model -> in-memory ONNX / TFLite)\n")
    print(
        _md(
            ["model", "origin", "source runtime", "intake s", "samples", "source latency ms/batch"],
            intake_rows,
        )
    )
    print("\n### Variants: conversion time, parity against the source runtime, latency\n")
    print(
        _md(
            [
                "model",
                "target",
                "convert s",
                "max abs err",
                "max rel err",
                "top-1",
                "status",
                "size KiB",
                "quantized (weights, ops, size)",
                "artifact ms/batch",
                "source ms/batch",
            ],
            rows,
        )
    )
    print(
        "\nconvert s includes lowering, optimization, quantization, the parity run, the "
        "drift reference and smoke samples. Parity: held-out validation samples at batch 1 "
        "(the gate); top-1 in brackets is the worst at the smoke-test batch. Latency: best of "
        f"{args.runs} runs over the whole calibration batch, one thread per runtime "
        "where the runtime allows."
    )


def _parity(report: Any) -> list[str]:
    o = report.outputs[0]
    top1 = "" if o.top1_agreement is None else f"{o.top1_agreement:.3f}"
    others = [outs[0] for outs in getattr(report, "other_batches", {}).values()]
    if top1 and others and others[0].top1_agreement is not None:
        top1 += f" ({min(x.top1_agreement or 0.0 for x in others):.3f})"
    return [f"{o.max_abs_error:.2e}", f"{o.max_rel_error:.2e}", top1]


def _quantized(art: Any) -> str:
    q = getattr(art, "quantization", None)
    if q is None:
        return ""
    return f"{q.weights_quantized}, {q.operators_quantized}, {100 * (q.size_ratio - 1):+.0f} %"


def _md(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
