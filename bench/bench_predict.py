"""Per-call cost of ``Agent.predict()`` with telemetry on, against the raw runtime.

One run, side by side, on the same loaded model (same session, same options):

* ``raw run``      - ``InferenceSession.run(None, feed)`` (TFLite: ``set_tensor``,
  ``invoke``, ``get_tensor``), what an application would call without edgefleet;
* ``run_with_ort_values`` / ``io_binding`` - onnxruntime's other public calls
  (OrtValue in and out; a reused I/O binding), measured against ``raw run`` to
  choose the agent's path;
* ``fast runner``  - the backend's ``fast_runner()``, what ``predict()`` calls
  (onnxruntime: the native session's run; TFLite: the native interpreter's
  set/invoke/get), the pure cost of inference without Python-side checks;
* ``predict()``    - ``Agent.predict`` with telemetry on: 1 % stratified
  sampling, drift summaries against a real reference profile, the worker
  thread running and writing to a real SQLite :class:`TelemetryStore`.

Variants run in alternating blocks (the order rotates each round) so drift in
machine load hits them equally; each call is timed with ``perf_counter_ns``.
Overhead is predict()'s median minus the peer's median.

    python bench/bench_predict.py [--calls 20000] [--rounds 20]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from device_agent.agent import Agent  # noqa: E402
from device_agent.bundle import TrustStore  # noqa: E402
from device_agent.config import AgentConfig  # noqa: E402
from device_agent.model import LoadedModel  # noqa: E402
from device_agent.store import TelemetryStore  # noqa: E402
from tests.agent_models import cnn_onnx, install, make_bundle, make_profile, mlp_onnx  # noqa: E402


def timed(fn: Callable[[], object], n: int) -> list[int]:
    pc = time.perf_counter_ns
    out = [0] * n
    for i in range(n):
        t = pc()
        fn()
        out[i] = pc() - t
    return out


def run_side_by_side(
    variants: dict[str, Callable[[], object]], calls: int, rounds: int
) -> dict[str, list[int]]:
    names = list(variants)
    times: dict[str, list[int]] = {n: [] for n in names}
    for fn in variants.values():  # warm up
        timed(fn, 200)
    per_block = max(1, calls // rounds)
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            times[n].extend(timed(variants[n], per_block))
    return times


def p(values: list[int], q: float) -> float:
    return float(np.percentile(np.asarray(values, np.float64), q)) / 1000.0


def model_for(
    tmp: Path, key: Ed25519PrivateKey, trust: TrustStore, kind: str, fmt: str
) -> tuple[LoadedModel, np.ndarray]:
    rng = np.random.default_rng(1)
    if kind == "mlp":
        data = mlp_onnx(0)
        ref = rng.normal(size=(512, 16)).astype(np.float32)
        x = rng.normal(size=(1, 16)).astype(np.float32)
        reduction = "none"
    else:
        data = cnn_onnx(0)
        ref = rng.normal(size=(128, 3, 32, 32)).astype(np.float32)
        x = rng.normal(size=(1, 3, 32, 32)).astype(np.float32)
        reduction = "channel_values"
    import onnxruntime as ort

    preds = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"x": ref})[0]
    if reduction == "channel_values":  # one drift feature per image channel, as converted
        from converters.reference import drift_profile

        profile = drift_profile("x", ref, "probs", preds, "classification")
    else:
        profile = make_profile(ref, preds, reduction=reduction)
    if fmt == "tflite":
        import onnx

        from converters.tflite import onnx_to_tflite

        data = onnx_to_tflite(onnx.load_from_string(data))
    bundle = make_bundle(tmp, key, model_bytes=data, fmt=fmt, name=f"{kind}-{fmt}", profile=profile)
    return install(bundle, tmp / f"slot-{kind}-{fmt}", trust, "a"), x


def raw_variants(model: LoadedModel, x: np.ndarray) -> dict[str, Callable[[], object]]:
    """The application's own calls to the runtime, and the backend's fast runner."""
    backend = model.backend
    fast = backend.fast_runner()
    feed = {backend.input_names[0]: x}
    variants: dict[str, Callable[[], object]] = {}
    if model.manifest.format == "onnx":
        import onnxruntime as ort

        sess = backend.session  # type: ignore[attr-defined]
        names = list(backend.output_names)
        (in_name,) = backend.input_names

        def ort_values() -> object:
            value = ort.OrtValue.ortvalue_from_numpy(x)
            return [v.numpy() for v in sess.run_with_ort_values(names, {in_name: value})]

        binding = sess.io_binding()

        def io_binding() -> object:
            binding.bind_cpu_input(in_name, x)
            for n in names:
                binding.bind_output(n)
            sess.run_with_iobinding(binding)
            return binding.copy_outputs_to_cpu()

        variants["raw run"] = lambda: sess.run(None, feed)
        variants["run_with_ort_values"] = ort_values
        variants["io_binding"] = io_binding
    else:
        interp = backend.interp  # type: ignore[attr-defined]
        i_idx = interp.get_input_details()[0]["index"]
        o_idx = interp.get_output_details()[0]["index"]

        def invoke() -> object:
            interp.set_tensor(i_idx, x)
            interp.invoke()
            return interp.get_tensor(o_idx)  # already a copy

        variants["raw invoke"] = invoke
    variants[f"fast runner ({backend.fast_path})"] = lambda: fast(feed)
    return variants


def predict_variant(agent: Agent, x: np.ndarray) -> Callable[[], object]:
    """A closure like the raw variants' lambdas, so call overhead is the same."""
    return lambda: agent.predict(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=20000, help="timed calls per variant")
    ap.add_argument("--rounds", type=int, default=20, help="alternating blocks")
    ap.add_argument("--no-tflite", action="store_true", help="skip the TFLite rows")
    args = ap.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        key = Ed25519PrivateKey.generate()
        trust = TrustStore()
        trust.add(key.public_key(), comment="bench")
        cases = [("mlp", "onnx"), ("cnn", "onnx")]
        if not args.no_tflite:
            cases += [("mlp", "tflite"), ("cnn", "tflite")]
        for kind, fmt in cases:
            model, x = model_for(tmp, key, trust, kind, fmt)
            cfg = AgentConfig()
            cfg.telemetry.sample_rate = 0.01
            cfg.telemetry.window_seconds = 60.0
            cfg.telemetry.flush_interval_seconds = 1.0
            store = TelemetryStore(tmp / f"telemetry-{kind}-{fmt}.db", max_bytes=16 << 20)
            agent = Agent(cfg, store, model=model)
            variants = raw_variants(model, x)
            variants["predict()"] = predict_variant(agent, x)
            calls = args.calls if kind == "mlp" else max(2000, args.calls // 10)
            times = run_side_by_side(variants, calls, args.rounds)
            agent.close()
            st = store.stats()
            store.close()
            pm = p(times["predict()"], 50)
            for name, t in times.items():
                if name == "predict()":
                    continue
                base = p(t, 50)
                rows.append(
                    (
                        f"{kind} ({fmt})",
                        name,
                        base,
                        p(t, 99),
                        pm,
                        p(times["predict()"], 99),
                        pm - base,
                        (pm - base) / base * 100,
                    )
                )
            print(
                f"# {kind} ({fmt}): {len(times['predict()'])} calls per variant; store rows "
                f"{st['rows']}",
                file=sys.stderr,
            )

    print(
        "| model | peer | peer median us | peer p99 us | predict() median us | "
        "predict() p99 us | overhead us | overhead % |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r[0]} | {r[1]} | {r[2]:.2f} | {r[3]:.2f} | {r[4]:.2f} | {r[5]:.2f} | "
            f"{r[6]:+.2f} | {r[7]:+.1f} |"
        )
    print(f"\npython {sys.version.split()[0]}, numpy {np.__version__}")


if __name__ == "__main__":
    main()
