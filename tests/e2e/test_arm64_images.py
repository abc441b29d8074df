"""The aarch64 images on aarch64 (QEMU user emulation of an arm64 Debian root).

For ``aarch64-board`` (ai-edge-litert, numpy 2) and ``aarch64-legacy`` (tflite-runtime 2.14,
numpy 1): the image is built on this x86-64 machine with ``edgefleet image build``, installed
inside the arm64 root with no package index and no network, enrolled against a real server
process on this machine; the device receives the class's TFLite int8 bundle through a
rollout and installs it through the full update path (verify, stage, smoke test, switch),
serves predictions on its local endpoint that match the same bundle run on x86-64 within the
bundle's parity tolerance, and sends telemetry through Mosquitto that the server ingests.

The arm64 root is built once and cached outside the checkout (tests/arm64.py). Timings of the
emulated steps are written to ``$EDGEFLEET_TEST_CACHE/arm64-timings-<class>.json`` and printed:
they are EMULATED, not board speed.
"""

from __future__ import annotations

import json
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from converters.keys import KeyStore
from converters.parity import Tolerance
from device_agent.bundle import TrustStore, unpack_bundle
from device_agent.model import load_model
from device_agent.serving.client import ServingClient
from fleet_server.broker.mosquitto import SERVER_USER, LocalMosquitto
from fleet_server.cli import main as cli_main
from fleet_server.client import AdminClient
from fleet_server.demo.services import ServerProcess
from tests.arm64 import (
    CACHE_DIR,
    FIXTURE_VERSION,
    SUITE,
    Arm64Root,
    cached_root,
    cpuinfo_text,
    device_root,
    root_key,
    root_record,
)

pytestmark = pytest.mark.slow

MODEL = "condition-arm"
PREFIX, CONF, STATE = "/opt/edgefleet", "/etc/edgefleet", "/var/lib/edgefleet-agent"
CLASSES = {
    # class: (runtime module imported on the device, numpy major)
    # ai-edge-litert 2.3.0 reads /proc/cpuinfo when an Interpreter is created and crashed
    # (SIGSEGV in cpuinfo_arm_linux_init) on the x86-64 one qemu-user 7.2 passes through;
    # the root now shows an aarch64 one (tests/arm64.py, cpuinfo_text), as a board does
    "aarch64-board": ("ai_edge_litert.interpreter", 2),
    "aarch64-legacy": ("tflite_runtime.interpreter", 1),
}


@dataclass
class Release:
    root: Path
    trust: Path
    keyid: str
    bundle: Path
    tolerance: Tolerance
    samples: np.ndarray


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Release:
    """Release key, trust root, and one TFLite int8 bundle for both aarch64 classes."""
    from converters.pipeline import build_bundles
    from converters.source import from_torch
    from converters.targets import parse_target
    from fleet_server.demo.model import train

    root = tmp_path_factory.mktemp("arm-release")
    keys = KeyStore(root / "keys")
    info = keys.generate("release")
    trust = TrustStore()
    trust.add(keys.public_key(info.keyid))
    trust.save(root / "trust.json")
    module, calib = train(7, steps=150)
    source = from_torch(
        module, calib[:8], input_names=["x"], output_names=["probs"], task="classification"
    )
    (result,) = build_bundles(
        source,
        [parse_target("tflite:int8-dynamic", tuple(CLASSES))],
        root / "bundles",
        name=MODEL,
        version=1,
        signing_key=keys.private_key(info.keyid),
        samples=calib,
        reference_samples=calib,
    )
    assert result.bundle is not None and result.artifact is not None, result.error
    rng = np.random.default_rng(5)
    samples = calib[rng.choice(len(calib), size=24, replace=False)]
    return Release(
        root,
        root / "trust.json",
        info.keyid,
        result.bundle,
        result.artifact.parity.tolerance,
        samples,
    )


def _x86_reference(release: Release, tmp: Path) -> list[np.ndarray]:
    """The same bundle, verified and run here on x86-64, one sample per call."""
    trust = TrustStore.load(release.trust)
    slot = tmp / "x86-slot"
    unpack_bundle(release.bundle, slot, trust)
    model = load_model(slot, "a")
    return [model.run({"x": release.samples[i : i + 1]})[0] for i in range(len(release.samples))]


