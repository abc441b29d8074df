"""Check-in throughput on the 304 path: 10,000 simulated devices against the real
server, and against a bare Starlette route on the same machine in the same run.

* ``bare starlette`` (the peer): one Starlette route that compares
  ``If-None-Match`` with a constant ETag and answers 304, no auth, no database;
* ``edgefleet server``: ``edgefleet server`` on a SQLite file holding 10,000
  enrolled devices (each with its own credential and its own assignment ETag);
  every request authenticates the device (HMAC of the credential, LRU cache) and
  answers 304 from the in-memory assignment cache.

Both run as one uvicorn process (same uvicorn, same flags, access log off) on a
free loopback port. The load generator is ``wrk`` with a Lua script that cycles
through the 10,000 (credential, ETag) pairs; without ``wrk`` a small asyncio
HTTP/1.1 keep-alive client does the same (slower, so it saturates less). Each
target is warmed up (every device checks in once, filling the caches), then
measured. Targets: >= 50 % of the bare route's requests/s, p99 < 50 ms.

    python bench/bench_checkin.py [--devices 10000] [--seconds 10] [--connections 16]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import insert  # noqa: E402

from fleet_server.assignments.document import build_assignment  # noqa: E402
from fleet_server.db.models import Assignment, Bundle, Device, Model  # noqa: E402
from fleet_server.db.session import make_engine, upgrade_database  # noqa: E402
from fleet_server.db.types import utcnow  # noqa: E402
from fleet_server.security import TokenHasher, new_secret  # noqa: E402

PATH = "/device/v1/assignment"
BARE_ETAG = '"' + "0" * 64 + '"'
PEPPER = "bench-pepper-" + "x" * 32


def bare_app() -> object:
    """The peer: a bare Starlette route with the same path and the same 304 logic."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    body = b'{"desired":null}'

    async def assignment(request: Request) -> Response:
        if request.headers.get("if-none-match") == BARE_ETAG:
            return Response(status_code=304, headers={"etag": BARE_ETAG})
        return Response(body, media_type="application/json", headers={"etag": BARE_ETAG})

    return Starlette(routes=[Route(PATH, assignment)])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def populate(db_url: str, n: int) -> list[tuple[str, str]]:
    """Enroll ``n`` devices straight into the database; returns (credential, ETag) pairs."""
    engine = make_engine(db_url)
    upgrade_database(engine)
    hasher = TokenHasher(PEPPER)
    now = utcnow()
    bundle = Bundle(
        id="b-bench",
        model_id="m-bench",
        name="bench",
        version=1,
        format="onnx",
        device_classes=[],
        file_path="/nonexistent",
        sha256="0" * 64,
        size=1,
        manifest={},
        signed_by=[],
        source="upload",
        uploaded_by="bench",
        created_at=now,
    )
    devices, assignments, pairs = [], [], []
    for i in range(n):
        device_id = f"dev-{i:05d}"
        cred = new_secret("efd_")
        doc = build_assignment(device_id, desired=bundle)
        devices.append(
            {
                "id": device_id,
                "device_class": "bench",
                "labels": {},
                "credential_hash": hasher.hash(cred),
                "enrolled_at": now,
                "health": "unknown",
                "health_details": {},
            }
        )
        assignments.append(
            {
                "device_id": device_id,
                "desired_bundle_id": "b-bench",
                "etag": doc["assignment_id"],
                "body": doc,
                "updated_at": now,
            }
        )
        pairs.append((cred, f'"{doc["assignment_id"]}"'))
    with engine.begin() as conn:
        conn.execute(
            insert(Model),
            [{"id": "m-bench", "name": "bench", "description": "", "created_at": now}],
        )
        conn.execute(
            insert(Bundle), [{c.name: getattr(bundle, c.name) for c in Bundle.__table__.columns}]
        )
        conn.execute(insert(Device), devices)
        conn.execute(insert(Assignment), assignments)
    engine.dispose()
    return pairs


