"""The fleet demo: server, broker, a simulated fleet, a good rollout, a bad one caught.

1. keys: the Uptane roots and three release keys (a threshold of two signs a release),
   and the key that signs each bundle's own manifest. On one machine here; in production
   every one of them stays offline and the server holds only its online keys;
2. a Mosquitto broker with per-device credentials and ACLs, and the fleet server
   (SQLite, local bundle store) in its own process;
3. a small model trained three times: v1, a healthy retrain v2, and a v3 with
   a label-mapping bug; each converted for every device class (ONNX float32 for
   the gateways, TFLite int8 weights for the boards), parity-checked, packed
   with its drift reference and smoke samples, signed, uploaded, and released: two
   release keys sign the image repository's targets, which the server cannot do;
4. provisioning images for the three device classes, and a fleet of real agents
   provisioned from them, each enrolling with its own one-time token;
5. v1 everywhere, then v2 by staged canary (10% -> 50% -> 100%) through the
   health gates, then v3 by staged canary: caught by a gate and rolled back
   automatically: the director instructs v2 again, and nothing is signed for it;
6. the telemetry review report.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from converters.keys import KeyStore
from device_agent.bundle import TrustStore
from fleet_server.broker.embedded import EmbeddedBroker
from fleet_server.broker.mosquitto import SERVER_USER, LocalMosquitto
from fleet_server.client import AdminClient
from fleet_server.demo.services import ServerProcess
from fleet_server.images import build_image, load_class
from fleet_server.registry.uptane import init_uptane
from fleet_server.simulator.fleet import ClassPlan, Fleet
from fleet_server.simulator.runtimes import RuntimeEnvError, run_in_own_processes, runtime_env

CLASS_MIX = (("x86_64-gateway", 0.45), ("aarch64-board", 0.30), ("aarch64-legacy", 0.25))
TARGETS = {
    "x86_64-gateway": "onnx:float32@ir9/opset17",
    "aarch64-board": "tflite:int8-dynamic",
    "aarch64-legacy": "tflite:int8-dynamic",
}
MODEL = "machine-condition"
# the legacy boards' agents run in processes of their own (unless --legacy-in-process) on
# tflite-runtime 2.14 (numpy<2), in an environment built once under .venv-cache/
# (fleet_server.simulator.runtimes)
OWN_RUNTIME = ("aarch64-legacy",)
RUNTIME_CACHE = Path(__file__).resolve().parents[2] / ".venv-cache"


@dataclass
class DemoResult:
    """What the demo showed, for tests and for the closing lines."""

    report: Path
    good: dict[str, str] = field(default_factory=dict)  # class -> final status of v2
    bad: dict[str, str] = field(default_factory=dict)  # class -> final status of v3
    caught_by: dict[str, str] = field(default_factory=dict)  # class -> gate and numbers
    final_versions: dict[int | None, int] = field(default_factory=dict)
    runtimes: dict[str, str] = field(default_factory=dict)  # class -> runtime of its own
    seconds: float = 0.0


@dataclass
class DemoRun:
    workdir: Path
    started: float = field(default_factory=time.monotonic)

    def say(self, text: str, *, bold: bool = False, fg: str | None = None) -> None:
        t = time.monotonic() - self.started
        click.secho(f"[{t:6.1f}s] {text}", bold=bold, fg=fg)


def _release(admin: AdminClient, bundles: list[Path], keys: KeyStore, signers: list[str]) -> int:
    """The operator's release: add every bundle to the image repository's targets and
    sign them with ``signers`` (a threshold of the release keys); returns the version.

    Every release keeps counter 1: the counter is the devices' floor, raised by the
    release keys only to retire an older release, so a rollback to v2 stays possible.
    """
    from tuf.api.metadata import Metadata, Targets

    from fleet_server.registry.tufrepo import bundle_release_target, signer_for

    md: Metadata[Targets] = Metadata.from_bytes(admin.get_text("/release/targets").encode())
    for path in bundles:
        t = bundle_release_target(path, counter=1)
        md.signed.targets[t.path] = t
    md.signed.version += 1
    md.signatures.clear()
    for name in signers:
        md.sign(signer_for(keys.private_key(name)), append=True)
    admin.request("PUT", "/release/targets", content=md.to_bytes())
    return int(md.signed.version)


def _build_bundles(run: DemoRun, key: Any) -> dict[int, dict[str, Path]]:
    """Train v1, v2 (healthy) and v3 (bad); convert per class; sign. -> {version: {class: path}}"""
    from converters.pipeline import build_bundles
    from converters.source import from_torch
    from converters.targets import parse_target
    from fleet_server.demo.model import accuracy, train

    out: dict[int, dict[str, Path]] = {}
    for version, seed, bad in ((1, 11, False), (2, 22, False), (3, 33, True)):
        module, calib = train(seed, bad=bad)
        source = from_torch(
            module, calib[:8], input_names=["x"], output_names=["probs"], task="classification"
        )
        targets = [
            parse_target(spec, tuple(c for c, s in TARGETS.items() if s == spec))
            for spec in dict.fromkeys(TARGETS.values())
        ]
        results = build_bundles(
            source,
            targets,
            run.workdir / "bundles",
            name=MODEL,
            version=version,
            signing_key=key,
            samples=calib,
            reference_samples=calib,
        )
        out[version] = {}
        for r in results:
            if r.error is not None or r.bundle is None:
                raise click.ClickException(f"v{version} {r.target.name}: {r.error}")
            for cls in r.target.device_classes:
                out[version][cls] = r.bundle
            worst = (
                max((o.max_abs_error for o in r.artifact.parity.outputs), default=0.0)
                if r.artifact is not None
                else 0.0
            )
            run.say(
                f"  v{version} {r.target.name:<28} -> {r.bundle.name} "
                f"(parity max abs err {worst:.2g})"
            )
        label = "BAD: label-mapping bug" if bad else "healthy"
        run.say(f"  v{version}: offline accuracy {accuracy(module):.1%} ({label})")
    return out


def _wait(
    run: DemoRun,
    fleet: Fleet,
    admin: AdminClient,
    rollout_ids: dict[str, str],
    done: set[str],
    timeout: float,
) -> dict[str, dict[str, Any]]:
    """Drive predictions until every rollout reaches a final status; narrate changes."""
    seen: dict[str, tuple[str, int]] = {}
    final: dict[str, dict[str, Any]] = {}
    quiet_since: dict[str, float] = {}
    said: dict[str, str] = {}

    def tick(elapsed: float) -> bool:
        for cls, rid in rollout_ids.items():
            if cls in final:
                continue
            r = admin.get(f"/rollouts/{rid}")
            key = (r["status"], r["stage"])
            if seen.get(cls) != key:
                seen[cls] = key
                quiet_since[cls] = elapsed
                counts = fleet.versions(cls)
                running = ", ".join(
                    f"v{v}: {n}"
                    for v, n in sorted(counts.items(), key=lambda kv: (kv[0] is None, kv[0] or 0))
                )
                stage = f"stage {r['stage'] + 1}" if r["stage"] >= 0 else "-"
                run.say(f"  {cls:<15} {r['status']:<12} {stage:<8} devices run {running}")
            if r["status"] in done:
                final[cls] = r
            elif elapsed - quiet_since.get(cls, 0.0) > 8:
                quiet_since[cls] = elapsed
                why = admin.get(f"/rollouts/{rid}/evaluation")["decision"].get("reason", "")
                if why and said.get(cls) != why:
                    said[cls] = why
                    run.say(f"  {cls:<15} waiting: {why}")
        return len(final) == len(rollout_ids)

    fleet.drive(timeout, calls_per_second=20.0, on_tick=tick)
    missing = set(rollout_ids) - set(final)
    if missing:
        raise click.ClickException(f"rollouts for {sorted(missing)} did not finish in {timeout}s")
    return final


def _gate_that_caught(admin: AdminClient, rollout_id: str) -> str:
    """The audit log's rollback entry, with the gate and its numbers."""
    page = admin.get("/audit", params={"target_id": rollout_id, "limit": 200})
    for entry in page.get("items", []):
        details = entry.get("details") or {}
        if "rollback" in str(entry.get("action", "")) or details.get("action") == "rollback":
            gates = [g for g in details.get("gates", []) if g.get("verdict") == "fail"]
            if gates:
                g = gates[0]
                return (
                    f"gate {g.get('name') or g.get('kind')}: canary {g.get('canary')} vs "
                    f"control {g.get('control')} (threshold {g.get('threshold')})"
                )
            return str(details.get("reason", entry.get("action")))
    return "(no rollback entry in the audit log)"