def _within(got: np.ndarray, ref: np.ndarray, tol: Tolerance) -> tuple[bool, float, float]:
    """The parity check's elementwise rule (converters.parity.Tolerance) on one batch."""
    err = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    absref = np.abs(ref.astype(np.float64))
    bound = np.zeros_like(absref)
    if tol.atol is not None:
        bound += tol.atol
    if tol.scaled_atol is not None:
        bound += tol.scaled_atol * max(1.0, float(absref.max()))
    if tol.rtol is not None:
        bound += tol.rtol * absref
    if tol.range_atol is not None:
        bound += tol.range_atol * float(ref.max() - ref.min())
    return bool(np.all(err <= bound)), float(err.max()), float(bound.min())


@dataclass
class Services:
    broker: LocalMosquitto
    server: ServerProcess
    admin: AdminClient


@pytest.fixture
def services(tmp_path: Path, release: Release) -> Iterator[Services]:
    broker = LocalMosquitto(tmp_path / "broker")
    broker.add_user(SERVER_USER, "server-pw")
    broker.start()
    admin_token = "arm-admin-" + secrets.token_urlsafe(24)
    server = ServerProcess(
        tmp_path / "server",
        {
            "environment": "development",
            "database_url": f"sqlite:///{tmp_path / 'server.db'}",
            "bundle_dir": str(tmp_path / "bundles"),
            "trust_store": str(release.trust),
            "admin_bootstrap_token": admin_token,
            "mqtt_host": "127.0.0.1",
            "mqtt_port": str(broker.port),
            "mqtt_username": SERVER_USER,
            "mqtt_password": "server-pw",
            "telemetry_window_seconds": "1",
            "rollout_interval_seconds": "1",
            "assignment_cache_seconds": "0.5",
        },
    )
    try:
        server.start()
        yield Services(broker, server, AdminClient(server.url, admin_token))
    finally:
        server.stop()
        broker.stop()


def _check(out: Any, what: str) -> None:
    assert out.returncode == 0, (
        f"{what} failed (exit {out.returncode}):\n{out.stdout}\n{out.stderr}"
    )


def _stderr_tail(proc: Any) -> str:
    if proc.poll() is None or proc.stderr is None:
        return "(agent still running)"
    return str(proc.stderr.read().decode(errors="replace")[-3000:])


def test_cached_arm64_root_runs_aarch64_python_outside_the_checkout() -> None:
    """The fixture: built once (keyed by its inputs), kept outside the git checkout."""
    path = cached_root()
    checkout = Path(__file__).resolve().parents[2]
    assert not path.resolve().is_relative_to(checkout), path
    assert path.name == f"arm64-root-{root_key()}"
    record = root_record(path)
    assert record["suite"] == SUITE and record["fixture_version"] == FIXTURE_VERSION
    out = Arm64Root(path).run(
        [
            "python3",
            "-c",
            "import os, platform, socket, sys; "
            "print(platform.machine(), '%d.%d' % sys.version_info[:2], "
            "os.confstr('CS_GNU_LIBC_VERSION'), socket.if_nameindex()); "
            "print(open('/proc/cpuinfo').read())",
        ],
        network=False,
        timeout=300,
    )
    _check(out, "python3 in the arm64 root")
    # no network: the namespace holds the loopback interface only
    assert out.stdout.split()[:4] == ["aarch64", "3.11", "glibc", "2.36"], out.stdout
    first, _, cpuinfo = out.stdout.partition("\n")
    assert "'lo'" in first and first.count("(") == 1, first
    # the emulated board's /proc/cpuinfo (an aarch64 core), not the x86-64 host's
    assert cpuinfo == cpuinfo_text() + "\n", cpuinfo[:500]
    assert "CPU part" in cpuinfo and "vendor_id" not in cpuinfo, cpuinfo[:500]


