"""Benchmark: the architecture zoo on each target, side by side in one run.

For every architecture of ``tests/converters/zoo/architectures.py`` (random weights)
and each target (``onnx:float32`` on onnxruntime, ``tflite:float32`` on ai-edge-litert),
and for the architectures trained in ``tests/converters/zoo/trained.py`` (zoo widths)
and ``tests/converters/zoo/wide.py`` (widths where weights dominate, and the recurrent
keyword spotters) also ``tflite:int8-full`` next to ``tflite:float32``, it measures:

* ``KiB``: artifact size, and for int8-full the share of its bytes that are int8
  weights, quantization parameters (scale + zero point vectors), int32 biases and
  flatbuffer tables (``converters.tflite.size_report``);
* parity on held-out inputs run one at a time: max abs error against torch (float
  targets), top-1 agreement with the float32 TFLite model and held-out accuracy
  (int8-full);
* ``p50 ms``: median batch-1 latency over ``--runs`` invocations, one thread, the
  artifact in its own runtime (onnxruntime 1 intra-op thread; ai-edge-litert with its
  default XNNPACK delegate, 1 thread).

Prints two markdown tables. Figures from a shared machine are indicative only:

    python bench/bench_models.py [--runs 50] [--models resnet18,vit_tiny] [--no-int8]
        [--no-float] [--trained mlp,resnet18]
"""

from __future__ import annotations

import argparse
import io
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def export(module: Any, x: np.ndarray) -> Any:
    import onnx
    import torch

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (torch.from_numpy(x[:2]),),
            buf,
            dynamo=False,
            opset_version=18,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
        )
    return onnx.load_from_string(buf.getvalue())


class OrtRunner:
    def __init__(self, data: bytes) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        self.session = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.session.run(None, {"x": x})[0])


class LiteRunner:
    def __init__(self, data: bytes) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.interp = Interpreter(model_content=data, num_threads=1)
        self.interp.allocate_tensors()
        self.i = self.interp.get_input_details()[0]["index"]
        self.o = self.interp.get_output_details()[0]["index"]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.interp.set_tensor(self.i, x)
        self.interp.invoke()
        return self.interp.get_tensor(self.o).copy()


def one_by_one(run: Any, x: np.ndarray) -> np.ndarray:
    return np.concatenate([run(x[k : k + 1]) for k in range(len(x))])


def p50_ms(run: Any, x: np.ndarray, runs: int) -> float:
    one = x[:1]
    for _ in range(3):
        run(one)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        run(one)
        times.append(time.perf_counter() - t)
    return 1000 * float(np.median(times))


def float_table(names: list[str], runs: int) -> str:
    import torch

    from converters.pipeline import convert
    from converters.source import from_onnx
    from converters.targets import parse_target
    from tests.converters.zoo.architectures import ARCHITECTURES, held_out

    lines = [
        "| architecture | target | KiB | max abs err vs torch (held out, batch 1) | "
        "p50 ms onnxruntime | p50 ms ai-edge-litert |",
        "|---|---|---|---|---|---|",
    ]
    for name in names:
        module, x = ARCHITECTURES[name]()
        model = export(module, x)
        held = held_out(x, 8)
        with torch.no_grad():
            want = module(torch.from_numpy(held)).numpy()
        for target, runner in (("onnx:float32", OrtRunner), ("tflite:float32", LiteRunner)):
            artifact = convert(
                from_onnx(model),
                parse_target(target),
                samples={"x": held_out(x, 8, seed=7)},
                validation_samples={"x": held},
            )
            run = runner(artifact.data)
            err = float(np.abs(one_by_one(run, held) - want).max())
            ms = p50_ms(run, held, runs)
            ort_ms, lite_ms = (f"{ms:.3f}", "") if runner is OrtRunner else ("", f"{ms:.3f}")
            lines.append(
                f"| {name} | {target} | {len(artifact.data) / 1024:.1f} | {err:.2e} | "
                f"{ort_ms} | {lite_ms} |"
            )
            print(lines[-1], file=sys.stderr, flush=True)
    return "\n".join(lines)