def run_demo(
    workdir: Path,
    devices: int,
    *,
    stage_percents: tuple[float, ...] = (25, 50, 100),
    broker_kind: str = "auto",
    legacy_processes: bool = True,
) -> DemoResult:
    """Run the whole demo in ``workdir``; processes it starts are stopped before it returns.

    ``legacy_processes``: the legacy boards' agents run as processes of their own on their
    real runtime (if its environment cannot be built, in this process, said in yellow)."""
    own_runtime = OWN_RUNTIME if legacy_processes else ()
    workdir = workdir.resolve()  # the server process runs in a directory of its own
    run = DemoRun(workdir)
    result = DemoResult(report=workdir / "report.html")
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    run.say("edgefleet fleet demo", bold=True)

    run.say("1. release keys, Uptane roots and the bundle-signing key", bold=True)
    offline = workdir / "offline-keys"
    uptane_dir = workdir / "server" / "uptane"
    init = init_uptane(operator_keys=offline, uptane_dir=uptane_dir, release_keys=3, threshold=2)
    keys = KeyStore(offline)
    key_info = keys.generate("bundle-signing")
    trust = TrustStore()
    trust.add(keys.public_key(key_info.keyid), comment="bundle-signing")
    trust_path = workdir / "trust.json"
    trust.save(trust_path)
    run.say(
        f"  offline in production ({offline}): image-root, director-root, "
        f"{', '.join(init.release_keys)} (any {init.threshold} release), bundle-signing"
    )
    run.say(f"  the server holds only its online keys ({uptane_dir / 'keys'})")

    run.say("2. broker and fleet server", bold=True)
    embedded = broker_kind == "embedded" or (
        broker_kind == "auto" and not LocalMosquitto.available()
    )
    broker: LocalMosquitto | EmbeddedBroker = (
        EmbeddedBroker(workdir / "broker") if embedded else LocalMosquitto(workdir / "broker")
    )
    server_password = secrets.token_urlsafe(18)
    broker.add_user(SERVER_USER, server_password)
    broker.start()
    admin_token = "demo-admin-" + secrets.token_urlsafe(24)
    server = ServerProcess(
        workdir / "server",
        {
            "environment": "development",
            "database_url": f"sqlite:///{workdir / 'server' / 'edgefleet.db'}",
            "bundle_dir": str(workdir / "server" / "bundles"),
            "trust_store": str(trust_path),
            "uptane_dir": str(uptane_dir),
            "admin_bootstrap_token": admin_token,
            "mqtt_host": "127.0.0.1",
            "mqtt_port": str(broker.port),
            "mqtt_username": SERVER_USER,
            "mqtt_password": server_password,
            "telemetry_window_seconds": "2",
            "telemetry_sample_rate": "0.02",
            "rollout_interval_seconds": "1",
            "assignment_cache_seconds": "0.5",
            # the embedded broker speaks MQTT 3.1.1 only
            "mqtt_version": "4" if embedded else "5",
        },
    )
    fleet: Fleet | None = None
    socket_dirs: list[Path] = []
    try:
        server.start()
        kind = "embedded MQTT broker (amqtt)" if embedded else "mosquitto"
        run.say(f"  {kind} on 127.0.0.1:{broker.port}, server on {server.url}")
        admin = AdminClient(server.url, admin_token)

        # provisioning images build in the background (pip downloads) while models train
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="image")
        image_jobs = {
            cls: pool.submit(
                build_image,
                load_class(cls),
                out_dir=workdir / "images",
                trust_store=trust_path,
                server_url=server.url,
                mqtt_host="127.0.0.1",
                mqtt_port=broker.port,
                uptane_roots=init.device_roots,
            )
            for cls, _ in CLASS_MIX
        }
        env_jobs = {cls: pool.submit(runtime_env, cls, RUNTIME_CACHE) for cls in own_runtime}
        pool.shutdown(wait=False)

        run.say("3. train, convert per device class, parity-check, sign, upload", bold=True)
        bundles = _build_bundles(run, keys.private_key(key_info.keyid))
        ids: dict[int, dict[str, str]] = {}
        uploaded: dict[Path, str] = {}
        for version, per_class in bundles.items():
            ids[version] = {}
            for cls, path in per_class.items():
                if path not in uploaded:
                    uploaded[path] = admin.upload_bundle(path)["id"]
                ids[version][cls] = uploaded[path]
        run.say(f"  uploaded {len(uploaded)} bundles")
        version = _release(admin, list(uploaded), keys, init.release_keys[: init.threshold])
        run.say(
            f"  released them: image targets v{version} signed by "
            f"{' and '.join(init.release_keys[: init.threshold])}"
        )

        run.say("4. provisioning images and the fleet", bold=True)
        images = {}
        for cls, job in image_jobs.items():
            info = job.result()
            images[cls] = info.directory
            run.say(f"  image {cls} {info.version}: {len(info.wheels)} wheels")
        fleet = Fleet(
            workdir / "fleet", server_url=server.url, mqtt_host="127.0.0.1", mqtt_port=broker.port
        )
        plans, left = [], devices
        for i, (cls, share) in enumerate(CLASS_MIX):
            n = left if i == len(CLASS_MIX) - 1 else max(1, round(devices * share))
            left -= n
            plans.append(ClassPlan(cls, n, images[cls], labels={"site": f"plant-{i % 2 + 1}"}))
        fleet.provision(plans)
        for cls, env_job in env_jobs.items():
            try:
                env = env_job.result()
            except (RuntimeEnvError, OSError) as e:
                run.say(f"  {cls} runs in this process on ai-edge-litert: {e}", fg="yellow")
                continue
            fleet.devices, socket_dir = run_in_own_processes(fleet.devices, cls, env)
            socket_dirs.append(socket_dir)
            result.runtimes[cls] = env.describe()
            run.say(f"  {cls} agents run in processes of their own on {env.describe()}")
        tokens = {
            d.device_id: admin.post(
                "/enrollment-tokens", json={"device_class": d.device_class, "ttl_seconds": 3600}
            )["token"]
            for d in fleet.devices
        }
        fleet.enroll(lambda d: tokens[d.device_id])
        for d in fleet.devices:
            broker.add_user(d.device_id, d.credential())
        broker.reload()
        fleet.start()
        run.say(
            f"  {len(fleet.devices)} devices enrolled and running "
            f"({', '.join(f'{p.count} {p.device_class}' for p in plans)})"
        )

        groups = {
            cls: admin.post("/groups", json={"name": cls, "device_class": cls})["id"]
            for cls, _ in CLASS_MIX
        }

        def rollout(
            version: int, strategy: str, previous: int | None, **extra: Any
        ) -> dict[str, str]:
            out = {}
            for cls, gid in groups.items():
                body: dict[str, Any] = {
                    "name": f"{MODEL} v{version} to {cls}",
                    "bundle_id": ids[version][cls],
                    "group": gid,
                    "strategy": strategy,
                    "start": True,
                    **extra,
                }
                if previous is not None:
                    body["previous_bundle_id"] = ids[previous][cls]
                out[cls] = admin.post("/rollouts", json=body)["id"]
            return out

        run.say("5a. v1 to every device (all at once)", bold=True)
        quick = [{"percent": 100, "min_devices": 1, "soak_seconds": 2}]
        final = _wait(
            run,
            fleet,
            admin,
            rollout(1, "all_at_once", None, gates=[], stages=quick),
            {"succeeded", "rolled_back", "aborted"},
            timeout=180,
        )

        gates = [
            {"kind": "error_rate", "threshold": 0.02, "min_samples": 200},
            # simulated devices share two cores, so latency is noisy: a loose bound, and
            # a floor: the demo's models answer in well under a millisecond, where a busy
            # machine's scheduling alone made a healthy canary's p95 24 times its control's
            {
                "kind": "latency_p95_ratio",
                "threshold": 10.0,
                "min_samples": 200,
                "floor_ms": 5.0,
            },
            {
                "kind": "prediction_shift",
                "threshold": 0.15,
                "min_samples": 200,
                "against": "control",
                "metric": "js",
            },
            {"kind": "install_failure_rate", "threshold": 0.2, "min_samples": 1},
        ]
        stages = [
            {"percent": p, "min_devices": 1, "soak_seconds": 6 if p < 100 else 0}
            for p in stage_percents
        ]
        plan = " -> ".join(f"{p:g}%" for p in stage_percents)
        run.say(f"5b. v2 (healthy) by staged canary {plan}, gated", bold=True)
        final = _wait(
            run,
            fleet,
            admin,
            rollout(2, "staged_canary", 1, stages=stages, gates=gates, failure_policy="rollback"),
            {"succeeded", "rolled_back", "aborted"},
            # about 40-70 s on a quiet machine; 272 s for the slowest class at load 15-18
            timeout=600,
        )
        result.good = {cls: r["status"] for cls, r in final.items()}
        ok2 = all(r["status"] == "succeeded" for r in final.values())
        run.say(
            f"  v2 rollout: {'completed on every group' if ok2 else final}",
            fg="green" if ok2 else "red",
        )

        run.say("5c. v3 (label-mapping bug) by staged canary, gated", bold=True)
        r3 = rollout(3, "staged_canary", 2, stages=stages, gates=gates, failure_policy="rollback")
        final = _wait(run, fleet, admin, r3, {"succeeded", "rolled_back", "aborted"}, timeout=600)
        result.bad = {cls: r["status"] for cls, r in final.items()}
        for cls, r in final.items():
            if r["status"] == "rolled_back":
                result.caught_by[cls] = _gate_that_caught(admin, r3[cls])
                run.say(
                    f"  {cls}: v3 ROLLED BACK automatically; caught by {result.caught_by[cls]}",
                    fg="yellow",
                )
            else:
                run.say(f"  {cls}: v3 ended {r['status']}", fg="red")
        target = max(v for v in fleet.versions() if v is not None)
        fleet.drive(45, calls_per_second=20.0, on_tick=lambda _: set(fleet.versions()) == {target})
        result.final_versions = dict(fleet.versions())
        counts = ", ".join(f"v{v}: {n}" for v, n in sorted(fleet.versions().items(), key=str))
        run.say(
            f"  devices now run {counts}: the rollback was the director instructing v2's "
            "release again; no key signed anything for it"
        )
    finally:
        if fleet is not None:
            fleet.stop()
        for socket_dir in socket_dirs:
            shutil.rmtree(socket_dir, ignore_errors=True)
        server.stop()
        broker.stop()

    run.say("6. telemetry review", bold=True)
    report = workdir / "report.html"
    subprocess.run(
        [
            sys.executable,
            "-c",
            "from fleet_server.cli import main; main()",
            "report",
            "--since",
            "1h",
            "--out",
            str(report),
            "--json",
            str(workdir / "report.json"),
            "--database-url",
            f"sqlite:///{workdir / 'server' / 'edgefleet.db'}",
        ],
        check=True,
    )
    result.seconds = time.monotonic() - run.started
    run.say(
        f"done in {result.seconds:.0f}s; open the report: {report.resolve()}", bold=True, fg="green"
    )
    return result
