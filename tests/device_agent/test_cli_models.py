"""`edgefleet-agent install|rollback|status` on a device running several models
(``[device] models``): each model in its own slots, a bundle of one model refused into
another's, and a model name the device does not run refused with exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

from device_agent.daemon import model_dir
from tests.bundlesim import BundleSim
from tests.device_agent.test_cli import agent, write_config
from tests.httpfixtures import publish


def test_install_and_status_per_model(tmp_path: Path, sim: BundleSim) -> None:
    cfg = write_config(tmp_path, sim, device={"models": ["tiny", "other"]})
    r = agent(cfg, "install", "--model", "tiny", str(publish(sim, version=1, seed=1)))
    assert r.exit_code == 0, r.output
    r = agent(
        cfg, "install", "--model", "other", str(publish(sim, version=5, seed=2, name="other"))
    )
    assert r.exit_code == 0, r.output
    assert (model_dir(tmp_path / "state", "other") / "active.json").exists()

    # a bundle of one model into another model's slots
    r = agent(cfg, "install", "--model", "other", str(publish(sim, version=6, seed=3)))
    assert r.exit_code == 1 and "[wrong_model]" in r.output, r.output
    # no model named, or one the device does not run
    for args in ([], ["--model", "third"]):
        r = agent(cfg, "install", *args, str(publish(sim, version=2, seed=4)))
        assert r.exit_code == 2 and "tiny, other" in r.output, r.output

    info = json.loads(agent(cfg, "status", "--json").output)
    assert {m: s["active"]["version"] for m, s in info["models"].items()} == {
        "tiny": 1,
        "other": 5,
    }
    human = agent(cfg, "status").output
    assert "model tiny:" in human and "model other:" in human and "other v5" in human
