"""The device agent installs and runs without the server's or converters' stacks.

A separate virtual environment gets only ``edgefleet[agent-onnx]`` (the base
dependencies plus onnxruntime). In it, a real signed bundle is verified,
installed into a slot and run, and FastAPI, onnx, torch and scikit-learn are
shown to be absent.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from device_agent.bundle.manifest import format_time
from tests.bundlesim import NOW, BundleSim
from tests.envs import ROOT, cached_venv, run_in

SCRIPT = r"""
import importlib.util, json, sys
from datetime import datetime, timezone
from pathlib import Path
import numpy as np
from device_agent.bundle import TrustStore, unpack_bundle
from device_agent.model import load_model

bundle, trust, dest, at = sys.argv[1:5]
now = datetime.strptime(at, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
v = unpack_bundle(bundle, dest, TrustStore.load(trust), now=now)
m = load_model(dest, "a")
out = m.run({"x": np.ones((2, 4), np.float32)})[0]
absent = {name: importlib.util.find_spec(name) is None
          for name in ("fastapi", "onnx", "torch", "sklearn", "sqlalchemy", "skl2onnx")}
print(json.dumps({"version": v.manifest.version, "shape": list(out.shape),
                  "row_sums": [round(float(s), 5) for s in out.sum(axis=1)],
                  "absent": absent,
                  "loaded": sorted(k for k in sys.modules
                                   if k.split(".")[0] in ("fastapi", "onnx", "torch", "sklearn"))}))
"""


@pytest.fixture(scope="module")
def agent_python() -> Path:
    return cached_venv("agent-only", [f"{ROOT}[agent-onnx]"], key_files=(ROOT / "pyproject.toml",))


def test_agent_runs_without_server_or_converter_dependencies(
    agent_python: Path, sim: BundleSim, tmp_path: Path
) -> None:
    # the venv holds a copy of the package as of its creation; refresh the agent's code
    # so the test exercises this checkout
    import subprocess

    subprocess.run(
        [
            str(agent_python),
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--force-reinstall",
            str(ROOT),
        ],
        check=True,
        timeout=600,
    )
    bundle = sim.publish(version=3)
    trust = tmp_path / "trust.json"
    sim.trust("release").save(trust)
    out = json.loads(
        run_in(
            agent_python,
            SCRIPT,
            str(bundle),
            str(trust),
            str(tmp_path / "slot-a"),
            format_time(NOW),
        )
    )
    assert out["version"] == 3
    assert out["shape"] == [2, 3] and out["row_sums"] == [1.0, 1.0]
    assert all(out["absent"].values()), out["absent"]
    assert out["loaded"] == []