def _trained(names: list[str] | None) -> list[tuple[str, str, Any]]:
    """(name, width label, trainer) of every trained model, zoo widths first."""
    from tests.converters.zoo.trained import TRAINED, train
    from tests.converters.zoo.wide import RECURRENT, WIDE, train_wide

    rows = [(n, "zoo", train) for n in TRAINED]
    rows += [(n, "wide", train_wide) for n in WIDE if n not in TRAINED]
    rows += [(n, "zoo", train_wide) for n in RECURRENT]
    return [r for r in rows if names is None or r[0] in names]


def _share(part: int, total: int) -> str:
    return f"{100 * part / total:.0f} %"


def int8_table(runs: int, names: list[str] | None = None) -> str:
    """Float32 against int8-full TFLite on every trained model, in one run: size and
    what the int8 file's bytes are, held-out accuracy and agreement, p50 batch-1
    latency of both on ai-edge-litert (and of the ONNX float32 model on onnxruntime)."""
    from converters.tflite import onnx_to_tflite
    from converters.tflite.quantize_full import onnx_to_tflite_int8_full
    from converters.tflite.size_report import size_breakdown

    lines = [
        "| trained model | width | float32 KiB | int8-full KiB | ratio | int8 file: weights / "
        "quant. params / biases / tables | float ops left | float32 acc | int8 acc | "
        "top-1 agreement | p50 ms float32 | p50 ms int8-full | p50 ms onnxruntime float32 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, width, trainer in _trained(names):
        module, data = trainer(name)
        model = export(module, data.train_x)
        f32 = onnx_to_tflite(model)
        q, report = onnx_to_tflite_int8_full(model, data.train_x[:200])
        size = size_breakdown(q)
        parts = " / ".join(
            _share(n, size.total)
            for n in (
                sum(size.weights.values()),
                sum(size.quantization.values()),
                sum(size.biases.values()),
                size.rest,
            )
        )
        floats = ", ".join(sorted(set(report.float_operators))) or "none"
        rf, rq = LiteRunner(f32), LiteRunner(q)
        pf, pq = one_by_one(rf, data.test_x), one_by_one(rq, data.test_x)
        ort = OrtRunner(model.SerializeToString())
        lines.append(
            f"| {name} | {width} | {len(f32) / 1024:.1f} | {len(q) / 1024:.1f} | "
            f"{len(q) / len(f32):.3f} | {parts} | {floats} | "
            f"{(pf.argmax(1) == data.test_y).mean():.3f} | "
            f"{(pq.argmax(1) == data.test_y).mean():.3f} | "
            f"{(pf.argmax(1) == pq.argmax(1)).mean():.4f} | "
            f"{p50_ms(rf, data.test_x, runs):.3f} | {p50_ms(rq, data.test_x, runs):.3f} | "
            f"{p50_ms(ort, data.test_x, runs):.3f} |"
        )
        print(lines[-1], file=sys.stderr, flush=True)
    return "\n".join(lines)


def main() -> None:
    from tests.converters.zoo.architectures import ARCHITECTURES

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--models", default=",".join(ARCHITECTURES))
    parser.add_argument("--no-int8", action="store_true")
    parser.add_argument("--no-float", action="store_true", help="only the int8-full table")
    parser.add_argument("--trained", default=None, help="trained models (default: all)")
    args = parser.parse_args()
    started = time.perf_counter()
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else []
    if not args.no_float:
        print(float_table(args.models.split(","), args.runs))
    if not args.no_int8:
        print()
        print(int8_table(args.runs, args.trained.split(",") if args.trained else None))
    end_load = Path("/proc/loadavg").read_text().split()[:3] if load else []
    print(
        f"\n({time.perf_counter() - started:.0f} s; load average {' '.join(load)} at the "
        f"start, {' '.join(end_load)} at the end)"
    )


if __name__ == "__main__":
    main()
