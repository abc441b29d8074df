"""The README's "The first hour", run exactly as written.

The bash block under ``## The first hour`` in README.md is taken verbatim and run in a
fresh temporary directory (only the ports 8000 and 1883 are replaced by free ones): the
Uptane roots and release keys, a real server process with a broker beside it, the bootstrap
token traded for a personal operator token, a group, two real ``edgefleet-agent`` processes
enrolled into it, a model built, signed, uploaded and released by two release keys, v1
everywhere, v2 by staged canary watched until its gate pauses it (the canary refuses a
release for another class), the rollback by director instruction, the devices back on v1,
and the report.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.server_fixtures import free_port

ROOT = Path(__file__).resolve().parents[2]
WANT = {"dev-1": ("condition", 1), "dev-2": ("condition", 1)}
BUDGET_SECONDS = 360  # the run itself: 2 to 4 minutes on this 2-core machine, by its load


def first_hour_block(readme: str) -> str:
    """The first bash block of the README's "## The first hour" section."""
    section = readme.split("\n## The first hour\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```bash\n(.*?)\n```", section, re.S)
    assert match, "the first-hour section has no bash block"
    return match.group(1) + "\n"


def test_the_first_hour_as_the_readme_says(tmp_path: Path) -> None:
    block = first_hour_block((ROOT / "README.md").read_text())
    assert "8000" in block and "1883" in block
    server_port, broker_port = free_port(), free_port()
    script = tmp_path / "first-hour.sh"
    script.write_text(block.replace("8000", str(server_port)).replace("1883", str(broker_port)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["HOME"] = str(tmp_path / "home")  # nothing from the user's own configuration
    started = time.monotonic()
    log = tmp_path / "first-hour.out"
    with open(log, "w") as out:  # a file, not a pipe: the background server and agents
        proc = subprocess.Popen(  # keep their copy of stdout open after the script ends
            ["bash", "-e", "-o", "pipefail", str(script)],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # the server and agents it starts share this group
        )
    work = tmp_path / "first-hour"
    try:
        try:
            proc.wait(timeout=BUDGET_SECONDS)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise AssertionError(
                f"the first hour took over {BUDGET_SECONDS} s:\n{log.read_text()[-6000:]}"
            ) from None
        elapsed = time.monotonic() - started
        output = log.read_text()
        # the rollback reaches the canary within a few of its 2 s polls
        running = _running(work / "edgefleet.db", want=WANT, timeout=20)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # the background server and agents
    logs = "\n".join(
        f"--- {p.relative_to(tmp_path)}\n{p.read_text()[-3000:]}"
        for p in [work / "server.log", *sorted(work.glob("dev-*/agent.log"))]
        if p.is_file()
    )
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{output[-8000:]}\n{logs}"
    print(f"first hour: {elapsed:.1f} s")

    # the personal token is alice's, not the bootstrap admin's
    assert re.search(r"op-\w+\s+alice\s+admin\n", output), output
    # both devices enrolled into the group
    assert re.search(r"gateways\s+group=gateways\s+x86_64-gateway\s+2\n", output), output
    # v1 went everywhere
    assert "condition v1" in output and "finished: every stage passed" in output
    # the live picture of v2: the stage, the refusal with its code, count and message,
    # what holds it and what to do
    assert "status     paused, stage 1 of 1, strategy staged_canary" in output, output
    assert re.search(r"wrong_device_class\s+1 device\(s\): dev-1\n", output), output
    assert "is for aarch64-board, not this 'x86_64-gateway' device" in output
    assert "paused: engine: gate breached: install_failure_rate" in output, output
    assert re.search(
        r"install_failure_rate\s+BREACH\s+1 vs threshold 0\.1\s+\(1 of 1 installs", output
    )
    assert "edgefleet rollout resume|promote|abort|rollback r-" in output
    # rolled back: the director instructs v1's release again, nothing re-published
    assert "rolled back: the group returns to the previous model (condition v1)" in output
    devices = output.split("devices list", 1)[-1] if "devices list" in output else output
    running = re.findall(
        r"^(dev-[12])\s+x86_64-gateway\s+\S+\s+.+?UTC\s+(\S+)\s+(\S+)", devices, re.M
    )
    assert running, output
    report = work / "report.html"
    assert report.is_file() and report.stat().st_size > 10_000
    assert "stage 0" not in output  # one numbering: stages count from 1


def _running(db: Path, want: dict[str, tuple[str, int]], timeout: float) -> dict[str, Any]:
    """device id -> (model, version) it reports running, once that is ``want``."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.closing(sqlite3.connect(db)) as conn:
            rows = conn.execute("SELECT id, current_name, current_version FROM devices").fetchall()
        running = {d: (n, v) for d, n, v in rows}
        if running == want or time.monotonic() > deadline:
            return running
        time.sleep(0.5)
