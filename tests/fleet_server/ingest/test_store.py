"""Batched idempotent writes and cohort aggregation, on SQLite files and PostgreSQL."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select

from device_agent.protocol import telemetry_topic
from fleet_server.db.session import make_engine
from fleet_server.db.telemetry import (
    TelemetryEvent,
    TelemetrySample,
    TelemetrySummary,
    create_telemetry_tables,
)
from fleet_server.ingest import TelemetryWriter, parse_message
from fleet_server.rollouts import BundleRef, RolloutSpec, Stage, Strategy
from fleet_server.rollouts.figures import telemetry_figures
from tests.fleet_server.ingest.test_parse import install_body, payload, summary_body
from tests.pg import fresh_database


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """Telemetry tables on a fresh SQLite file or a fresh PostgreSQL database."""
    with contextlib.ExitStack() as stack:
        url = (
            f"sqlite:///{tmp_path / 'server.db'}"
            if request.param == "sqlite"
            else stack.enter_context(fresh_database("edgefleet_ingest"))
        )
        eng = make_engine(url)
        stack.callback(eng.dispose)
        create_telemetry_tables(eng)
        yield eng


def count(engine: Engine, table: type) -> int:
    with engine.connect() as c:
        return int(c.execute(select(func.count()).select_from(table)).scalar_one())


def msg(device: str, records: list[tuple[int, str, dict]], received_at: float = 100.0):  # type: ignore[no-untyped-def,type-arg]
    return parse_message(telemetry_topic(device, "summary"), payload(device, records), received_at)


def test_each_kind_lands_in_its_table(engine: Engine) -> None:
    w = TelemetryWriter(engine)
    r = w.write(
        [
            msg(
                "dev-a",
                [
                    (1, "summary", summary_body()),
                    (2, "events", install_body()),
                    (3, "samples", {"name": "m", "version": 7, "predicted": 1}),
                ],
            )
        ]
    )
    assert (r.offered, r.stored, r.duplicates) == (3, 3, 0)
    assert [count(engine, t) for t in (TelemetrySummary, TelemetryEvent, TelemetrySample)] == [
        1,
        1,
        1,
    ]
    with engine.connect() as c:
        row = c.execute(
            select(TelemetrySummary.latency_hist, TelemetrySummary.feature_counts)
        ).one()
    assert sum(row[0]) == 998 and row[1] == {"f0": [250, 250, 250, 250]}


def test_duplicate_records_are_stored_once_across_and_within_batches(engine: Engine) -> None:
    w = TelemetryWriter(engine)
    first = msg("dev-a", [(1, "summary", summary_body()), (2, "summary", summary_body())])
    again = msg("dev-a", [(2, "summary", summary_body()), (3, "summary", summary_body())])
    r1 = w.write([first, first])  # the same message twice in one batch
    r2 = w.write([again])
    assert (r1.stored, r1.duplicates) == (2, 2)
    assert (r2.stored, r2.duplicates) == (1, 1)
    assert count(engine, TelemetrySummary) == 3


def test_same_seq_from_different_devices_are_different_records(engine: Engine) -> None:
    w = TelemetryWriter(engine)
    w.write(
        [
            msg("dev-a", [(1, "summary", summary_body())]),
            msg("dev-b", [(1, "summary", summary_body())]),
        ]
    )
    assert count(engine, TelemetrySummary) == 2


OLD, NEW = BundleRef("b-old", "m", 7), BundleRef("b-new", "m", 8)


def spec(strategy: Strategy = Strategy.STAGED_CANARY) -> RolloutSpec:
    return RolloutSpec(
        "r-1", NEW, OLD, {}, strategy=strategy, stages=(Stage(50), Stage(100)), gates=()
    )


def test_telemetry_figures_split_canary_and_control_and_merge_windows(engine: Engine) -> None:
    w = TelemetryWriter(engine)
    w.write(
        [
            msg(
                "dev-a",
                [
                    (
                        1,
                        "summary",
                        summary_body(
                            version=8, count=1000, errors=50, psi=0.4, preds=[100, 0, 900]
                        ),
                    ),
                    (2, "summary", summary_body(version=8, count=3000, errors=10, psi=0.2)),
                    (3, "events", install_body("installed", version=8)),
                ],
            ),
            msg(
                "dev-b",
                [
                    (1, "summary", summary_body(version=8, count=1000, errors=0, psi=None)),
                    (2, "events", install_body("failed", version=8)),
                ],
            ),
            msg("dev-c", [(1, "summary", summary_body(version=7, count=2000, errors=4))]),
            msg("dev-z", [(1, "summary", summary_body(version=7, count=500, errors=0))]),
        ]
    )
    m = telemetry_figures(engine, spec(), since=0.0, devices={"dev-a", "dev-b", "dev-c"})
    c, k = m.canary, m.control
    assert (c.devices, c.inferences, c.errors) == (2, 5000, 60)
    assert (c.installs, c.install_failures) == (2, 1)
    assert c.latency_samples == (1000 - 50) + (3000 - 10) + (1000 - 0)  # ok inferences
    assert c.drift_samples == 4000 and c.drift_psi == pytest.approx(
        (0.4 * 1000 + 0.2 * 3000) / 4000
    )
    assert c.prediction_counts == (100 + 500 + 0, 300, 900 + 200)
    assert c.feature_counts == {"f0": (500, 500, 500, 500)}
    # dev-z is outside the group: not in the control cohort
    assert (k.devices, k.inferences, k.errors) == (1, 2000, 4)


def test_telemetry_figures_count_only_records_received_since_stage_start(engine: Engine) -> None:
    w = TelemetryWriter(engine)
    w.write(
        [
            msg("dev-a", [(1, "summary", summary_body(version=8, count=100))], 50.0),
            msg("dev-a", [(2, "summary", summary_body(version=8, count=200))], 150.0),
        ]
    )
    assert telemetry_figures(engine, spec(), since=100.0).canary.inferences == 200


def test_shadow_rollout_canary_is_the_shadow_section(engine: Engine) -> None:
    w = TelemetryWriter(engine)
    shadow = {
        "name": "m",
        "version": 8,
        "count": 900,
        "errors": 90,
        "agreement": 0.8,
        "latency_ms": {"p95": 5.0},
    }
    w.write(
        [
            msg(
                "dev-a",
                [(1, "summary", summary_body(version=7, count=1000, errors=1, shadow=shadow))],
            )
        ]
    )
    m = telemetry_figures(engine, spec(Strategy.SHADOW), since=0.0)
    assert (m.canary.inferences, m.canary.errors) == (900, 90)
    assert (m.control.inferences, m.control.errors) == (1000, 1)
