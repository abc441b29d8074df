"""The local inference endpoint next to in-process ``predict()``, and the agent's CPU share.

One run, for the MLP and the CNN at batch 1 (onnxruntime, one intra-op thread):

1. **Latency and throughput**, closed loop, one caller:
   * ``predict()`` in the agent's process (telemetry on, as ``bench_predict.py``);
   * through the endpoint with :class:`device_agent.serving.client.ServingClient`
     over the Unix socket (binary tensors), from a separate client process;
   * through the endpoint with the unmodified ``tritonclient.http`` over TCP (binary
     tensors), from a separate client process.
   The agent is a full :class:`~device_agent.daemon.AgentDaemon` (what
   ``edgefleet-agent run`` runs): update loop, telemetry worker writing to SQLite,
   reporter publishing to a real Mosquitto broker over MQTT, and the endpoint.

2. **CPU share** at a paced 100 and 1,000 predictions/s for ``--seconds`` each:
   per-thread CPU time (``pthread_getcpuclockid``) of the agent's process. The
   model's own CPU is the caller's CPU when it paces the backend's fast runner
   alone (this includes the pacing loop's sleeps and a cache-cold model after
   each, so it is well above the warm per-call latency times the rate);
   ``predict()`` overhead is the caller's extra CPU when it paces
   ``predict()`` instead; the agent's background threads (telemetry worker and
   store, reporter and MQTT, update loop, endpoint) are measured directly. A
   third pass sends the same rate through the endpoint from a client process:
   there the model runs on the endpoint's handler thread, and the row shows the
   agent process's whole CPU. Telemetry windows are ``--window`` seconds (default
   5, twelve times more summaries than the default 60 s) so window closes and
   uploads fall inside the measurement.

    python bench/bench_serving.py [--requests 3000] [--seconds 10] [--no-mqtt]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from device_agent.bundle import TrustStore  # noqa: E402
from device_agent.config import AgentConfig  # noqa: E402
from device_agent.daemon import AgentDaemon  # noqa: E402
from tests.agent_models import cnn_onnx, make_bundle, mlp_onnx  # noqa: E402

CLIENT = r"""
import json, sys, time
import numpy as np
mode, address, token, model, shape, n, rate = sys.argv[1:8]
shape = [int(s) for s in shape.split(",")]
n, rate = int(n), float(rate)
x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
if mode == "client":
    from device_agent.serving.client import ServingClient
    c = ServingClient(address)
    call = lambda: c.predict(x)
else:
    import tritonclient.http as triton
    c = triton.InferenceServerClient(f"127.0.0.1:{address}")
    headers = {"Authorization": f"Bearer {token}"}
    inp = triton.InferInput("x", shape, "FP32")
    inp.set_data_from_numpy(x)
    out = [triton.InferRequestedOutput("probs")]
    call = lambda: c.infer(model, [inp], outputs=out, headers=headers).as_numpy("probs")
for _ in range(100):
    call()
pc = time.perf_counter_ns
lat = []
start = time.perf_counter()
if rate > 0:
    period = 1.0 / rate
    for i in range(n):
        due = start + i * period
        wait = due - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        t = pc(); call(); lat.append(pc() - t)
else:
    for i in range(n):
        t = pc(); call(); lat.append(pc() - t)
