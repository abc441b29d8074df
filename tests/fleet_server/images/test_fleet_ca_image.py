"""An image built with --fleet-ca: the agent verifies the server by the CA, types no broker
address, and first boot enrolls once (identity.json), also when no bearer credential
ever comes (a device with a certificate gets none)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from device_agent.config import AgentConfig
from fleet_server.images.build import FIRSTBOOT_SH, agent_config_text
from fleet_server.images.recipe import load_class


def _install(tmp_path: Path, text: str) -> tuple[Path, Path]:
    etc, state = tmp_path / "etc", tmp_path / "state"
    etc.mkdir()
    state.mkdir()
    conf = etc / "agent.toml"
    conf.write_text(text.replace("@CONFIG_DIR@", str(etc)).replace("@STATE_DIR@", str(state)))
    return conf, state


def test_the_agent_takes_broker_and_certificate_from_enrollment(tmp_path: Path) -> None:
    dc = load_class("x86_64-gateway")
    text = agent_config_text(dc, "https://fleet.example:8443", None, 1883, fleet_ca=True)
    assert "[mqtt]" not in text and "password_file" not in text
    conf, state = _install(tmp_path, text)
    before = AgentConfig.load(conf)
    assert before.server.ca_file == tmp_path / "etc" / "fleet-ca.crt"
    assert before.mqtt.host == ""  # nothing typed: telemetry waits for enrollment
    (state / "identity.json").write_text(
        json.dumps(
            {
                "device_id": "gw-9",
                "certificate": str(state / "device.crt"),
                "key": str(state / "device.key"),
                "ca_file": str(state / "fleet-ca.crt"),
                "mqtt": {
                    "host": "fleet.example",
                    "port": 8883,
                    "mqtt_version": 5,
                    "tls": True,
                    "ca_file": str(state / "fleet-ca.crt"),
                },
            }
        )
    )
    cfg = AgentConfig.load(conf)
    assert cfg.device.id == "gw-9"
    assert (cfg.mqtt.host, cfg.mqtt.port, cfg.mqtt.mqtt_version) == ("fleet.example", 8883, 5)
    assert cfg.mqtt.tls and cfg.mqtt.cert_file == state / "device.crt"
    assert cfg.mqtt.key_file == state / "device.key"
    assert cfg.server.cert_file == state / "device.crt"
    assert cfg.server.ca_file == tmp_path / "etc" / "fleet-ca.crt"  # the image's, kept


def test_without_a_fleet_ca_the_recipe_broker_and_password_stay(tmp_path: Path) -> None:
    dc = load_class("x86_64-gateway")
    text = agent_config_text(dc, "http://127.0.0.1:8000", "10.0.0.5", 1883)
    assert 'host = "10.0.0.5"' in text and "password_file" in text and "ca_file" not in text


def _firstboot(tmp_path: Path, state: Path) -> subprocess.CompletedProcess[str]:
    etc, prefix = tmp_path / "etc", tmp_path / "opt"
    (prefix / "venv" / "bin").mkdir(parents=True, exist_ok=True)
    fake = prefix / "venv" / "bin" / "edgefleet-agent"  # records that enroll ran
    fake.write_text(f'#!/bin/sh\necho "$@" > {tmp_path / "enroll-called"}\n')
    fake.chmod(0o755)
    script = tmp_path / "firstboot.sh"
    script.write_text(
        FIRSTBOOT_SH.replace("@CONFIG_DIR@", str(etc))
        .replace("@STATE_DIR@", str(state))
        .replace("@PREFIX@", str(prefix))
    )
    return subprocess.run(["sh", str(script)], capture_output=True, text=True, timeout=30)


def test_first_boot_enrolls_once_by_identity_not_by_credential_file(tmp_path: Path) -> None:
    dc = load_class("x86_64-gateway")
    _, state = _install(tmp_path, agent_config_text(dc, "https://f", None, 1, fleet_ca=True))
    (tmp_path / "etc" / "enrollment-token").write_text("eet_x")
    first = _firstboot(tmp_path, state)
    assert first.returncode == 0, first.stderr
    assert "enroll" in (tmp_path / "enroll-called").read_text()
    (tmp_path / "enroll-called").unlink()
    (state / "identity.json").write_text('{"device_id": "gw-1"}')  # what enroll leaves
    again = _firstboot(tmp_path, state)  # no token left, no credential file: still fine
    assert again.returncode == 0, again.stderr
    assert not (tmp_path / "enroll-called").exists()
