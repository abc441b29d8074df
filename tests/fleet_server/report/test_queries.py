"""Telemetry reads for the API and the report, over rows in a real database: figures are
summed over windows and devices, limited to the window asked for, and install outcomes
count each device once whichever channel (MQTT event, HTTP report) it used."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import pytest

from fleet_server.db.models import DeviceReport
from fleet_server.db.telemetry import TelemetryEvent, TelemetrySummary
from fleet_server.report.queries import Window, install_outcomes, summarize
from tests.server_fixtures import Fleet


def _summary(dev: str, seq: int, at: float, **kw: Any) -> TelemetrySummary:
    base: dict[str, Any] = dict(
        device_id=dev, seq=seq, ts=at, received_at=at, name="m", version=2, count=100, errors=1
    )
    base.update(kw)
    return TelemetrySummary(**base)


def _event(dev: str, seq: int, at: float, outcome: str) -> TelemetryEvent:
    return TelemetryEvent(
        device_id=dev, seq=seq, ts=at, received_at=at, type="install", outcome=outcome,
        name="m", version=2, body={},
    )  # fmt: skip


def test_summaries_are_summed_over_windows_and_devices(fleet: Fleet) -> None:
    with fleet.ctx.session() as s:
        s.add_all(
            [
                _summary("a", 1, 100.0, latency_hist=[1, 2], prediction_counts=[5, 5]),
                _summary("a", 2, 200.0, errors=3, latency_hist=[0, 0, 4], drift_psi_max=0.2),
                _summary("b", 1, 150.0, count=300, errors=0, drift_psi_max=0.1),
                _summary("c", 1, 150.0, version=1),  # another version: not counted
                _summary("d", 1, 999.0),  # after the window
            ]
        )
        s.commit()
        got = summarize(s, Window(name="m", version=2, since=0.0, until=500.0))
    assert got["devices"] == 2
    assert got["inferences"] == 500 and got["errors"] == 4
    assert got["error_rate"] == pytest.approx(4 / 500)
    assert got["latency_hist"] == [1, 2, 4]
    assert got["prediction_counts"] == [5, 5]
    # inference-weighted mean of the windows' PSI: (0.2*100 + 0.1*300) / 400
    assert got["drift_psi"] == pytest.approx(0.125)


def test_a_device_set_limits_the_figures(fleet: Fleet) -> None:
    with fleet.ctx.session() as s:
        s.add_all([_summary("a", 1, 100.0), _summary("b", 1, 100.0, count=7)])
        s.commit()
        got = summarize(s, Window(name="m", version=2, devices=frozenset({"b"})))
    assert got["devices"] == 1 and got["inferences"] == 7


def test_install_outcomes_count_each_device_once_across_channels(fleet: Fleet) -> None:
    when = datetime.fromtimestamp(100.0, timezone.utc)
    with fleet.ctx.session() as s:
        s.add_all(
            [
                _event("a", 1, 100.0, "installed"),
                DeviceReport(device_id="a", received_at=when, type="install",
                             outcome="installed", name="m", version=2, body={}),
                DeviceReport(device_id="b", received_at=when, type="install",
                             outcome="refused", name="m", version=2, body={}),
                _event("c", 1, 100.0, "rolled_back"),
            ]
        )  # fmt: skip
        s.commit()
        got = install_outcomes(s, Window(name="m", version=2, since=0.0))
    assert got["devices"] == 3
    assert got["outcomes"] == {"installed": 1, "refused": 1, "rolled_back": 1}
