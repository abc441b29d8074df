"""Fleet scale: N simulated devices against one ``edgefleet server`` on PostgreSQL and
Mosquitto, with a staged rollout through the whole fleet while the load runs.

Per fleet size N (``--devices 1000 5000 10000``), on this machine:

* a private PostgreSQL 15 cluster (``initdb`` on a free port, run as the ``postgres``
  user when started as root; one fresh database per N), a private Mosquitto
  (anonymous, no persistence, ``max_queued_messages 100000`` so the ingest session's
  QoS 1 queue is not cut at the default 1,000), one ``edgefleet server`` process
  (uvicorn, scheduler every ``--rollout-interval`` s, MQTT 5 ingestion);
* N devices of :mod:`fleet_server.simulator.load` in this process, enrolled through
  the real API, one MQTT connection each, polling every ``--poll`` s and sending one
  summary every ``--window`` s (60/60 by default: the production intervals);
* phase 1: v1 to every device (all at once) as they come up: each device's first
  check-in, a 200, a Range download, install reports;
* phase 2: ``--measure`` seconds of steady load: server CPU and RSS (psutil on its PID),
  PostgreSQL CPU, broker RSS, database growth (``pg_database_size`` and
  ``pg_total_relation_size`` of the telemetry tables), check-in latencies;
* phase 3: v2 by staged canary (10 % -> 50 % -> 100 %, error-rate and install-failure
  gates) through the whole fleet; the time from the moment a stage's gate data was
  complete (its canaries' summaries and installs in the database) to the engine's
  decision;
* ingestion lag: ``received_at - ts`` of every summary row of phase 2.

``--replicas 2`` runs two server processes on the same database, broker, bundle folder
and keys (one holds the rollout leader lock; ingestion is split by the MQTT 5 shared
subscription); the simulated devices' connection pools alternate between them and a
device keeps its pool, as behind a sticky load balancer. Server CPU and memory are then
the sum over both.

Costs are reported per 1,000 devices, and normalised to 60 s polls and windows when the
run compressed time (``--poll 15 --window 15`` sends four times the traffic per device:
CPU is divided by 4, rows per device-day counted at one per 60 s). Writes
``<out>/bench_fleet.json`` (runs merged by N), ``bench_fleet.md`` and ``bench_fleet.png``.

    python bench/bench_fleet.py --devices 1000 [5000 10000] [--poll 60 --window 60] [--replicas 2]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402
import psutil  # noqa: E402
import psycopg  # noqa: E402

from fleet_server.simulator.load import LoadConfig, LoadFleet, percentile  # noqa: E402
from tests.brokers import MosquittoBroker  # noqa: E402
from tests.bundlesim import BundleSim, tiny_onnx_model  # noqa: E402
from tests.server_fixtures import server_keys, start_server, stop_server  # noqa: E402

ADMIN = "eft_bench-admin-" + secrets.token_urlsafe(24)
CLASS = "bench-gw"
PG_BIN = Path("/usr/lib/postgresql/15/bin")


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


# -- PostgreSQL ---------------------------------------------------------------------
@dataclass
class PgCluster:
    """A private PostgreSQL cluster in ``root`` on a free port."""

    root: Path
    port: int = 0
    proc_pid: int | None = None

    def _as_owner(self, cmd: list[str]) -> list[str]:
        if os.geteuid() == 0:  # initdb refuses root
            return ["runuser", "-u", "postgres", "--", *cmd]
        return cmd

    def start(self) -> PgCluster:
        from tests.brokers import free_port

        data = self.root / "data"
        self.root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            self.root.parent.chmod(0o755)  # a private temporary directory: let postgres in
            shutil.chown(self.root, "postgres", "postgres")
        binary = lambda n: str(PG_BIN / n if (PG_BIN / n).exists() else shutil.which(n))  # noqa: E731
        subprocess.run(
            self._as_owner(
                [binary("initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8"]
            ),
            check=True,
            capture_output=True,
        )
        self.port = free_port()
        opts = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} "
            "-c shared_buffers=256MB -c max_connections=200 -c synchronous_commit=on"
        )
        subprocess.run(
            self._as_owner(
                [binary("pg_ctl"), "-D", str(data), "-o", opts, "-l", str(self.root / "pg.log")]
                + ["-w", "start"]
            ),
            check=True,
            capture_output=True,
        )
        self.proc_pid = int((data / "postmaster.pid").read_text().split()[0])
        return self

    def stop(self) -> None:
        binary = str(PG_BIN / "pg_ctl" if (PG_BIN / "pg_ctl").exists() else shutil.which("pg_ctl"))
        subprocess.run(
            self._as_owner([binary, "-D", str(self.root / "data"), "-m", "fast", "stop"]),
            capture_output=True,
        )

    def dsn(self, db: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={db}"

    def url(self, db: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{db}"

    def cpu_seconds(self) -> float:
        """CPU of the postmaster and every backend (user + system)."""
        total = 0.0
        try:
            root = psutil.Process(self.proc_pid)
            for p in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    t = p.cpu_times()
                    total += t.user + t.system
        except psutil.Error:
            pass
        return total


# -- measurement -------------------------------------------------------------------
@dataclass
class Sample:
    t: float
    server_cpu: float
    server_rss: int
    pg_cpu: float
    broker_rss: int
    sim_cpu: float


def sample(servers: list[psutil.Process], broker: psutil.Process, pg: PgCluster) -> Sample:
    """Server figures are the sum over the replicas."""
    bt, me = broker.memory_info(), psutil.Process().cpu_times()
    return Sample(
        time.monotonic(),
        sum(t.user + t.system for t in (p.cpu_times() for p in servers)),
        sum(p.memory_info().rss for p in servers),
        pg.cpu_seconds(),
        bt.rss,
        me.user + me.system,
    )


def db_sizes(dsn: str) -> dict[str, int]:
    def one(conn: psycopg.Connection[Any], sql: str, *params: Any) -> int:
        row = conn.execute(sql, params).fetchone()
        return int(row[0]) if row else 0

    with psycopg.connect(dsn) as conn:
        out = {"database": one(conn, "SELECT pg_database_size(current_database())")}
        for t in ("telemetry_summaries", "telemetry_events", "device_reports", "devices"):
            # a partitioned table's own size is 0: add up its partitions
            out[t] = one(
                conn,
                "SELECT coalesce(sum(pg_total_relation_size(relid)), 0) FROM pg_partition_tree(%s)",
                t,
            )
            out[f"{t}_rows"] = one(conn, f"SELECT count(*) FROM {t}")
    return out


ROUTES = {
    "assignment": "/device/v1/assignment",
    "bundle": "/device/v1/bundles/{bundle_id}",
    "reports": "/device/v1/reports",
}


def route_latencies(metrics_text: str) -> dict[str, Any]:
    """Server-side request time per device route from the server's own Prometheus
    histogram (``edgefleet_http_request_seconds``): count, mean, and the bucket bounds
    that hold p50 and p99 (in ms)."""
    import re

    out: dict[str, Any] = {}
    for key, route in ROUTES.items():
        r = re.escape(route)
        pat = r'edgefleet_http_request_seconds_bucket\{le="([^"]+)",route="' + r + r'"\} (\S+)'
        buckets = [(float(le), float(c)) for le, c in re.findall(pat, metrics_text)]
        total_m = re.search(
            r'edgefleet_http_request_seconds_sum\{route="' + r + r'"\} (\S+)', metrics_text
        )
        if not buckets or not total_m or not buckets[-1][1]:
            continue
        n = buckets[-1][1]

        def bound(q: float, buckets: list[tuple[float, float]] = buckets, n: float = n) -> str:
            le = next(le for le, c in buckets if c >= q * n)
            return f"<= {le * 1000:g}" if le != float("inf") else "> 10000"

        out[key] = {
            "requests": int(n),
            "mean_ms": round(float(total_m.group(1)) / n * 1000, 2),
            "p50_ms": bound(0.5),
            "p99_ms": bound(0.99),
        }
    return out


def ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1000, 2)


@dataclass
class Run:
    devices: int
    poll: float
    window: float
    figures: dict[str, Any] = field(default_factory=dict)


# -- the run -------------------------------------------------------------------------
@contextlib.contextmanager
def stack(tmp: Path, pg: PgCluster, args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    db = f"bench_fleet_{secrets.token_hex(4)}"
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db}"')
    broker = MosquittoBroker(tmp / "broker", persistence=False, max_queued_messages=100_000)
    broker.start()
    sim = BundleSim(tmp / "repo")
    keys_dir, kid, trust = server_keys(tmp, sim)
    settings = {
        "database_url": pg.url(db),
        "bundle_dir": str(tmp / "bundles"),
        "admin_bootstrap_token": ADMIN,
        "trust_store": str(trust),
        "signing_key_dir": str(keys_dir),
        "signing_key": kid,
        "mqtt_host": "127.0.0.1",
        "mqtt_port": str(broker.port),
        "mqtt_username": "fleet-server",
        "mqtt_password": "bench",
        "telemetry_window_seconds": str(args.window),
        "rollout_interval_seconds": str(args.rollout_interval),
        "dashboard": "false",
    }
    # replicas share the database, the broker (ingestion by MQTT 5 shared subscription),
    # the bundle folder and the keys; the rollout scheduler runs in the lock holder only
    servers = []
    try:
        for i in range(args.replicas):
            servers.append(start_server(settings, tmp / f"server-{i}.log"))
        yield {"server": servers[0], "servers": servers, "broker": broker, "sim": sim, "db": db}
    finally:
        for server in servers:
            stop_server(server.proc)
        broker.stop()
        with psycopg.connect(pg.dsn(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


async def admin_call(http: httpx.AsyncClient, method: str, path: str, **kw: Any) -> dict[str, Any]:
    # starting a rollout writes every device's assignment inside the request: more than
    # the devices' 60 s timeout at 10,000 devices on this machine
    r = await http.request(
        method,
        "/api/v1" + path,
        headers={"Authorization": f"Bearer {ADMIN}"},
        timeout=900.0,
        **kw,
    )
    if r.status_code >= 300:
        raise RuntimeError(f"{method} {path}: {r.status_code} {r.text}")
    return dict(r.json())


async def wait_rollout(
    http: httpx.AsyncClient, rid: str, timeout: float, label: str, fleet: LoadFleet
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    last, shown = "", 0.0
    while True:
        # the list, not GET /rollouts/{id}: that one also counts the cohorts (every
        # device of the group through the ORM), which would load the server under test
        page = await admin_call(http, "GET", "/rollouts")
        r = next(x for x in page["items"] if x["id"] == rid)
        line = f"{r['status']} stage {r['stage_number']}/{r['stages_total']}"
        if line != last or time.monotonic() - shown > 30:
            say(
                f"  {label}: {line} (installs so far {fleet.stats.installs}, "
                f"downloads failed {fleet.stats.download_errors}; load {load_average()})"
            )
            last, shown = line, time.monotonic()
        if r["status"] in ("succeeded", "rolled_back", "aborted"):
            return r
        if time.monotonic() > deadline:  # recorded as it stands; the run goes on
            say(f"  {label}: still {line} after {timeout:.0f} s; giving up on it")
            return r
        await asyncio.sleep(5)


def gate_latencies(dsn: str, rollout: dict[str, Any], bundle: dict[str, Any]) -> list[float]:
    """Per stage: decision time minus the moment its gate data was complete, counted as
    the engine counts it (rollouts/figures.py): since the stage began, ``min_samples``
    inferences in the candidate's summaries, at least one install reported, and
    ``min_devices`` canaries reporting (devices with a summary, or with an install report
    over MQTT or HTTP, whichever is more), and the soak over."""
    spec, history = rollout["spec"], rollout["state"].get("history", [])
    gates = {g["kind"]: g for g in spec.get("gates", [])}
    need = int(gates.get("error_rate", {}).get("min_samples", 1))
    moves = [h for h in history if h["action"] in ("start", "advance", "complete")]
    name, version = bundle["name"], bundle["version"]
    out = []
    with psycopg.connect(dsn) as conn:
        for i in range(len(moves) - 1):
            began, decided = moves[i]["ts"], moves[i + 1]["ts"]
            stage = spec["stages"][moves[i]["stage"]]  # the stage that move entered
            timeline: list[tuple[float, str, str, int]] = [
                (at, "summary", dev, n)
                for dev, n, at in conn.execute(
                    "SELECT device_id, count, received_at FROM telemetry_summaries "
                    "WHERE name = %s AND version = %s AND received_at >= %s",
                    (name, version, began),
                )
            ]
            timeline += [
                (at, "install", dev, 0)
                for dev, at in conn.execute(
                    "SELECT device_id, received_at FROM telemetry_events WHERE type = 'install'"
                    " AND name = %s AND version = %s AND received_at >= %s "
                    "UNION ALL SELECT device_id, extract(epoch FROM received_at)::float8 "
                    "FROM device_reports WHERE type = 'install' AND name = %s AND version = %s"
                    " AND extract(epoch FROM received_at) >= %s",
                    (name, version, began, name, version, began),
                )
            ]
            timeline.sort()
            total, reporting, installed, ready = 0, set(), set(), None
            for at, kind, dev, n in timeline:
                if kind == "summary":
                    total += n
                    reporting.add(dev)
                else:
                    installed.add(dev)
                devices = max(len(reporting), len(installed))
                if total >= need and installed and devices >= stage["min_devices"]:
                    ready = at
                    break
            if ready is not None:
                out.append(decided - max(ready, began + stage["soak_seconds"]))
    return out


async def run_one(n: int, pg: PgCluster, args: argparse.Namespace) -> Run:
    run = Run(n, args.poll, args.window)
    f = run.figures
    with (
        tempfile.TemporaryDirectory(prefix=f"bench-fleet-{n}-") as tmp_s,
        stack(Path(tmp_s), pg, args) as s,
    ):
        server, broker, sim = s["server"], s["broker"], s["sim"]
        server_p = [psutil.Process(x.proc.pid) for x in s["servers"]]
        broker_p = psutil.Process(broker.proc.pid)
        f["replicas"] = len(server_p)
        dsn = pg.dsn(s["db"])
        cfg = LoadConfig(
            server.url,
            "127.0.0.1",
            broker.port,
            poll_seconds=args.poll,
            window_seconds=args.window,
            inferences_per_window=args.inferences,
            range_bytes=args.range_bytes,
            http_connections=args.http_connections,
            replica_urls=tuple(x.url for x in s["servers"][1:]),
        )
        fleet = LoadFleet(cfg, seed=n)
        http = fleet.http
        model = tiny_onnx_model(0, n_in=args.model_width, n_out=args.model_width)
        bundles = {}
        for v in (1, 2):
            path = sim.publish(version=v, name="bench", model_bytes=model[:-4] + bytes([v]) * 4)
            with open(path, "rb") as fh:
                r = await http.post(
                    "/api/v1/bundles",
                    headers={"Authorization": f"Bearer {ADMIN}"},
                    files={"file": (path.name, fh, "application/octet-stream")},
                )
            if r.status_code != 201:
                raise RuntimeError(f"bundle upload: {r.status_code} {r.text}")
            bundles[v] = r.json()
        f["bundle_bytes"] = bundles[1]["size"]
        group = await admin_call(
            http, "POST", "/groups", json={"name": CLASS, "device_class": CLASS}
        )
        base = sample(server_p, broker_p, pg)

        say(f"N={n}: enrolling through the API")
        t0 = time.monotonic()
        await fleet.enroll(
            ADMIN, n, device_class=CLASS, progress=lambda d, t: say(f"  enrolled {d}/{t}")
        )
        f["enroll_per_s"] = round(n / (time.monotonic() - t0), 1)
        b_before = broker_p.memory_info().rss
        t0 = time.monotonic()
        await fleet.connect(progress=lambda d, t: say(f"  MQTT connected {d}/{t}"))
        f["mqtt_connect_per_s"] = round(n / (time.monotonic() - t0), 1)
        await asyncio.sleep(2)
        f["broker_rss_mb"] = round(broker_p.memory_info().rss / 2**20, 1)
        f["broker_kb_per_connection"] = round((broker_p.memory_info().rss - b_before) / n / 1024, 1)
        f["server_rss_mb_idle_enrolled"] = round(
            sum(p.memory_info().rss for p in server_p) / 2**20, 1
        )

        say(f"N={n}: v1 to every device (all at once) while the fleet comes up")
        quick = [{"percent": 100, "min_devices": 1, "soak_seconds": 0}]
        r1 = await admin_call(
            http,
            "POST",
            "/rollouts",
            json={
                "name": "v1",
                "bundle_id": bundles[1]["id"],
                "group": group["id"],
                "strategy": "all_at_once",
                "stages": quick,
                "gates": [],
                "start": True,
            },
        )
        fleet.start()
        t0 = time.monotonic()
        await wait_rollout(http, r1["id"], args.timeout, "v1", fleet)
        while fleet.stats.installs < n and time.monotonic() - t0 < args.timeout:
            await asyncio.sleep(2)
        f["v1_install_seconds"] = round(time.monotonic() - t0, 1)
        f["v1_installed"] = fleet.stats.installs
        first = list(fleet.stats.first_checkin)
        f["first_checkin_p50_ms"] = ms(percentile(first, 0.5))
        f["first_checkin_p99_ms"] = ms(percentile(first, 0.99))
        uncached = list(fleet.stats.checkin_200)
        await asyncio.sleep(args.window + 5)  # every device has sent a v1 summary

        say(f"N={n}: steady load for {args.measure:.0f} s (load {load_average()})")
        fleet.stats.checkin_304.clear()
        size0, s0 = db_sizes(dsn), sample(server_p, broker_p, pg)
        t_wall0 = time.time()
        samples = [s0]
        while samples[-1].t - s0.t < args.measure:
            await asyncio.sleep(5)
            samples.append(sample(server_p, broker_p, pg))
            if len(samples) % 6 == 0:
                x = samples[-1]
                cores = (x.server_cpu - s0.server_cpu) / (x.t - s0.t)
                say(
                    f"  {x.t - s0.t:.0f} s: server {cores:.2f} cores, "
                    f"RSS {x.server_rss / 2**20:.0f} MB; 304s {len(fleet.stats.checkin_304)}; "
                    f"published {fleet.stats.published}; load {load_average()}"
                )
        s1, size1 = samples[-1], db_sizes(dsn)
        dur = s1.t - s0.t
        f["load_average"] = load_average()
        f["measure_seconds"] = round(dur, 1)
        scale = min(args.poll, args.window) / 60.0  # traffic per device vs 60 s intervals
        server_cores = (s1.server_cpu - s0.server_cpu) / dur
        pg_cores = (s1.pg_cpu - s0.pg_cpu) / dur
        f["server_cores"] = round(server_cores, 3)
        f["server_cores_per_1k_at_60s"] = round(server_cores * scale / (n / 1000), 4)
        f["postgres_cores"] = round(pg_cores, 3)
        f["postgres_cores_per_1k_at_60s"] = round(pg_cores * scale / (n / 1000), 4)
        f["simulator_cores"] = round((s1.sim_cpu - s0.sim_cpu) / dur, 3)
        f["server_rss_mb"] = round(max(x.server_rss for x in samples) / 2**20, 1)
        f["server_rss_mb_per_1k"] = round(
            (max(x.server_rss for x in samples) - base.server_rss) / 2**20 / (n / 1000), 1
        )
        c304 = list(fleet.stats.checkin_304)
        f["checkins_per_s"] = round(len(c304) / dur, 1)
        f["checkin_304_p50_ms"] = ms(percentile(c304, 0.5))
        f["checkin_304_p99_ms"] = ms(percentile(c304, 0.99))
        grew = size1["database"] - size0["database"]
        rows = size1["telemetry_summaries_rows"] - size0["telemetry_summaries_rows"]
        f["summaries_per_s"] = round(rows / dur, 1)
        f["db_bytes_grown"] = grew
        f["db_bytes_per_device_day"] = round(grew / n / dur * 86400 * scale)
        f["summary_bytes_per_row"] = round(
            size1["telemetry_summaries"] / max(1, size1["telemetry_summaries_rows"])
        )
        f["db_mb_per_device_day_from_rows"] = round(f["summary_bytes_per_row"] * 1440 / 2**20, 3)
        with psycopg.connect(dsn) as conn:
            lag = [
                r[0]
                for r in conn.execute(
                    "SELECT received_at - ts FROM telemetry_summaries WHERE received_at >= %s",
                    (t_wall0,),
                )
            ]
        f["ingest_lag_p50_ms"] = ms(percentile(lag, 0.5))
        f["ingest_lag_p99_ms"] = ms(percentile(lag, 0.99))

        say(f"N={n}: v2 by staged canary 10% -> 50% -> 100% through the whole fleet")
        stages = [
            {"percent": p, "min_devices": max(1, int(n * p / 100 * 0.8)), "soak_seconds": 0}
            for p in (10, 50, 100)
        ]
        gates = [
            {"kind": "error_rate", "threshold": 0.02, "min_samples": max(100, n // 10)},
            {"kind": "install_failure_rate", "threshold": 0.05, "min_samples": 1},
        ]
        installs0 = fleet.stats.installs
        n200 = len(fleet.stats.checkin_200)
        t0 = time.monotonic()
        r2 = await admin_call(
            http,
            "POST",
            "/rollouts",
            json={
                "name": "v2",
                "bundle_id": bundles[2]["id"],
                "group": group["id"],
                "previous_bundle_id": bundles[1]["id"],
                "strategy": "staged_canary",
                "stages": stages,
                "gates": gates,
                "failure_policy": "rollback",
                "start": True,
            },
        )
        final = await wait_rollout(http, r2["id"], args.timeout, "v2", fleet)
        f["rollout_status"] = final["status"]
        f["rollout_seconds"] = round(time.monotonic() - t0, 1)
        f["rollout_installs"] = fleet.stats.installs - installs0
        uncached += fleet.stats.checkin_200[n200:]
        f["checkin_200_p50_ms"] = ms(percentile(uncached, 0.5))
        f["checkin_200_p99_ms"] = ms(percentile(uncached, 0.99))
        lat = gate_latencies(dsn, final, bundles[2])
        f["gate_to_decision_s"] = [round(x, 1) for x in lat]
        f["load_average_end"] = load_average()
        m = await http.get("/metrics")
        f["server_side"] = route_latencies(m.text) if m.status_code == 200 else {}
        f["errors"] = {
            "checkin": fleet.stats.checkin_errors,
            "download": fleet.stats.download_errors,
            "publish": fleet.stats.publish_errors,
        }
        await fleet.stop()
    return run


# -- output --------------------------------------------------------------------------
COLUMNS: list[tuple[str, str | tuple[str, ...], str]] = [
    ("devices", "devices", "{:,}"),
    ("replicas", "replicas", "{}"),
    ("load", "load_average", "{}"),
    ("server CPU cores / 1k", "server_cores_per_1k_at_60s", "{:.3f}"),
    ("PostgreSQL cores / 1k", "postgres_cores_per_1k_at_60s", "{:.3f}"),
    ("server RSS MB", "server_rss_mb", "{:.0f}"),
    ("304 p50/p99 ms", ("checkin_304_p50_ms", "checkin_304_p99_ms"), "{} / {}"),
    ("first check-in p50/p99 ms", ("first_checkin_p50_ms", "first_checkin_p99_ms"), "{} / {}"),
    ("200 (new assignment) p50/p99 ms", ("checkin_200_p50_ms", "checkin_200_p99_ms"), "{} / {}"),
    ("ingest lag p50/p99 ms", ("ingest_lag_p50_ms", "ingest_lag_p99_ms"), "{} / {}"),
    ("gate data -> decision s", "gate_to_decision_s", "{}"),
    ("rollout 10/50/100 %", ("rollout_status", "rollout_seconds"), "{} in {} s"),
    ("DB bytes / device-day", "db_bytes_per_device_day", "{:,}"),
    ("broker KB / connection", "broker_kb_per_connection", "{}"),
]


def table(runs: list[dict[str, Any]]) -> str:
    head = "| " + " | ".join(c[0] for c in COLUMNS) + " |"
    out = [head, "|" + "---|" * len(COLUMNS)]
    for r in sorted(runs, key=lambda r: (r["devices"], r.get("replicas", 1))):
        cells = []
        for _, key, fmt in COLUMNS:
            try:
                vals = [r.get(k) for k in key] if isinstance(key, tuple) else [r.get(key)]
                if any(v is None for v in vals):
                    cells.append("-")
                elif isinstance(key, str) and isinstance(vals[0], list):
                    cells.append(", ".join(f"{v:g}" for v in vals[0]))
                else:
                    cells.append(fmt.format(*vals))
            except (TypeError, ValueError):
                cells.append("-")
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = sorted(
        (r for r in runs if "partial" not in r and r.get("replicas", 1) == 1),
        key=lambda r: r["devices"],
    )
    n = [r["devices"] for r in runs]
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.8))
    ax[0].plot(n, [r["server_cores"] for r in runs], "o-", label="server")
    ax[0].plot(n, [r["postgres_cores"] for r in runs], "s-", label="PostgreSQL")
    ax[0].set_title("CPU cores used (steady load)")
    ax[0].legend()
    ax[1].plot(n, [r["server_rss_mb"] for r in runs], "o-", label="server RSS")
    ax[1].plot(n, [r["broker_rss_mb"] for r in runs], "s-", label="broker RSS")
    ax[1].set_title("memory (MB)")
    ax[1].legend()
    for key, label in (
        ("checkin_304_p99_ms", "304 p99"),
        ("checkin_200_p99_ms", "200 p99"),
        ("ingest_lag_p99_ms", "ingest lag p99"),
    ):
        ax[2].plot(n, [r.get(key) or 0 for r in runs], "o-", label=label)
    ax[2].set_yscale("log")
    ax[2].set_title("latency (ms)")
    ax[2].legend()
    polls = sorted({f"{r['poll']:g}/{r['window']:g} s" for r in runs})
    for a in ax:
        a.set_xlabel("devices")
        a.grid(alpha=0.3)
    fig.suptitle(
        f"edgefleet server, one process, PostgreSQL + Mosquitto (poll/window {', '.join(polls)})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--devices", type=int, nargs="+", default=[1000], help="fleet sizes, in order")
    ap.add_argument("--poll", type=float, default=60.0, help="check-in interval, s")
    ap.add_argument("--window", type=float, default=60.0, help="summary window, s")
    ap.add_argument("--measure", type=float, default=180.0, help="steady-load phase, s")
    ap.add_argument("--inferences", type=int, default=60, help="inferences per summary window")
    ap.add_argument("--rollout-interval", type=float, default=5.0, help="scheduler interval, s")
    ap.add_argument("--model-width", type=int, default=128, help="bundle model: W x W floats")
    ap.add_argument("--range-bytes", type=int, default=32 * 1024)
    ap.add_argument(
        "--http-connections",
        type=int,
        default=256,
        help="HTTP connections of the simulated fleet (pools of 16)",
    )
    ap.add_argument("--timeout", type=float, default=1200.0, help="per rollout, s")
    ap.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="server processes on the same database and broker (devices split between them)",
    )
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()

    # SIGTERM unwinds like Ctrl-C, so the server, broker and cluster are stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the broker inherits it
    need = max(args.devices) + 1000
    if hard < need:
        sys.exit(f"file descriptors: the hard limit is {hard}, {need} are needed; raise it")
    args.out.mkdir(parents=True, exist_ok=True)
    result_file = args.out / "bench_fleet.json"
    stored: dict[str, Any] = json.loads(result_file.read_text()) if result_file.exists() else {}
    runs: dict[tuple[int, int], Any] = {
        (r["devices"], r.get("replicas", 1)): r for r in stored.get("runs", [])
    }
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent,
    ).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="bench-fleet-pg-") as pg_dir:
        pg = PgCluster(Path(pg_dir) / "pg").start()
        say(f"PostgreSQL on 127.0.0.1:{pg.port}; {os.cpu_count()} CPUs; load {load_average()}")
        try:
            for n in args.devices:
                run = asyncio.run(run_one(n, pg, args))
                runs[(n, args.replicas)] = {
                    "devices": n,
                    "replicas": args.replicas,
                    "poll": args.poll,
                    "window": args.window,
                    "commit": commit,
                    "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                    **run.figures,
                }
                say(f"N={n}: " + json.dumps(run.figures))
                all_runs = list(runs.values())
                result_file.write_text(json.dumps({"runs": all_runs}, indent=1) + "\n")
                (args.out / "bench_fleet.md").write_text(table(all_runs))
                plot(all_runs, args.out / "bench_fleet.png")
        finally:
            pg.stop()
    print(table(list(runs.values())))


if __name__ == "__main__":
    main()
