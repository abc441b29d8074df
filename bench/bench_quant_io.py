"""Per-call cost of serving a model with int8 inputs and outputs as float (device_agent.quant_io).

The MLP of ``bench/bench_predict.py`` (16-64-64-4, softmax) is converted to full-integer
int8 TFLite with int8 I/O, packed into a signed bundle whose manifest records the I/O
scale and zero point, installed and loaded as a device does. Side by side, on the same
interpreter, alternating blocks, median per call in microseconds:

* ``fast runner, int8 in/out`` - the backend's native runner fed int8 (what an app that
  quantizes by itself would pay; the peer);
* ``model runner, float in``   - the agent's runner: quantize on feed, dequantize outputs;
* ``model runner, int8 in``    - the agent's runner given int8 (passed as is), dequantized out;
* ``predict(), float in``      - ``Agent.predict`` with telemetry on (no store).

    python bench/bench_quant_io.py [--calls 20000] [--rounds 20]
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

from converters.bundle import BundleFile, build_manifest, pack_bundle, sign_bundle  # noqa: E402
from converters.introspect import tflite_signature  # noqa: E402
from converters.tflite.quantize_full import onnx_to_tflite_int8_full  # noqa: E402
from device_agent.agent import Agent  # noqa: E402
from device_agent.bundle import TrustStore, unpack_bundle  # noqa: E402
from device_agent.config import AgentConfig  # noqa: E402
from device_agent.model import LoadedModel, load_model  # noqa: E402
from tests.agent_models import mlp_onnx  # noqa: E402


def build(root: Path) -> LoadedModel:
    import onnx

    model = onnx.load_from_string(mlp_onnx(0))
    calib = np.random.default_rng(0).normal(size=(200, 16)).astype(np.float32)
    data, _ = onnx_to_tflite_int8_full(model, calib, int8_io=True)
    (root / "model.tflite").write_bytes(data)
    files = [BundleFile(root / "model.tflite", "model.tflite", "model")]
    inputs, outputs, runtime = tflite_signature(root / "model.tflite")
    manifest = build_manifest(
        name="mlp8",
        version=1,
        fmt="tflite",
        files=files,
        inputs=inputs,
        outputs=outputs,
        runtime=runtime,
    )
    key = Ed25519PrivateKey.generate()
    trust = TrustStore()
    trust.add(key.public_key())
    out = pack_bundle(root / "mlp8.efb", manifest, files)
    sign_bundle(out, key)
    unpack_bundle(out, root / "slot", trust)
    return load_model(root / "slot", "a")


def timed(fn: Callable[[], object], calls: int) -> list[int]:
    ns = time.perf_counter_ns
    out = []
    for _ in range(calls):
        t0 = ns()
        fn()
        out.append(ns() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=20000, help="timed calls per variant")
    ap.add_argument("--rounds", type=int, default=20, help="alternating blocks")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = build(Path(tmp))
        assert model.io is not None
        q = model.io.inputs[model.backend.input_names[0]]
        x = np.random.default_rng(1).normal(size=(1, 16)).astype(np.float32)
        x8 = q.quantize(x)
        name = model.backend.input_names[0]
        native = model.backend.fast_runner()
        wrapped = model.fast_runner()
        agent = Agent(AgentConfig(), None, model=model)
        variants: dict[str, Callable[[], object]] = {
            "fast runner, int8 in/out (peer)": lambda: native({name: x8}),
            "model runner, float in": lambda: wrapped({name: x}),
            "model runner, int8 in": lambda: wrapped({name: x8}),
            "predict(), float in": lambda: agent.predict(x),
        }
        for fn in variants.values():
            timed(fn, 500)
        samples: dict[str, list[int]] = {k: [] for k in variants}
        keys = list(variants)
        per = max(1, args.calls // args.rounds)
        for r in range(args.rounds):
            for k in keys[r % len(keys) :] + keys[: r % len(keys)]:
                samples[k].extend(timed(variants[k], per))
        agent.close()
    peer = float(np.median(samples[keys[0]])) / 1000
    print(f"# mlp int8 I/O (tflite): {per * args.rounds} calls per variant")
    print("| variant | median us | p99 us | vs peer us |")
    print("|---|---:|---:|---:|")
    for k in keys:
        v = np.asarray(samples[k]) / 1000
        med = float(np.median(v))
        print(f"| {k} | {med:.2f} | {np.percentile(v, 99):.2f} | {med - peer:+.2f} |")


if __name__ == "__main__":
    main()
