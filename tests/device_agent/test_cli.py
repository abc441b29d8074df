"""`edgefleet-agent`: help, install/status/rollback on real files, and `run` as a real
process against a real HTTP server and a real Mosquitto broker."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import click
import numpy as np
import pytest
from click.testing import CliRunner, Result

from device_agent.cli import main
from device_agent.logs import JsonFormatter, setup_logging
from device_agent.model import load_model
from device_agent.protocol import notify_topic, telemetry_topic
from device_agent.store import TelemetryStore
from device_agent.update import Updater
from device_agent.update.slots import Slots
from tests.brokers import MessageCollector, MosquittoBroker, publish_once
from tests.bundlesim import BundleSim, replace_data, rewrite, tiny_onnx_model
from tests.httpfixtures import SMOKE_INPUT, BundleServer, ServingHost, publish, reference_outputs

ROOT = Path(__file__).resolve().parents[2]


def write_config(tmp_path: Path, sim: BundleSim, **sections: dict[str, Any]) -> Path:
    trust = tmp_path / "trust.json"
    sim.trust("release").save(trust)
    cfg: dict[str, dict[str, Any]] = {
        "device": {"id": "dev-a", "state_dir": str(tmp_path / "state"), "trust_store": str(trust)},
        "update": {"probation_seconds": 0.2, "probation_min_predictions": 1000},
    }
    for k, v in sections.items():
        cfg.setdefault(k, {}).update(v)
    lines = []
    for section, values in cfg.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    path = tmp_path / "agent.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def cfg(tmp_path: Path, sim: BundleSim) -> Path:
    return write_config(tmp_path, sim)


def agent(cfg: Path, *args: str) -> Result:
    return CliRunner().invoke(main, ["--config", str(cfg), *args])


def active_output(tmp_path: Path) -> np.ndarray:
    """What the device would serve now: the active slot's model on the smoke input."""
    ptr = Slots(tmp_path / "state").active()
    assert ptr is not None
    model = load_model(tmp_path / "state" / "slots" / ptr.slot, ptr.slot)
    return np.asarray(model.run({"x": SMOKE_INPUT})[0])


def events(tmp_path: Path) -> list[dict[str, Any]]:
    with TelemetryStore(tmp_path / "state" / "telemetry.db") as store:
        return [r.body for r in store.pending(1000, kinds=["events"])]


# -- help --------------------------------------------------------------------------------


def _commands(group: click.Group) -> list[str]:
    return sorted(group.commands)


@pytest.mark.parametrize("command", _commands(main))
def test_every_command_has_help(command: str) -> None:
    cmd = main.commands[command]
    assert cmd.help and len(cmd.help.strip()) > 20, f"{command} has no help text"
    for p in cmd.params:
        if isinstance(p, click.Option):
            assert p.help, f"{command} {p.opts} has no help text"
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert cmd.help.strip().splitlines()[0][:30] in result.output


def test_required_commands_exist() -> None:
    assert {"run", "status", "install", "rollback", "verify"} <= set(main.commands)