def start(cmd: list[str], env: dict[str, str], port: int, log: Path) -> subprocess.Popen[bytes]:
    out = open(log, "wb")  # noqa: SIM115 - owned by the child
    proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[0]} exited:\n{log.read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"server on port {port} did not come up:\n{log.read_text()}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


WRK_SCRIPT = """
local pairs = {}
local i = 0
function init(args)
  for line in io.lines(os.getenv("BENCH_PAIRS")) do
    local tok, etag = line:match("([^ ]+) (.+)")
    pairs[#pairs + 1] = {tok, etag}
  end
  i = math.random(#pairs)
end
function request()
  i = i % #pairs + 1
  local p = pairs[i]
  return wrk.format("GET", "__PATH__", {["Authorization"] = "Bearer " .. p[1],
                                        ["If-None-Match"] = p[2]})
end
function done(summary, latency, requests)
  io.write(string.format("P99_US %d\\n", latency:percentile(99)))
end
"""


def run_wrk(
    url: str, pairs_file: Path, seconds: float, connections: int, threads: int
) -> tuple[float, float, int]:
    script = pairs_file.parent / "checkin.lua"
    script.write_text(WRK_SCRIPT.replace("__PATH__", PATH))
    env = {**os.environ, "BENCH_PAIRS": str(pairs_file)}
    out = subprocess.run(
        [
            "wrk",
            "-t",
            str(threads),
            "-c",
            str(connections),
            "-d",
            f"{max(1, round(seconds))}s",
            "-s",
            str(script),
            url,
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p99 = int(re.search(r"P99_US (\d+)", out).group(1)) / 1000  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return rps, p99, int(errors.group(1)) if errors else 0


async def _client(
    host: str,
    port: int,
    pairs: list[tuple[str, str]],
    start_at: int,
    deadline: float,
    latencies: list[float],
    bad: list[int],
    step: int = 1,
    stop_at: int | None = None,
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    i = start_at
    while time.perf_counter() < deadline and (stop_at is None or i < stop_at):
        tok, etag = pairs[i % len(pairs)]
        i += step
        t0 = time.perf_counter()
        writer.write(
            f"GET {PATH} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {tok}\r\n"
            f"If-None-Match: {etag}\r\n\r\n".encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        m = re.search(rb"(?i)content-length:\s*(\d+)", head)
        if m and int(m.group(1)):
            await reader.readexactly(int(m.group(1)))
        latencies.append(time.perf_counter() - t0)
        if not head.startswith(b"HTTP/1.1 304"):
            bad[0] += 1
    writer.close()


def warm_up(url: str, pairs: list[tuple[str, str]], connections: int) -> float:
    """Every device checks in exactly once (fills the credential and assignment caches)."""
    host, port = url.split("//")[1].split(":")
    latencies: list[float] = []
    bad = [0]

    async def main() -> None:
        deadline = time.perf_counter() + 600
        await asyncio.gather(
            *(
                _client(
                    host,
                    int(port),
                    pairs,
                    k,
                    deadline,
                    latencies,
                    bad,
                    step=connections,
                    stop_at=len(pairs),
                )
                for k in range(connections)
            )
        )

    t0 = time.perf_counter()
    asyncio.run(main())
    return time.perf_counter() - t0


def run_asyncio(
    url: str, pairs: list[tuple[str, str]], seconds: float, connections: int
) -> tuple[float, float, int]:
    host, port = url.split("//")[1].split(":")
    latencies: list[float] = []
    bad = [0]

    async def main() -> None:
        deadline = time.perf_counter() + seconds
        await asyncio.gather(
            *(
                _client(host, int(port), pairs, k * 997, deadline, latencies, bad)
                for k in range(connections)
            )
        )

    t0 = time.perf_counter()
    asyncio.run(main())
    elapsed = time.perf_counter() - t0
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99)] * 1000 if latencies else float("nan")
    return len(latencies) / elapsed, p99, bad[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="wrk threads")
    ap.add_argument("--no-wrk", action="store_true", help="use the asyncio load generator")
    args = ap.parse_args()
    use_wrk = shutil.which("wrk") is not None and not args.no_wrk

    with tempfile.TemporaryDirectory(prefix="bench-checkin-") as tmp_s:
        tmp = Path(tmp_s)
        db_url = f"sqlite:///{tmp / 'server.db'}"
        t0 = time.perf_counter()
        pairs = populate(db_url, args.devices)
        print(
            f"{args.devices} devices enrolled in {time.perf_counter() - t0:.1f} s; "
            f"load generator: {'wrk' if use_wrk else 'asyncio'}, "
            f"{args.connections} connections, {args.seconds:.0f} s per target"
        )
        pairs_file = tmp / "pairs.txt"
        pairs_file.write_text("".join(f"{t} {e}\n" for t, e in pairs))
        base_env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
        root = str(Path(__file__).resolve().parents[1])
        base_env["PYTHONPATH"] = root + os.pathsep + base_env.get("PYTHONPATH", "")
        results = []
        for name in ("bare starlette", "edgefleet server"):
            port = free_port()
            if name == "bare starlette":
                cmd = [
                    sys.executable,
                    "-m",
                    "uvicorn",
                    "--factory",
                    "bench_checkin:bare_app",
                    "--app-dir",
                    str(Path(__file__).parent),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--log-level",
                    "warning",
                    "--no-access-log",
                ]
                env = base_env
                bench_pairs = [(t, BARE_ETAG) for t, _ in pairs]
            else:
                cmd = [
                    sys.executable,
                    "-c",
                    "from fleet_server.cli import main; main()",
                    "server",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--log-level",
                    "warning",
                ]
                env = {
                    **base_env,
                    "EDGEFLEET_SERVER_DATABASE_URL": db_url,
                    "EDGEFLEET_SERVER_TOKEN_PEPPER": PEPPER,
                    "EDGEFLEET_SERVER_BUNDLE_DIR": str(tmp / "bundles"),
                    "EDGEFLEET_SERVER_RUN_SCHEDULER": "false",
                    "EDGEFLEET_SERVER_DASHBOARD": "false",
                }
                bench_pairs = pairs
            proc = start(cmd, env, port, tmp / f"{port}.log")
            url = f"http://127.0.0.1:{port}"
            try:
                warm = warm_up(url, bench_pairs, args.connections)
                print(f"{name}: every device checked in once in {warm:.1f} s (warm-up)")
                if use_wrk:
                    run_file = tmp / f"pairs-{port}.txt"
                    run_file.write_text("".join(f"{t} {e}\n" for t, e in bench_pairs))
                    rps, p99, bad = run_wrk(
                        url + PATH, run_file, args.seconds, args.connections, args.threads
                    )
                else:
                    rps, p99, bad = run_asyncio(url, bench_pairs, args.seconds, args.connections)
            finally:
                stop(proc)
            results.append((name, rps, p99, bad))
    peer = results[0][1]
    print(f"\n{'target':<20}{'req/s':>10}{'p99 ms':>10}{'vs peer':>10}{'non-304':>10}")
    for name, rps, p99, bad in results:
        print(f"{name:<20}{rps:>10,.0f}{p99:>10.1f}{rps / peer:>10.0%}{bad:>10}")
    print("target: edgefleet server >= 50% of the bare route's req/s, p99 < 50 ms")


if __name__ == "__main__":
    main()
