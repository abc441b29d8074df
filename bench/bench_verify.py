"""Benchmark: verifying a large bundle, memory and hashing throughput.

Builds a signed bundle around a 200 MB model file, then in fresh processes
measures (best of N runs, page cache warm for all):

* ``verify``  - device_agent.bundle.verify_file (signature, manifest, streamed sha256);
* ``install`` - device_agent.bundle.unpack_bundle into a slot directory;
* ``hashlib`` - plain hashlib.sha256 over the same file, read in 1 MiB chunks;
* ``hashlib (in memory)`` - hashlib.sha256 over the bytes already in memory.

Peak memory is the process's peak RSS after the run minus its RSS after the
imports (the interpreter's baseline). Prints a markdown table.

    python bench/bench_verify.py [--size-mb 200] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, resource, sys, time, hashlib, shutil
mode, bundle, trust_path, runs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
from device_agent.bundle import TrustStore, unpack_bundle, verify_file
trust = TrustStore.load(trust_path)
def rss_kb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0
base = rss_kb()
times = []
size = 0
for i in range(runs):
    t = time.perf_counter()
    if mode == "verify":
        v = verify_file(bundle, trust)
        size = v.manifest.total_size
    elif mode == "install":
        dest = bundle + ".slot"
        v = unpack_bundle(bundle, dest, trust)
        size = v.manifest.total_size
        shutil.rmtree(dest)
    elif mode == "hashlib":
        h = hashlib.sha256(); buf = bytearray(1 << 20); mv = memoryview(buf)
        with open(bundle, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                h.update(mv[:n]); size += n if i == 0 else 0
    elif mode == "hashlib-mem":
        if i == 0:
            data = open(bundle, "rb").read(); size = len(data)
            base = rss_kb()
        h = hashlib.sha256(data)
    times.append(time.perf_counter() - t)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"best_s": min(times), "bytes": size, "peak_above_base_mb": (peak - base) / 1024}))
"""


def make_bundle(workdir: Path, size_mb: int) -> tuple[Path, Path]:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from converters.bundle import BundleFile, build_manifest, pack_bundle, sign_bundle
    from device_agent.bundle import TrustStore

    model = workdir / "model.onnx"
    with open(model, "wb") as f:
        for _ in range(size_mb):
            f.write(os.urandom(1 << 20))
    files = [BundleFile(model, "model.onnx", "model")]
    manifest = build_manifest(name="big", version=1, fmt="onnx", files=files)
    bundle = pack_bundle(workdir / "big.efb", manifest, files)
    key = Ed25519PrivateKey.generate()
    sign_bundle(bundle, key)
    trust = TrustStore()
    trust.add(key.public_key())
    trust.save(workdir / "trust.json")
    model.unlink()
    return bundle, workdir / "trust.json"


def run(mode: str, bundle: Path, trust: Path, runs: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, mode, str(bundle), str(trust), str(runs)],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    return json.loads(out.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=200)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=ROOT) as tmp:
        bundle, trust = make_bundle(Path(tmp), args.size_mb)
        results = {
            m: run(m, bundle, trust, args.runs)
            for m in ("hashlib", "hashlib-mem", "verify", "install")
        }
    ref = results["hashlib"]["best_s"]
    print(f"bundle with a {args.size_mb} MB model, best of {args.runs} runs\n")
    print(
        "| operation | time (s) | throughput (MB/s) | time / hashlib "
        "| peak memory above baseline (MB) |"
    )
    print("|---|---:|---:|---:|---:|")
    labels = {
        "hashlib": "hashlib.sha256, file in 1 MiB chunks",
        "hashlib-mem": "hashlib.sha256, bytes in memory",
        "verify": "edgefleet verify_file",
        "install": "edgefleet unpack_bundle (verify + stage)",
    }
    for mode, r in results.items():
        mbps = r["bytes"] / r["best_s"] / 1e6
        mem = "n/a (data held)" if mode == "hashlib-mem" else f"{r['peak_above_base_mb']:.1f}"
        print(
            f"| {labels[mode]} | {r['best_s']:.3f} | {mbps:,.0f} | {r['best_s'] / ref:.2f}x "
            f"| {mem} |"
        )


if __name__ == "__main__":
    main()
