"""The README's main job, end to end: a real server, broker and fleet of agents.

A healthy model goes through the staged canary on every device class; a model
with a label-mapping bug is caught by a gate and rolled back; the devices end
on the rollback version and the report is written.
"""

from __future__ import annotations

import json
from pathlib import Path

import tomllib

from fleet_server.broker.mosquitto import LocalMosquitto
from fleet_server.demo.fleet_demo import run_demo


def test_fleet_demo_good_rollout_completes_and_bad_one_is_rolled_back(tmp_path: Path) -> None:
    assert LocalMosquitto.available(), "mosquitto is missing: scripts/_env.sh installs it"
    result = run_demo(tmp_path / "demo", devices=48, stage_percents=(50, 100))
    # every bundle the demo built records parity measured the way devices run
    from converters.bundle import read_header

    bundles = sorted((tmp_path / "demo" / "bundles").glob("*.efb"))
    assert bundles
    for bundle in bundles:
        parity = read_header(bundle)[0].provenance["parity"]
        assert parity["held_out_from_calibration"] is True and parity["batch_sizes"] == [1]
        assert all(o["batch"] == 1 and o["passed"] for o in parity["outputs"]), parity
    assert result.good == {c: "succeeded" for c in result.good} and len(result.good) == 3
    assert result.bad == {c: "rolled_back" for c in result.bad} and len(result.bad) == 3
    assert all(
        "prediction_shift" in why or "error_rate" in why for why in result.caught_by.values()
    ), result.caught_by
    # the rollback is the director instructing v2's release again: nothing re-signed
    assert result.final_versions == {2: 48}, result.final_versions
    # the legacy boards' agents ran as processes of their own on the legacy runtime (the
    # test machine reaches the package registry, so the environment is built)
    assert list(result.runtimes) == ["aarch64-legacy"], result.runtimes
    assert result.runtimes["aarch64-legacy"].startswith("tflite-runtime 2.14.0 with numpy 1.")
    legacy_logs = list((tmp_path / "demo" / "fleet").glob("aarch64-legacy-*/agent.log"))
    assert len(legacy_logs) == 12 and all("agent running" in p.read_text() for p in legacy_logs)
    assert not list((tmp_path / "demo" / "server" / "bundles").rglob("*v4*"))
    # the devices ran the Uptane chain from their image's roots
    configs = list((tmp_path / "demo" / "fleet").rglob("agent.toml"))
    assert configs and all(
        tomllib.loads(c.read_text())["uptane"]["enabled"] is True for c in configs
    )
    html = result.report.read_text()
    assert "rolled back" in html and "Version adoption" in html
    data = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert len(data["fleet"]["devices"]) == 48
