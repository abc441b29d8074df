"""Crash table, repeated: kill -9 at the same state on every start until the loop is caught.

Each row starts the updater in a child process (this module is the child's entry
point) that SIGKILLs itself whenever it persists the named state, again and
again on the same state directory. With ``update.max_restarts_per_state = 1``
the first start and one restart die; the next start finds the state's restart
count over the limit, fails the update with ``state_loop`` through the state's
failure event (rolling back when the new model was already switched in), and
ends idle. The test asserts the device then serves the expected verified model
and that the server received the ``state_loop`` report.
"""

from __future__ import annotations

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
from device_agent.update.updater import Updater
from tests.bundlesim import BundleSim
from tests.device_agent.update.test_crash import assert_active_slot_verified
from tests.httpfixtures import SMOKE_INPUT, BundleServer, ServingHost, publish, reference_outputs

ROOT = Path(__file__).resolve().parents[3]
LIMIT = 1


def child_main(state_dir: str, trust_file: str, url: str) -> None:
    host = ServingHost()
    updater = Updater(
        state_dir,
        TrustStore.load(trust_file),
        host,
        config=UpdateConfig(probation_seconds=0.2, max_restarts_per_state=LIMIT),
        fetcher=HttpFetcher(url, sleep=lambda s: None, timeout=10),
        error_rate_since=host.error_rate_since,
        crash_at=os.environ.get("EDGEFLEET_AGENT_CRASH_AT") or None,
    )
    updater.boot()
    updater.check()
    deadline = time.monotonic() + 30
    while updater.state.value != "idle" and time.monotonic() < deadline:
        host.predict(SMOKE_INPUT)
        updater.tick()
        time.sleep(0.01)
    out = np.asarray(host.predict(SMOKE_INPUT)).tolist() if host.active is not None else None
    print(json.dumps({"history": updater.history, "state": updater.state.value, "output": out}))


@dataclass(frozen=True)
class Row:
    crash_at: str
    serves: int  # the version the device serves at the end
    report_state: str  # the state the state_loop report names


TABLE = [
    Row("verifying", 1, "verify_failed"),
    Row("smoke_testing", 1, "smoke_failed"),  # a smoke test that kills the process
    Row("probation", 1, "probation_failed"),  # the new model was switched in: rolled back
]


@pytest.fixture(scope="module")
def server() -> Iterator[BundleServer]:
    srv = BundleServer().start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("loop-repo")
    sim = BundleSim(root)
    trust_file = root / "trust.json"
    sim.trust("release").save(trust_file)
    return {
        "sim": sim,
        "trust": trust_file,
        "v1": publish(sim, version=1, seed=1),
        "v2": publish(sim, version=2, seed=2),
    }


def spawn(
    state_dir: Path, trust: Path, url: str, crash_at: str
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EDGEFLEET_AGENT_CRASH_AT": crash_at}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.device_agent.update.test_crash_loop",
            str(state_dir),
            str(trust),
            url,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )


@pytest.mark.parametrize("row", TABLE, ids=[r.crash_at for r in TABLE])
def test_crash_repeating_at_state_ends_in_state_loop(
    row: Row, tmp_path: Path, server: BundleServer, bundles: dict[str, Any]
) -> None:
    state_dir = tmp_path / "state"
    trust = TrustStore.load(bundles["trust"])
    setup = Updater(state_dir, trust, ServingHost())
    setup.install_file(bundles["v1"], probation=False)
    setup.unlock()
    server.reports.clear()
    server.offer(bundles["v2"], version=2, bundle_id=f"loop-{row.crash_at}")

    for start in range(LIMIT + 1):  # the first start and LIMIT restarts die in the state
        proc = spawn(state_dir, bundles["trust"], server.url, row.crash_at)
        assert proc.returncode == -signal.SIGKILL, (start, proc.stdout, proc.stderr[-3000:])
        record = json.loads((state_dir / "update.json").read_text())
        assert record["state"] == row.crash_at
    proc = spawn(state_dir, bundles["trust"], server.url, row.crash_at)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["state"] == "idle"
    assert result["history"][0] != row.crash_at  # the loop was caught before redoing it

    assert assert_active_slot_verified(state_dir, trust) == row.serves
    assert np.allclose(result["output"], reference_outputs(row.serves), atol=1e-6)
    loops = [r for r in server.reports if r.get("error_code") == "state_loop"]
    assert loops, server.reports
    assert loops[0]["state"] == row.report_state, loops
    # the bundle is not retried while the assignment stays the same
    record = json.loads((state_dir / "update.json").read_text())
    assert "state_loop" in record["failed"].values() or row.crash_at == "committed"


if __name__ == "__main__":
    child_main(*sys.argv[1:4])
