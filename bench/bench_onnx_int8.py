"""Benchmark: ``onnx:int8-static`` against ``onnx:float32`` on models trained in the tests.

For each architecture of ``tests/converters/zoo/trained.py`` (trained a few epochs on
scikit-learn's digits or the synthetic keyword set), both targets go through the
converters' pipeline (``converters.pipeline.convert``): int8-static calibrated on 200
training samples, its parity judged on the held-out set one sample at a time. Measured:

* ``convert s``: wall time of ``convert`` (lowering, quantization, parity, drift
  reference, smoke samples), each target;
* ``KiB`` and ``ratio``: artifact sizes and int8 / float32;
* ``int8 weights``: Conv/MatMul/Gemm weight tensors int8 per channel in the file, of all;
* ``float nodes``: nodes the report says stayed float (op x count);
* held-out accuracy of each, top-1 agreement of int8 with float32, and the parity
  report's worst absolute error on the logits;
* ``p50 ms``: median batch-1 latency on onnxruntime, one intra-op thread.

Prints a markdown table and the load average. Figures from a shared machine are
indicative only:

    python bench/bench_onnx_int8.py [--models resnet18,digits_cnn] [--runs 200]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CALIBRATION = 200


def _session(data: bytes):  # type: ignore[no-untyped-def]
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def _predict(data: bytes, x: np.ndarray) -> np.ndarray:
    s = _session(data)
    name = s.get_inputs()[0].name
    return np.concatenate([s.run(None, {name: x[i : i + 1]})[0] for i in range(len(x))])


def _p50_ms(data: bytes, x: np.ndarray, runs: int) -> float:
    s = _session(data)
    name = s.get_inputs()[0].name
    for i in range(10):
        s.run(None, {name: x[i % len(x) : i % len(x) + 1]})
    times = []
    for i in range(runs):
        sample = x[i % len(x) : i % len(x) + 1]
        t = time.perf_counter()
        s.run(None, {name: sample})
        times.append(time.perf_counter() - t)
    return 1000 * float(np.median(times))


def main() -> None:
    from converters.pipeline import convert
    from converters.source import from_onnx
    from converters.targets import parse_target
    from tests.converters.tflite.test_int8_full import export
    from tests.converters.zoo.trained import TRAINED, train

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(sorted(TRAINED)))
    ap.add_argument("--runs", type=int, default=200)
    args = ap.parse_args()

    rows = []
    for name in args.models.split(","):
        print(f"{name}: training", file=sys.stderr)
        module, data = train(name)
        source = from_onnx(export(module, data.train_x), task="classification")
        t = time.perf_counter()
        f32 = convert(source, parse_target("onnx"), samples={"x": data.test_x})
        f32_s = time.perf_counter() - t
        t = time.perf_counter()
        q8 = convert(
            source,
            parse_target("onnx:int8-static"),
            samples={"x": data.train_x[:CALIBRATION]},
            validation_samples={"x": data.test_x},
        )
        q8_s = time.perf_counter() - t
        assert q8.quantization is not None and q8.quantization.nodes is not None
        nodes = q8.quantization.nodes
        ref = _predict(f32.data, data.test_x).argmax(1)
        got = _predict(q8.data, data.test_x).argmax(1)
        weights = sum(sum(k.values()) for k in nodes.weights.values())
        stayed = ", ".join(f"{r.op} x{r.count}" for r in nodes.float_reasons) or "none"
        rows.append(
            (
                name,
                f"{f32_s:.2f}",
                f"{q8_s:.2f}",
                f"{len(f32.data) / 1024:.1f}",
                f"{len(q8.data) / 1024:.1f}",
                f"{len(q8.data) / len(f32.data):.3f}",
                f"{nodes.weight_count('int8 per-channel')}/{weights}",
                stayed,
                f"{np.mean(ref == data.test_y):.3f}",
                f"{np.mean(got == data.test_y):.3f}",
                f"{np.mean(ref == got):.4f}",
                f"{q8.parity.outputs[0].max_abs_error:.2g}",
                f"{_p50_ms(f32.data, data.test_x, args.runs):.3f}",
                f"{_p50_ms(q8.data, data.test_x, args.runs):.3f}",
            )
        )
    head = (
        "model",
        "convert s float32",
        "convert s int8-static",
        "float32 KiB",
        "int8-static KiB",
        "ratio",
        "int8 weights (per-channel/all)",
        "float nodes",
        "float32 acc",
        "int8 acc",
        "top-1 agreement",
        "max abs err (logits)",
        "p50 ms float32",
        "p50 ms int8-static",
    )
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print(
        f"\nload average {' '.join(f'{v:.2f}' for v in os.getloadavg())} on {os.cpu_count()} cores"
    )


if __name__ == "__main__":
    main()