elapsed = time.perf_counter() - start
print(json.dumps({"n": n, "elapsed": elapsed, "lat": lat}))
"""

MODELS = {
    "mlp": (lambda: mlp_onnx(0), [1, 16]),
    "cnn": (lambda: cnn_onnx(0), [1, 3, 32, 32]),
}


def pct(values: list[int], q: float) -> float:
    return float(np.percentile(np.asarray(values, np.float64), q)) / 1000.0


class Device:
    """A full agent daemon in this process, serving one model."""

    def __init__(self, root: Path, kind: str, mqtt: Any, window: float) -> None:
        key = Ed25519PrivateKey.generate()
        trust = TrustStore()
        trust.add(key.public_key(), comment="bench")
        trust_file = root / "trust.json"
        trust.save(trust_file)
        from tests.brokers import free_port

        self.port = free_port()
        cfg: dict[str, Any] = {
            "device": {
                "id": f"bench-{kind}",
                "state_dir": str(root / "state"),
                "trust_store": str(trust_file),
            },
            "telemetry": {
                "window_seconds": window,
                "sample_rate": 0.01,
                "flush_interval_seconds": 1.0,
            },
            "serving": {"tcp_port": self.port},
        }
        if mqtt is not None:
            cfg["mqtt"] = {"host": mqtt.host, "port": mqtt.port}
        self.config = AgentConfig.from_dict(cfg)
        self.daemon = AgentDaemon(self.config)
        data, self.shape = MODELS[kind][0](), MODELS[kind][1]
        bundle = make_bundle(root, key, model_bytes=data, name=kind)
        self.daemon.updater.install_file(bundle, probation=False)
        self.daemon.start()
        deadline = time.monotonic() + 30
        while self.daemon.serving is None or self.daemon.agent.model is None:
            if time.monotonic() > deadline:
                raise RuntimeError("the daemon did not start serving")
            time.sleep(0.05)
        self.socket = str(self.daemon.serving.socket_path)
        self.token = Path(self.daemon.serving.token_path).read_text().strip()
        self.x = np.random.default_rng(0).normal(size=self.shape).astype(np.float32)

    def client(self, mode: str, n: int, rate: float = 0.0) -> dict[str, Any]:
        address = self.socket if mode == "client" else str(self.port)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                CLIENT,
                mode,
                address,
                self.token,
                self.daemon.agent.model.name,  # type: ignore[union-attr]
                ",".join(map(str, self.shape)),
                str(n),
                str(rate),
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
        if out.returncode != 0:
            raise RuntimeError(out.stderr[-2000:])
        return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]

    def stop(self) -> None:
        self.daemon.stop()
        self.daemon.join(30)


def closed_loop(fn: Callable[[], object], n: int) -> tuple[list[int], float]:
    for _ in range(100):
        fn()
    pc = time.perf_counter_ns
    lat = [0] * n
    start = time.perf_counter()
    for i in range(n):
        t = pc()
        fn()
        lat[i] = pc() - t
    return lat, time.perf_counter() - start


def paced(fn: Callable[[], object], rate: float, seconds: float) -> None:
    period = 1.0 / rate
    start = time.perf_counter()
    for i in range(int(rate * seconds)):
        wait = start + i * period - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        fn()


def thread_cpu() -> dict[str, float]:
    """CPU seconds of every live thread of this process, by thread name."""
    out: dict[str, float] = {}
    for t in threading.enumerate():
        if t.ident is None:
            continue
        try:
            clock = time.pthread_getcpuclockid(t.ident)
            out[f"{t.name}#{t.ident}"] = time.clock_gettime(clock)
        except (OSError, ProcessLookupError):
            continue
    return out


def group(name: str) -> str:
    base = name.split("#")[0]
    if base == "MainThread":
        return "caller"
    if base == "edgefleet-telemetry":
        return "telemetry worker + store"
    if base in ("reporter", "notify") or base.startswith("paho") or "mqtt" in base.lower():
        return "reporter + MQTT"
    if base == "edgefleet-agent":
        return "update loop"
    if base == "edgefleet-serving" or base.startswith("Thread-"):
        return "endpoint"
    return "other"


def measure(fn: Callable[[], None]) -> tuple[dict[str, float], float, float]:
    """Run ``fn``; CPU seconds per thread group, the process's CPU seconds, wall seconds."""
    before, p0, w0 = thread_cpu(), time.process_time(), time.perf_counter()
    fn()
    after, p1, w1 = thread_cpu(), time.process_time(), time.perf_counter()
    groups: dict[str, float] = {}
    for k, v in after.items():
        groups[group(k)] = groups.get(group(k), 0.0) + v - before.get(k, 0.0)
    return groups, p1 - p0, w1 - w0