def test_entry_point_help_lists_commands() -> None:
    out = subprocess.run(
        [str(Path(sys.executable).parent / "edgefleet-agent"), "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for name in ("run", "status", "install", "rollback", "verify", "--config"):
        assert name in out


# -- install / status / rollback --------------------------------------------------------------


def test_install_then_status(cfg: Path, sim: BundleSim, tmp_path: Path) -> None:
    r = agent(cfg, "install", str(publish(sim, version=1, seed=1)))
    assert r.exit_code == 0, r.output
    assert "installed: tiny v1 into slot a" in r.output
    s = agent(cfg, "status", "--json")
    assert s.exit_code == 0, s.output
    info = json.loads(s.output)
    assert info["active"]["slot"] == "a" and info["active"]["version"] == 1
    assert info["slots"] == {"a": {"name": "tiny", "version": 1}, "b": None}
    assert info["state"] == "idle"
    assert info["telemetry_backlog"]["rows"]["events"] == 1
    human = agent(cfg, "status")
    assert "slot a: tiny v1" in human.output and "update state: idle" in human.output
    assert np.allclose(active_output(tmp_path), reference_outputs(1), atol=1e-6)


def _tampered(sim: BundleSim, tmp_path: Path) -> Path:
    good = publish(sim, version=3, seed=3)
    return rewrite(
        good,
        tmp_path / "tampered.efb",
        lambda ms: replace_data(ms, "model.onnx", tiny_onnx_model(4)),
    )


def _older(sim: BundleSim, tmp_path: Path) -> Path:
    return publish(sim, version=1, seed=1)


def _expired(sim: BundleSim, tmp_path: Path) -> Path:
    return publish(
        sim,
        version=3,
        seed=3,
        created=datetime.now(timezone.utc) - timedelta(days=10),
        valid_for=timedelta(days=1),
    )


def _smoke_mismatch(sim: BundleSim, tmp_path: Path) -> Path:
    return publish(sim, version=3, seed=3, smoke="mismatch")


@pytest.mark.parametrize(
    ("make", "code"),
    [
        (_tampered, "hash_mismatch"),
        (_older, "rollback"),
        (_expired, "expired"),
        (_smoke_mismatch, "smoke_test_failed"),
    ],
    ids=["tampered", "rolled_back_version", "expired", "smoke_mismatch"],
)
def test_install_refuses_bad_bundle_and_old_model_keeps_serving(
    cfg: Path, sim: BundleSim, tmp_path: Path, make: Callable[[BundleSim, Path], Path], code: str
) -> None:
    assert agent(cfg, "install", str(publish(sim, version=2, seed=2))).exit_code == 0
    r = agent(cfg, "install", str(make(sim, tmp_path)))
    assert r.exit_code == 1
    assert f"refused: [{code}]" in r.output and "active model is unchanged" in r.output
    info = json.loads(agent(cfg, "status", "--json").output)
    assert info["active"]["version"] == 2 and info["state"] == "idle"
    assert np.allclose(active_output(tmp_path), reference_outputs(2), atol=1e-6)
    last = events(tmp_path)[-1]
    assert last["error_code"] == code
    assert last["outcome"] == ("failed" if code == "smoke_test_failed" else "refused")


def test_rollback_switches_to_previous_slot(cfg: Path, sim: BundleSim, tmp_path: Path) -> None:
    assert agent(cfg, "install", str(publish(sim, version=1, seed=1))).exit_code == 0
    assert agent(cfg, "install", str(publish(sim, version=2, seed=2))).exit_code == 0
    r = agent(cfg, "rollback")
    assert r.exit_code == 0, r.output
    assert "now serving tiny v1 from slot a" in r.output
    assert np.allclose(active_output(tmp_path), reference_outputs(1), atol=1e-6)
    assert events(tmp_path)[-1]["outcome"] == "rolled_back"


def test_rollback_refuses_without_previous_slot(cfg: Path, sim: BundleSim) -> None:
    assert agent(cfg, "install", str(publish(sim, version=1, seed=1))).exit_code == 0
    r = agent(cfg, "rollback")
    assert r.exit_code == 1 and "refused: no previous slot" in r.output


def test_rollback_refuses_tampered_previous_slot(cfg: Path, sim: BundleSim, tmp_path: Path) -> None:
    assert agent(cfg, "install", str(publish(sim, version=1, seed=1))).exit_code == 0
    assert agent(cfg, "install", str(publish(sim, version=2, seed=2))).exit_code == 0
    (tmp_path / "state" / "slots" / "a" / "model.onnx").write_bytes(tiny_onnx_model(9))
    r = agent(cfg, "rollback")
    assert r.exit_code == 1 and "does not hold a verified bundle" in r.output
    assert np.allclose(active_output(tmp_path), reference_outputs(2), atol=1e-6)


def test_install_is_refused_while_another_process_holds_the_state_dir(
    cfg: Path, sim: BundleSim, tmp_path: Path
) -> None:
    holder = Updater(tmp_path / "state", sim.trust("release"), ServingHost())
    holder.lock()
    try:
        r = agent(cfg, "install", str(publish(sim, version=1, seed=1)))
        assert r.exit_code == 3 and "update.lock" in r.output
    finally:
        holder.unlock()


def test_missing_config_file_is_a_clear_error(tmp_path: Path) -> None:
    r = agent(tmp_path / "nope.toml", "status")
    assert r.exit_code == 2 and "does not exist" in r.output


def test_missing_trust_store_is_a_clear_error(tmp_path: Path, sim: BundleSim) -> None:
    cfg = write_config(tmp_path, sim, device={"trust_store": str(tmp_path / "none.json")})
    r = agent(cfg, "install", str(publish(sim, version=1, seed=1)))
    assert r.exit_code == 2 and "trust store" in r.output and "does not exist" in r.output


def test_config_comes_from_environment(cfg: Path, sim: BundleSim, tmp_path: Path) -> None:
    r = CliRunner().invoke(
        main,
        ["status", "--json"],
        env={"EDGEFLEET_AGENT_CONFIG": str(cfg), "EDGEFLEET_AGENT_DEVICE_ID": "dev-env"},
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["device_id"] == "dev-env"


# -- logs ----------------------------------------------------------------------------------


def test_json_log_lines_carry_extra_fields() -> None:
    stream = io.StringIO()
    handler = setup_logging("DEBUG", stream)
    try:
        logging.getLogger("device_agent.test").info(
            "switched %s", "ok", extra={"slot": "b", "path": Path("/x")}
        )
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("device_agent.test").exception("failed")
    finally:
        logging.getLogger().removeHandler(handler)
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["msg"] == "switched ok" and first["level"] == "INFO"
    assert first["logger"] == "device_agent.test" and first["slot"] == "b"
    assert first["path"] == "/x" and isinstance(first["ts"], float)
    assert "ValueError: boom" in second["exc"]


def test_json_formatter_is_one_line() -> None:
    rec = logging.makeLogRecord({"msg": "a\nb", "levelname": "INFO", "name": "x"})
    assert "\n" not in JsonFormatter().format(rec)


# -- run ---------------------------------------------------------------------------------------


def wait_for(
    predicate: Callable[[], bool],
    timeout: float,
    what: str,
    proc: subprocess.Popen[str] | None = None,
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"agent exited early: {proc.communicate()}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def active_version(tmp_path: Path) -> int | None:
    ptr = Slots(tmp_path / "state").active()
    return ptr.version if ptr else None


def test_run_checks_in_installs_and_checks_again_on_mqtt_notify(
    tmp_path: Path, sim: BundleSim
) -> None:
    server = BundleServer().start()
    broker = MosquittoBroker(tmp_path / "broker").start()
    collector = MessageCollector(
        broker, [telemetry_topic("dev-a", "events")], client_id="events-collector"
    ).start()
    proc = None
    try:
        server.offer(publish(sim, version=1, seed=1), version=1)
        cfg = write_config(
            tmp_path,
            sim,
            server={"url": server.url, "poll_seconds": 3600.0},
            mqtt={"host": broker.host, "port": broker.port},
        )
        env = {**os.environ, "EDGEFLEET_AGENT_CONFIG": str(cfg)}
        env.pop("EDGEFLEET_AGENT_CRASH_AT", None)
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "edgefleet-agent"), "run"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        wait_for(
            lambda: (
                active_version(tmp_path) == 1
                and json.loads((tmp_path / "state" / "update.json").read_text())["state"] == "idle"
            ),
            60,
            "first install",
            proc,
        )
        checks = len([r for r in server.requests if r.path.endswith("/assignment")])

        # a new assignment; the poll interval is an hour, so only the notify can trigger it
        server.offer(publish(sim, version=2, seed=2), version=2)
        publish_once(broker, "server", "", notify_topic("dev-a"), b'{"reason": "rollout"}')
        wait_for(lambda: active_version(tmp_path) == 2, 60, "install after notify", proc)
        assert len([r for r in server.requests if r.path.endswith("/assignment")]) > checks
        wait_for(
            lambda: any(
                r["body"].get("outcome") == "installed" and r["body"].get("version") == 2
                for r in collector.telemetry_records()
            ),
            60,
            "install report over MQTT",
            proc,
        )
        assert any(r["outcome"] == "installed" and r["version"] == 2 for r in server.reports)
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=30)
        collector.stop()
        broker.stop()
        server.stop()
    assert proc is not None and proc.returncode == 0, err
    lines = [json.loads(line) for line in err.splitlines() if line.strip()]
    assert lines and all({"ts", "level", "logger", "msg"} <= set(x) for x in lines)
    assert any(x["msg"] == "switched" and x.get("model_version") == 2 for x in lines)
    assert any(x["msg"] == "agent stopping" for x in lines)


def test_install_killed_mid_way_is_finished_by_the_next_command(
    cfg: Path, sim: BundleSim, tmp_path: Path
) -> None:
    assert agent(cfg, "install", str(publish(sim, version=1, seed=1))).exit_code == 0
    v2 = publish(sim, version=2, seed=2)
    env = {
        **os.environ,
        "EDGEFLEET_AGENT_CONFIG": str(cfg),
        "EDGEFLEET_AGENT_CRASH_AT": "staging.after",
    }
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "edgefleet-agent"), "install", str(v2)],
        env=env,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == -signal.SIGKILL
    info = json.loads(agent(cfg, "status", "--json").output)
    assert info["state"] == "staging" and info["active"]["version"] == 1
    assert np.allclose(active_output(tmp_path), reference_outputs(1), atol=1e-6)
    r = agent(cfg, "install", str(v2))
    assert r.exit_code == 0, r.output
    assert "installed: tiny v2 into slot b" in r.output
    info = json.loads(agent(cfg, "status", "--json").output)
    assert info["state"] == "idle" and info["active"]["previous"] == "a"
    assert np.allclose(active_output(tmp_path), reference_outputs(2), atol=1e-6)
