"""Cohort figures for the gates: install outcomes are counted per device over both
channels a device may use (MQTT events and HTTP reports), only since the stage started
and only for the candidate's name and version."""

from __future__ import annotations

from datetime import datetime, timezone

from fleet_server.db.models import DeviceReport
from fleet_server.db.telemetry import TelemetryEvent
from fleet_server.rollouts.figures import install_outcomes
from tests.server_fixtures import Fleet


def test_install_outcomes_merge_channels_per_device(fleet: Fleet) -> None:
    at = datetime.fromtimestamp(200.0, timezone.utc)
    with fleet.ctx.session() as s:
        s.add_all(
            [
                TelemetryEvent(device_id="a", seq=1, ts=200.0, received_at=200.0, type="install",
                               outcome="installed", name="m", version=2, body={}),
                DeviceReport(device_id="a", received_at=at, type="install", outcome="failed",
                             name="m", version=2, body={}),
                DeviceReport(device_id="b", received_at=at, type="install", outcome="installed",
                             name="m", version=2, body={}),
                # too early, another version, a device outside the cohort
                TelemetryEvent(device_id="c", seq=1, ts=50.0, received_at=50.0, type="install",
                               outcome="installed", name="m", version=2, body={}),
                TelemetryEvent(device_id="b", seq=2, ts=200.0, received_at=200.0, type="install",
                               outcome="failed", name="m", version=1, body={}),
                TelemetryEvent(device_id="z", seq=1, ts=200.0, received_at=200.0, type="install",
                               outcome="installed", name="m", version=2, body={}),
            ]
        )  # fmt: skip
        s.commit()
        got = install_outcomes(s, ["a", "b", "c"], "m", 2, since=100.0)
    assert got == {"a": {"installed", "failed"}, "b": {"installed"}}


def test_no_devices_no_outcomes(fleet: Fleet) -> None:
    with fleet.ctx.session() as s:
        assert install_outcomes(s, [], "m", 2, since=0.0) == {}
