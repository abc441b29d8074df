"""Agent configuration is type- and range-checked at load: every command exits 2 and
names the key, the value and the expected type (never a traceback later)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from device_agent.cli import main
from device_agent.config import AgentConfig, ConfigError

BIN = Path(sys.executable).parent

BAD_VALUES = [
    # (toml section, key, toml value, what the message must say)
    ("server", "poll_seconds", '"fast"', "expected a number"),
    ("server", "timeout_seconds", "-1", "between"),
    ("mqtt", "port", "70000", "between 1 and 65535"),
    ("mqtt", "port", "1.5", "expected an integer"),
    ("mqtt", "tls", '"yes"', "expected a boolean"),
    ("mqtt", "host", "42", "expected a string"),
    ("device", "trust_store", "[1]", "expected a file path"),
    ("device", "labels", '["a"]', "expected a table"),
    ("telemetry", "sample_rate", "2.0", "between 0.0 and 1.0"),
    ("telemetry", "drop_fields", '"x"', "expected a list"),
    ("telemetry", "max_db_bytes", "true", "expected an integer"),
    ("update", "max_restarts_per_state", "0", "between 1 and 1000"),
    ("update", "runtime_threads", '"2"', "expected an integer"),
    ("update", "probation_seconds", "nan", "finite"),
]


def _config(tmp_path: Path, section: str, key: str, value: str) -> Path:
    path = tmp_path / "agent.toml"
    trust = (
        value if (section, key) == ("device", "trust_store") else (f'"{tmp_path / "trust.json"}"')
    )
    path.write_text(
        f'[device]\nstate_dir = "{tmp_path / "state"}"\ntrust_store = {trust}\n'
        + (
            ""
            if key == "trust_store"
            else f"{key} = {value}\n"
            if section == "device"
            else f"[{section}]\n{key} = {value}\n"
        )
    )
    return path


@pytest.mark.parametrize(
    "section,key,value,expected", BAD_VALUES, ids=[f"{s}.{k}={v}" for s, k, v, _ in BAD_VALUES]
)
def test_bad_value_is_refused_at_load_naming_key_value_and_type(
    tmp_path: Path, section: str, key: str, value: str, expected: str
) -> None:
    with pytest.raises(ConfigError) as info:
        AgentConfig.load(_config(tmp_path, section, key, value), env={})
    message = str(info.value)
    assert f"{section}.{key}" in message and expected in message, message


@pytest.mark.parametrize(
    "command",
    [
        ["status"],
        ["status", "--json"],
        ["run"],
        ["install", "BUNDLE"],
        ["rollback"],
        ["enroll", "--token", "t"],
    ],
)
def test_every_command_exits_2_on_a_bad_value(tmp_path: Path, command: list[str]) -> None:
    cfg = _config(tmp_path, "server", "poll_seconds", '"fast"')
    bundle = tmp_path / "b.efb"
    bundle.write_bytes(b"x")
    args = [str(bundle) if a == "BUNDLE" else a for a in command]
    result = CliRunner().invoke(main, ["--config", str(cfg), *args])
    assert result.exit_code == 2, (result.output, result.exception)
    assert "server.poll_seconds = 'fast'" in result.output and "expected a number" in (
        result.output
    )


def test_bad_environment_value_exits_2(tmp_path: Path) -> None:
    cfg = _config(tmp_path, "server", "poll_seconds", "5")
    result = CliRunner().invoke(
        main, ["--config", str(cfg), "status"], env={"EDGEFLEET_AGENT_MQTT_PORT": "many"}
    )
    assert result.exit_code == 2
    assert "mqtt.port" in result.output and "many" in result.output


def test_real_run_process_exits_2_before_starting(tmp_path: Path) -> None:
    cfg = _config(tmp_path, "server", "poll_seconds", '"fast"')
    proc = subprocess.run(
        [str(BIN / "edgefleet-agent"), "--config", str(cfg), "run"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert "server.poll_seconds = 'fast': expected a number" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_good_values_still_load(tmp_path: Path) -> None:
    cfg = AgentConfig.load(_config(tmp_path, "update", "probation_seconds", "10"), env={})
    assert cfg.update.probation_seconds == 10.0 and isinstance(cfg.update.probation_seconds, float)
