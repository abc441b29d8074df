"""The daemon starts and stops the endpoint from ``[serving]``; a broken setting never
stops the agent from updating and reporting."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pytest

from device_agent.config import AgentConfig, ConfigError
from device_agent.daemon import AgentDaemon
from device_agent.serving.client import ServingClient
from tests.agent_models import mlp_onnx
from tests.device_agent.serving.kit import Signer, x16


def _config(root: Path, signer: Signer, **serving: object) -> AgentConfig:
    trust = root / "trust.json"
    signer.trust.save(trust)
    return AgentConfig.from_dict(
        {
            "device": {"id": "dev-1", "state_dir": str(root / "state"), "trust_store": str(trust)},
            "serving": serving,
        }
    )


def _wait(cond: object, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return False


def test_daemon_serves_the_installed_model_on_its_socket_and_removes_it_on_stop(
    tmp_path: Path, signer: Signer
) -> None:
    cfg = _config(tmp_path, signer)
    daemon = AgentDaemon(cfg)
    daemon.updater.install_file(signer.bundle(mlp_onnx(0)), probation=False)
    daemon.start()
    try:
        assert _wait(lambda: daemon.serving is not None)
        client = ServingClient.from_config(cfg)
        assert client.socket_path == str(tmp_path / "state" / "serving.sock")
        x = x16(1)
        np.testing.assert_array_equal(client.predict(x)[0], daemon.agent.predict(x)[0])
        assert daemon.agent.stats()["active"]["count"] == 2
    finally:
        daemon.stop()
        daemon.join(20)
    assert not (tmp_path / "state" / "serving.sock").exists()


def test_a_socket_path_that_cannot_be_used_is_logged_and_the_agent_keeps_running(
    tmp_path: Path, signer: Signer, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "not-a-socket"
    blocker.write_text("a file")
    daemon = AgentDaemon(_config(tmp_path, signer, socket=str(blocker)))
    with caplog.at_level(logging.ERROR, logger="device_agent.daemon"):
        daemon.start()
        try:
            assert _wait(lambda: "local inference endpoint not started" in caplog.text)
            assert "not a socket" in caplog.text
            assert _wait(lambda: daemon.rounds >= 1)  # the update loop runs regardless
            assert daemon.serving is None
        finally:
            daemon.stop()
            daemon.join(20)
    assert blocker.read_text() == "a file"


def test_serving_can_be_switched_off(tmp_path: Path, signer: Signer) -> None:
    daemon = AgentDaemon(_config(tmp_path, signer, enabled=False))
    daemon.start()
    try:
        assert _wait(lambda: daemon.rounds >= 1)
        assert daemon.serving is None
        assert not (tmp_path / "state" / "serving.sock").exists()
    finally:
        daemon.stop()
        daemon.join(20)


@pytest.mark.parametrize(
    ("serving", "message"),
    [
        ({"tcp_port": 70000}, "tcp_port"),
        ({"max_json_bytes": 10}, "max_json_bytes"),
        ({"max_connections": 0}, "max_connections"),
    ],
)
def test_out_of_range_serving_settings_are_config_errors(
    tmp_path: Path, serving: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        AgentConfig.from_dict({"serving": serving}).validate()


def test_client_from_config_reads_only_the_socket_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "identity.json").write_text("not json")  # the agent's private state: not read
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[device]\nstate_dir = "{state}"\n')
    monkeypatch.delenv("EDGEFLEET_AGENT_SERVING_SOCKET", raising=False)
    assert ServingClient.from_config(cfg).socket_path == str(state / "serving.sock")
    monkeypatch.setenv("EDGEFLEET_AGENT_CONFIG", str(cfg))
    monkeypatch.setenv("EDGEFLEET_AGENT_SERVING_SOCKET", str(tmp_path / "run.sock"))
    assert ServingClient.from_config().socket_path == str(tmp_path / "run.sock")
    with pytest.raises(ConfigError, match="cannot read"):
        ServingClient.from_config(tmp_path / "missing.toml")