@pytest.mark.timeout(3600)  # emulated: pip installing numpy and the runtime takes minutes
@pytest.mark.parametrize("device_class", list(CLASSES))
def test_aarch64_image_installs_offline_enrolls_updates_and_serves_under_emulation(
    device_class: str, tmp_path: Path, release: Release, services: Services
) -> None:
    runtime_module, numpy_major = CLASSES[device_class]
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    root: Arm64Root = device_root(tmp_path / "arm64-root")
    timings["root_copy_s"] = time.monotonic() - t0
    record = root_record(root.path)

    # 1. build the class's image here on x86-64, as an operator would
    t0 = time.monotonic()
    images = tmp_path / "images"
    result = CliRunner().invoke(
        cli_main,
        [
            "image",
            "build",
            device_class,
            "--trust-store",
            str(release.trust),
            "--out",
            str(images),
            "--server-url",
            services.server.url,
            "--mqtt-host",
            "127.0.0.1",
            "--mqtt-port",
            str(services.broker.port),
        ],
    )
    assert result.exit_code == 0, result.output
    timings["image_build_s"] = time.monotonic() - t0
    (image_dir,) = [p for p in (images / device_class).iterdir() if p.is_dir()]
    meta = json.loads((image_dir / "image.json").read_text())
    assert meta["architecture"] == "aarch64"

    # 2. install inside the arm64 root: no package index, no network
    shutil.copytree(image_dir, root.host_path("/opt/image"))
    t0 = time.monotonic()
    out = root.run(
        ["sh", "/opt/image/install.sh", PREFIX, CONF, STATE],
        network=False,
        env={"EDGEFLEET_NO_SYSTEMD": "1", "PIP_NO_INDEX": "1"},
        timeout=1800,
    )
    _check(out, "offline install in the arm64 root")
    timings["offline_install_s"] = time.monotonic() - t0
    probe = root.run(
        [
            f"{PREFIX}/venv/bin/python",
            "-c",
            f"import json, os, platform, numpy, {runtime_module}; "
            "print(json.dumps([platform.machine(), numpy.__version__, "
            "os.confstr('CS_GNU_LIBC_VERSION')]))",
        ],
        network=False,
        timeout=600,
    )
    _check(probe, "importing the runtime on the device")
    machine, np_version, libc = json.loads(probe.stdout.strip().splitlines()[-1])
    assert machine == "aarch64" and libc.startswith("glibc 2.36"), (machine, libc)
    assert np_version.startswith(f"{numpy_major}."), np_version

    # 3. first boot: enroll with a one-time token against the real server
    admin = services.admin
    bundle = admin.upload_bundle(release.bundle)
    group = admin.post("/groups", json={"name": "boards", "device_class": device_class})
    token = admin.post("/enrollment-tokens", json={"device_class": device_class})
    root.host_path(f"{CONF}/enrollment-token").write_text(token["token"])
    t0 = time.monotonic()
    first = root.run([f"{PREFIX}/firstboot.sh"], timeout=600)
    _check(first, "first boot (enrollment) in the arm64 root")
    timings["enroll_s"] = time.monotonic() - t0
    assert not root.host_path(f"{CONF}/enrollment-token").exists()
    device_id = json.loads(root.host_path(f"{STATE}/identity.json").read_text())["device_id"]
    services.broker.add_user(
        device_id, root.host_path(f"{CONF}/device-credential").read_text().strip()
    )
    services.broker.reload()
    admin.post(
        "/rollouts",
        json={
            "name": f"{MODEL} on {device_class}",
            "bundle_id": bundle["id"],
            "group": group["id"],
            "strategy": "all_at_once",
            "gates": [],
            "start": True,
            "stages": [{"percent": 100, "soak_seconds": 0}],
        },
    )

    # 4. the agent runs on aarch64, receives the bundle and installs it (full update path)
    socket_host = root.host_path(f"{STATE}/serving.sock")
    t_start = time.monotonic()
    agent = root.popen(
        [f"{PREFIX}/venv/bin/edgefleet-agent", "--config", f"{CONF}/agent.toml", "run"],
        env={
            "EDGEFLEET_AGENT_SERVER_POLL_SECONDS": "1",
            "EDGEFLEET_AGENT_UPDATE_PROBATION_SECONDS": "0",
            "EDGEFLEET_AGENT_TELEMETRY_WINDOW_SECONDS": "1",
            "EDGEFLEET_AGENT_TELEMETRY_SAMPLE_RATE": "1.0",
        },
        stdout=open(tmp_path / "agent.out", "wb"),  # noqa: SIM115 - closed with the process
        stderr=open(tmp_path / "agent.err", "wb"),  # noqa: SIM115
    )
    # a short path to the socket: AF_UNIX paths are limited to 108 bytes
    link_dir = Path(tempfile.mkdtemp(prefix="ef-arm-"))
    (link_dir / "s").symlink_to(root.host_path(STATE))
    try:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline and agent.poll() is None:
            if socket_host.exists():
                break
            time.sleep(0.2)
        assert socket_host.exists(), (tmp_path / "agent.err").read_text()[-3000:]
        timings["agent_start_s"] = time.monotonic() - t_start
        t_wait = time.monotonic()
        active: dict[str, Any] = {}
        while time.monotonic() < deadline and agent.poll() is None:
            path = root.host_path(f"{STATE}/active.json")
            if path.exists():
                try:
                    active = json.loads(path.read_text())
                except ValueError:
                    active = {}
                if active.get("version") == 1:
                    break
            time.sleep(0.3)
        assert active.get("version") == 1, (active, (tmp_path / "agent.err").read_text()[-3000:])
        timings["bundle_install_s"] = time.monotonic() - t_wait
        update = json.loads(root.host_path(f"{STATE}/update.json").read_text())
        assert update.get("error") is None, update

        # 5. predictions on the device's local endpoint match x86-64 within the tolerance
        client = ServingClient(link_dir / "s" / "serving.sock", timeout=300)
        ready_deadline = time.monotonic() + 300
        while not client.ready() and time.monotonic() < ready_deadline:
            time.sleep(0.5)
        assert client.ready(), (tmp_path / "agent.err").read_text()[-3000:]
        reference = _x86_reference(release, tmp_path)
        got: list[np.ndarray] = []
        t0 = time.monotonic()
        for i in range(len(release.samples)):
            got.append(client.predict({"x": release.samples[i : i + 1]})[0])
        timings["predict_ms_per_call"] = 1000 * (time.monotonic() - t0) / len(got)
        client.close()
        device_out, ref_out = np.concatenate(got), np.concatenate(reference)
        ok, worst, bound = _within(device_out, ref_out, release.tolerance)
        assert ok, (
            f"aarch64 differs from x86-64 by {worst} (bound {bound}) under {release.tolerance}"
        )
        top1 = float(np.mean(device_out.argmax(-1) == ref_out.argmax(-1)))
        assert release.tolerance.min_top1 is None or top1 >= release.tolerance.min_top1, top1

        # 6. telemetry crosses Mosquitto and the server ingests it
        t0 = time.monotonic()
        report: dict[str, Any] = {}
        tel_deadline = time.monotonic() + 300
        while time.monotonic() < tel_deadline and agent.poll() is None:
            report = admin.get(
                "/telemetry", params={"name": MODEL, "version": 1, "group": group["id"]}
            )
            if (report["summary"].get("inferences") or 0) >= len(got):
                break
            time.sleep(1)
        assert (report.get("summary", {}).get("inferences") or 0) >= len(got), (
            report,
            (tmp_path / "agent.err").read_text()[-3000:],
        )
        timings["telemetry_visible_s"] = time.monotonic() - t0
        device = admin.get(f"/devices/{device_id}")
        assert device["device_class"] == device_class
        assert (device["current_name"], device["current_version"]) == (MODEL, 1), device
    finally:
        agent.terminate()
        try:
            agent.wait(60)
        except Exception:  # noqa: BLE001 - the emulated agent did not stop in time
            agent.kill()
            agent.wait(30)
        shutil.rmtree(link_dir, ignore_errors=True)

    timings = {k: round(v, 2) for k, v in timings.items()}
    record_out = {
        "device_class": device_class,
        "emulated": "qemu-aarch64-static user emulation on x86-64 (NOT board speed)",
        "root": {k: record[k] for k in ("suite", "build_seconds") if k in record},
        "timings": timings,
        "update": {k: update.get(k) for k in ("state", "mode", "error")},
        "installs": report.get("installs"),
        "parity": {"max_abs_diff_vs_x86": worst, "top1_agreement": top1},
    }
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    (CACHE_DIR / f"arm64-timings-{device_class}.json").write_text(
        json.dumps(record_out, indent=2) + "\n"
    )
    print(json.dumps(record_out, indent=2))  # the figures for the README