def cpu_share(dev: Device, kind: str, rate: int, seconds: float) -> list[Any]:
    """Rows of CPU use (% of one core) at ``rate`` predictions/s, by where it is spent."""
    agent = dev.daemon.agent
    raw = agent.model.backend.fast_runner()  # type: ignore[union-attr]
    feed, x = {"x": dev.x}, dev.x
    g_raw, _, wall = measure(lambda: paced(lambda: raw(feed), rate, seconds))
    model_cpu = g_raw.get("caller", 0.0) / wall
    g, _, wall2 = measure(lambda: paced(lambda: agent.predict(x), rate, seconds))
    rows: list[Any] = [
        (kind, rate, "caller running the model alone (runtime + pacing loop)", 100.0 * model_cpu),
        (
            kind,
            rate,
            "predict() overhead on the caller",
            100.0 * (g.get("caller", 0.0) / wall2 - model_cpu),
        ),
    ]
    own = 0.0
    for name in ("telemetry worker + store", "reporter + MQTT", "update loop", "endpoint", "other"):
        if name in g:
            rows.append((kind, rate, f"  {name}", 100.0 * g[name] / wall2))
            own += g[name]
    rows.append((kind, rate, "agent's background threads, total", 100.0 * own / wall2))
    result: dict[str, Any] = {}

    def through_endpoint() -> None:
        result.update(dev.client("client", int(rate * seconds), rate))

    g_ep, proc_cpu, wall3 = measure(through_endpoint)
    achieved = result["n"] / result["elapsed"]
    rows.append(
        (
            kind,
            rate,
            f"through the endpoint ({achieved:,.0f}/s achieved): agent "
            "process total, model included",
            100.0 * (proc_cpu - g_ep.get("caller", 0.0)) / wall3,
        )
    )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=3000, help="closed-loop calls per row")
    ap.add_argument("--seconds", type=float, default=10.0, help="length of each paced pass")
    ap.add_argument("--window", type=float, default=5.0, help="telemetry window seconds")
    ap.add_argument("--no-mqtt", action="store_true", help="no broker (reporter off)")
    args = ap.parse_args()

    latency_rows: list[tuple[str, str, float, float, float]] = []
    cpu_rows: list[tuple[str, int, str, float]] = []
    with tempfile.TemporaryDirectory(prefix="bs-", dir="/tmp") as d:
        tmp = Path(d)
        broker = None
        if not args.no_mqtt:
            from tests.brokers import MosquittoBroker

            broker = MosquittoBroker(tmp / "broker").start()
        try:
            for kind in MODELS:
                dev = Device(tmp / kind, kind, broker, args.window)
                agent = dev.daemon.agent
                try:
                    n = args.requests if kind == "mlp" else max(500, args.requests // 3)
                    x = dev.x
                    lat, el = closed_loop(lambda: agent.predict(x), n)  # noqa: B023
                    latency_rows.append(
                        (kind, "predict() in process", n / el, pct(lat, 50), pct(lat, 99))
                    )
                    for mode, label in (
                        ("client", "endpoint, ServingClient, Unix socket"),
                        ("triton", "endpoint, tritonclient, TCP"),
                    ):
                        r = dev.client(mode, n)
                        latency_rows.append(
                            (
                                kind,
                                label,
                                r["n"] / r["elapsed"],
                                pct(r["lat"], 50),
                                pct(r["lat"], 99),
                            )
                        )
                    for rate in (100, 1000):
                        cpu_rows += cpu_share(dev, kind, rate, args.seconds)
                finally:
                    dev.stop()
        finally:
            if broker is not None:
                broker.stop()

    print("| model | caller | requests/s | p50 us | p99 us |")
    print("|---|---|---:|---:|---:|")
    for kind, label, rps, p50, p99 in latency_rows:
        print(f"| {kind} | {label} | {rps:,.0f} | {p50:.1f} | {p99:.1f} |")
    print()
    print("| model | predictions/s | where | % of one core |")
    print("|---|---:|---|---:|")
    for kind, rate, name, value in cpu_rows:
        print(f"| {kind} | {rate:,} | {name} | {value:.2f} |")
    load = os.getloadavg()
    print(
        f"\npython {sys.version.split()[0]}, numpy {np.__version__}, {os.cpu_count()} CPUs, "
        f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at the end; MQTT "
        f"{'off' if args.no_mqtt else 'to a local Mosquitto'}"
    )


if __name__ == "__main__":
    main()
