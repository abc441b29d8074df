"""Crash-injection table: kill -9 the updater at each state, restart, check the device.

Each row runs the update in a child process (this module is also the child's
entry point: ``python -m tests.device_agent.update.test_crash``). The child SIGKILLs itself
right after persisting the named state (``EDGEFLEET_AGENT_CRASH_AT=<state>``) or,
for ``<state>.after``, right after that state's side effect and before the next
state is persisted; one row is killed by the parent in the middle of the
download body. Then a second child starts on the same state directory with no
crash point. The test asserts:

* the killed child died by SIGKILL with the named state persisted;
* the restarted child resumed in the state the machine's ``restart`` row
  declares, and ended idle;
* the active slot holds a verified bundle (signature and every file's hash);
* predict works and returns the expected model's outputs.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_agent.bundle import TrustStore
from device_agent.config import UpdateConfig
from device_agent.update.fetch import HttpFetcher
from device_agent.update.machine import restart_state
from device_agent.update.slots import Slots
from device_agent.update.updater import Updater
from tests.bundlesim import BundleSim, replace_data, rewrite, tiny_onnx_model
from tests.httpfixtures import (
    SMOKE_INPUT,
    BundleServer,
    Fault,
    ServingHost,
    publish,
    reference_outputs,
)

ROOT = Path(__file__).resolve().parents[3]
BAD_INPUT = np.zeros((1, 7), np.float32)


# -- the child process ------------------------------------------------------------------


def child_main(state_dir: str, trust_file: str, url: str, traffic: str) -> None:
    host = ServingHost()
    updater = Updater(
        state_dir,
        TrustStore.load(trust_file),
        host,
        config=UpdateConfig(
            probation_seconds=0.3, probation_min_predictions=5, probation_max_error_rate=0.2
        ),
        fetcher=HttpFetcher(url, sleep=lambda s: None, timeout=10),
        error_rate_since=host.error_rate_since,
        crash_at=os.environ.get("EDGEFLEET_AGENT_CRASH_AT") or None,
    )
    updater.boot()
    updater.check()
    deadline = time.monotonic() + 60
    while updater.state.value != "idle" and time.monotonic() < deadline:
        with contextlib.suppress(Exception):  # bad traffic is the point
            host.predict(SMOKE_INPUT if traffic == "good" else BAD_INPUT)
        updater.tick()
        time.sleep(0.01)
    out = np.asarray(host.predict(SMOKE_INPUT)).tolist() if host.active is not None else None
    print(json.dumps({"history": updater.history, "state": updater.state.value, "output": out}))


# -- the table ------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    crash_at: str
    scenario: str  # good | tampered | smoke | probation | endless | shadow
    serves: int  # seed/version of the model the device must serve at the end


GOOD = [
    Row(s, "good", 2)
    for s in (
        "checking",
        "downloading",
        "downloading.mid",
        "verifying",
        "staging",
        "staging.after",
        "smoke_testing",
        "smoke_testing.after",
        "switching",
        "switching.after",
        "probation",
        "committed",
        "committed.after",
    )
]
FAILURES = [
    Row("verify_failed", "tampered", 1),
    Row("smoke_failed", "smoke", 1),
    Row("download_failed", "endless", 1),
    Row("probation_failed", "probation", 1),
    Row("rolling_back", "probation", 1),
    Row("rolling_back.after", "probation", 1),
    Row("rolled_back", "probation", 1),
    Row("shadow_loading", "shadow", 1),
    Row("shadow_started", "shadow", 1),
]
TABLE = GOOD + FAILURES


@pytest.fixture(scope="module")
def server() -> Iterator[BundleServer]:
    srv = BundleServer().start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("crash-repo")
    sim = BundleSim(root)
    v2 = publish(sim, version=2, seed=2)
    trust_file = root / "trust.json"
    sim.trust("release").save(trust_file)
    return {
        "sim": sim,
        "trust": trust_file,
        "v1": publish(sim, version=1, seed=1),
        "good": v2,
        "tampered": rewrite(
            v2, root / "tampered.efb", lambda ms: replace_data(ms, "model.onnx", tiny_onnx_model(5))
        ),
        "smoke": publish(sim, version=2, seed=2, smoke="mismatch"),
    }


def spawn(
    state_dir: Path, trust: Path, url: str, traffic: str, crash_at: str | None
) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k != "EDGEFLEET_AGENT_CRASH_AT"}
    if crash_at:
        env["EDGEFLEET_AGENT_CRASH_AT"] = crash_at
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.device_agent.update.test_crash",
            str(state_dir),
            str(trust),
            url,
            traffic,
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def kill_mid_download(proc: subprocess.Popen[str], downloads: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        parts = list(downloads.glob("*.part")) if downloads.exists() else []
        if parts and parts[0].stat().st_size > 0:
            proc.send_signal(signal.SIGKILL)
            return
        if proc.poll() is not None:
            break
        time.sleep(0.002)
    raise AssertionError(f"the child never wrote a partial download: {proc.communicate()}")


@pytest.mark.parametrize("row", TABLE, ids=[f"{r.crash_at}-{r.scenario}" for r in TABLE])
def test_crash_at_state_then_restart(
    row: Row, tmp_path: Path, server: BundleServer, bundles: dict[str, Any]
) -> None:
    state_dir = tmp_path / "state"
    trust = TrustStore.load(bundles["trust"])
    setup = Updater(state_dir, trust, ServingHost())
    setup.install_file(bundles["v1"], probation=False)
    setup.unlock()

    scenario = row.scenario
    offered: Path = (
        bundles["good"]
        if scenario in ("good", "probation", "endless", "shadow")
        else bundles[scenario]
    )
    server.faults.clear()
    if scenario == "shadow":
        doc = server.offer(bundles["v1"], version=1, shadow=bundles["good"], shadow_version=2)
    else:
        doc = server.offer(
            offered,
            version=2,
            bundle_id=f"b-{row.crash_at}-{scenario}",
            size=64 * 1024 if scenario == "endless" else None,
        )
    bid = doc["desired"]["bundle_id"]
    if scenario == "endless":
        server.faults[bid] = Fault(endless=True)
    if row.crash_at == "downloading.mid":
        server.faults[bid] = Fault(slow_seconds=0.05)
    server.chunk = 1024 if row.crash_at == "downloading.mid" else 4096
    traffic = "bad" if scenario == "probation" else "good"

    # 1. run until the crash
    if row.crash_at == "downloading.mid":
        proc = spawn(state_dir, bundles["trust"], server.url, traffic, None)
        kill_mid_download(proc, state_dir / "downloads")
        proc.communicate(timeout=30)
        crashed_in = "downloading"
    else:
        proc = spawn(state_dir, bundles["trust"], server.url, traffic, row.crash_at)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL, (out, err)
        crashed_in = row.crash_at.removesuffix(".after")
    assert proc.returncode == -signal.SIGKILL
    persisted = json.loads((state_dir / "update.json").read_text())["state"]
    assert persisted == crashed_in

    # the device boots into a verified model whatever the crash left behind
    assert_active_slot_verified(state_dir, trust)

    # 2. restart with no crash point
    server.chunk = 4096
    if row.crash_at == "downloading.mid":
        server.faults.pop(bid, None)
    proc = spawn(state_dir, bundles["trust"], server.url, traffic, None)
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["history"][0] == restart_state(crashed_in).state.value  # the declared row
    assert result["state"] == "idle"

    version = assert_active_slot_verified(state_dir, trust)
    assert version == row.serves
    assert np.allclose(result["output"], reference_outputs(row.serves), atol=1e-6)
    if row.crash_at == "downloading.mid":
        ranges = [r.headers.get("Range") for r in server.bundle_requests(bid)]
        print(ranges, [(r.path, r.status, r.sent) for r in server.requests[-6:]])
        assert ranges[0] is None and ranges[-1] is not None and ranges[-1] != "bytes=0-"
    if scenario == "shadow":
        shadow = Slots(state_dir).shadow()
        assert shadow is not None and shadow["version"] == 2


def assert_active_slot_verified(state_dir: Path, trust: TrustStore) -> int:
    slots = Slots(state_dir)
    ptr = slots.active()
    assert ptr is not None
    manifest = slots.verify(ptr.slot, trust)  # signature + every file's sha256 and size
    assert manifest.version == ptr.version
    return manifest.version


if __name__ == "__main__":
    child_main(*sys.argv[1:5])
