"""Telemetry retention on the migrated schema, SQLite and PostgreSQL: day partitions made
ahead and dropped whole (PostgreSQL), idempotent ingestion across days, hourly roll-ups,
and the gates' and the report's figures unchanged after the raw rows are gone."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import Engine, func, select, text
from sqlalchemy.orm import Session

from device_agent.protocol import telemetry_topic
from fleet_server.cli import main
from fleet_server.db import partitions
from fleet_server.db.partitions import DAY, KEYS_TABLE, PART_SCHEMA
from fleet_server.db.session import import_all_tables, make_engine, upgrade_database
from fleet_server.db.telemetry import (
    RAW_SINCE,
    TelemetryHourly,
    TelemetrySample,
    TelemetrySummary,
    read_mark,
)
from fleet_server.ingest import TelemetryWriter, parse_message
from fleet_server.ingest.retention import RetentionPolicy, TelemetryMaintenance, roll_up_hour
from fleet_server.report.queries import Window, summarize
from fleet_server.rollouts import BundleRef, RolloutSpec, Stage, Strategy
from fleet_server.rollouts.figures import telemetry_figures
from tests.fleet_server.ingest.test_parse import payload, summary_body
from tests.pg import fresh_database

#: midnight UTC, 2026-11-01
D0 = 20758 * DAY
POLICY = RetentionPolicy(raw_days=2, samples_days=1, rollup_days=30)
OLD, NEW = BundleRef("b-old", "m", 7), BundleRef("b-new", "m", 8)


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """A migrated server database (SQLite file or fresh PostgreSQL database)."""
    import_all_tables()
    with contextlib.ExitStack() as stack:
        url = (
            f"sqlite:///{tmp_path / 'server.db'}"
            if request.param == "sqlite"
            else stack.enter_context(fresh_database("edgefleet_retention"))
        )
        eng = make_engine(url)
        stack.callback(eng.dispose)
        upgrade_database(eng)
        yield eng


def store(engine: Engine, device: str, records: list[tuple[int, str, dict[str, Any]]], at: float):  # type: ignore[no-untyped-def]
    kind = records[0][1]
    m = parse_message(telemetry_topic(device, kind), payload(device, records), at)
    assert m.bad_records == 0, m.rejected
    return TelemetryWriter(engine).write([m])


def rows(engine: Engine, table: type) -> int:
    with engine.connect() as c:
        return int(c.execute(select(func.count()).select_from(table)).scalar_one())


def test_postgresql_raw_tables_are_partitioned_by_day_and_rows_land_in_their_day() -> None:
    import_all_tables()
    with fresh_database("edgefleet_retention") as url:
        engine = make_engine(url)
        try:
            upgrade_database(engine)
            with engine.connect() as c:
                assert partitions.is_partitioned(c, "telemetry_summaries")
                assert partitions.is_partitioned(c, "telemetry_samples")
                assert not partitions.is_partitioned(c, "telemetry_events")
            report = TelemetryMaintenance(engine, POLICY).run(D0 + 3600)
            assert set(report.partitions_created) >= {
                "telemetry_summaries_20261101",
                "telemetry_summaries_20261103",
                "telemetry_samples_20261102",
            }
            store(engine, "dev-a", [(1, "summary", summary_body())], D0 + DAY + 5)
            with engine.connect() as c:
                where = c.execute(
                    text("SELECT tableoid::regclass::text FROM telemetry_summaries")
                ).scalar_one()
            assert where == f"{PART_SCHEMA}.telemetry_summaries_20261102"
        finally:
            engine.dispose()


def test_a_record_delivered_again_on_a_later_day_is_stored_once(engine: Engine) -> None:
    TelemetryMaintenance(engine, POLICY).run(D0)
    first = store(
        engine, "dev-a", [(1, "summary", summary_body()), (2, "summary", summary_body())], D0 + 10
    )
    again = store(
        engine,
        "dev-a",
        [(2, "summary", summary_body()), (3, "summary", summary_body())],
        D0 + DAY + 10,
    )
    assert (first.stored, again.stored, again.duplicates) == (2, 1, 1)
    assert rows(engine, TelemetrySummary) == 3


def test_a_day_made_late_takes_over_the_rows_its_default_partition_caught() -> None:
    import_all_tables()
    with fresh_database("edgefleet_retention") as url:
        engine = make_engine(url)
        try:
            upgrade_database(engine)
            far = D0 + 40 * DAY  # no partition yet: the default one takes it
            store(engine, "dev-a", [(1, "summary", summary_body())], far + 7)
            TelemetryMaintenance(engine, POLICY).run(far)
            with engine.connect() as c:
                where = c.execute(
                    text("SELECT tableoid::regclass::text FROM telemetry_summaries")
                ).scalar_one()
                in_default = c.execute(
                    text(f"SELECT count(*) FROM {PART_SCHEMA}.telemetry_summaries_default")
                ).scalar_one()
            assert where.endswith("_20261211") and in_default == 0
        finally:
            engine.dispose()


def body(rng: random.Random, version: int) -> dict[str, Any]:
    b = summary_body(
        version=version,
        count=rng.randint(50, 400),
        errors=rng.randint(0, 5),
        psi=rng.choice([0.01, 0.2, 0.35]),
        preds=[rng.randint(0, 50) for _ in range(3)],
    )
    n = rng.randint(2, 9)
    right = rng.randint(0, n)
    b["labels"] = {
        "count": n,
        "correct": right,
        "labelled": [n, 0],
        "correct_by_class": [right, 0],
        "confusion": [[right, n - right], [0, 0]],
    }
    b["previous"] = {"name": "m", "version": 6, "count": 40, "errors": 0, "agreement": 0.75}
    return b


def fill(engine: Engine, days: int) -> None:
    """Three days of 20-minute windows: canary dev-a, dev-b (v8); control dev-c, and
    dev-z outside the rollout's group (v7)."""
    rng = random.Random(7)
    writer = TelemetryWriter(engine)
    seq = dict.fromkeys(("dev-a", "dev-b", "dev-c", "dev-z"), 0)
    for step in range(days * 24 * 3):
        t = D0 + step * 1200 + rng.uniform(0, 1199)
        batch = []
        for dev, version in (("dev-a", 8), ("dev-b", 8), ("dev-c", 7), ("dev-z", 7)):
            seq[dev] += 1
            records = [(seq[dev], "summary", body(rng, version))]
            batch.append(parse_message(telemetry_topic(dev, "summary"), payload(dev, records), t))
        seq["dev-a"] += 1
        sample = [(seq["dev-a"], "samples", {"name": "m", "version": 8})]
        batch.append(
            parse_message(telemetry_topic("dev-a", "samples"), payload("dev-a", sample), t)
        )
        assert writer.write(batch).stored == 5


def spec() -> RolloutSpec:
    return RolloutSpec(
        "r-1", NEW, OLD, {}, strategy=Strategy.STAGED_CANARY, stages=(Stage(50),), gates=()
    )


def figures(engine: Engine, since: float) -> dict[str, Any]:
    m = telemetry_figures(engine, spec(), since, {"dev-a", "dev-b", "dev-c"})
    out = {"canary": asdict(m.canary), "control": asdict(m.control)}
    with Session(engine) as s:
        out["report"] = summarize(s, Window(name="m", version=8, since=since))
        out["report_all"] = summarize(s, Window(since=since, until=D0 + 3 * DAY))
    return out


def same(a: Any, b: Any) -> None:
    """Equal, floats to 1e-9 (sums of the same terms in another order)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            same(x, y)
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-9)
    else:
        assert a == b


def test_gate_and_report_figures_are_the_same_after_retention_dropped_the_raw_rows(
    engine: Engine,
) -> None:
    maint = TelemetryMaintenance(engine, POLICY)
    maint.run(D0)  # the three days' partitions (PostgreSQL)
    fill(engine, days=3)
    since = D0 + 5 * 3600  # a stage that started at 05:00 on the first day
    before = figures(engine, since)
    assert before["canary"]["inferences"] > 0 and before["control"]["labels"] > 0
    raw = rows(engine, TelemetrySummary)

    # five days later: the first three days' raw summaries and samples are dropped
    report = maint.run(D0 + 5 * DAY + 600)
    assert report.hours_rolled >= 3 * 24
    assert rows(engine, TelemetrySummary) == 0 < raw
    assert rows(engine, TelemetrySample) == 0
    with engine.connect() as c:
        assert read_mark(c, RAW_SINCE) == D0 + 3 * DAY
    if engine.dialect.name == "postgresql":
        assert "telemetry_summaries_20261101" in report.partitions_dropped
        assert "telemetry_samples_20261103" in report.partitions_dropped
        with engine.connect() as c:
            assert c.execute(text(f"SELECT count(*) FROM {KEYS_TABLE}")).scalar_one() == 0
            assert 20758 not in partitions.day_partitions(c, "telemetry_summaries")
    # one row per device, model and hour
    assert rows(engine, TelemetryHourly) == 4 * 3 * 24
    same(figures(engine, since), before)

    # re-rolling an hour whose raw rows are gone is refused by the maintenance mark;
    # rolling an hour again while its rows exist gives the same rows
    maint.run(D0 + 5 * DAY + 700)
    same(figures(engine, since), before)


def test_rolling_an_hour_up_twice_gives_the_same_rows(engine: Engine) -> None:
    fill(engine, days=1)
    with engine.begin() as c:
        n1 = roll_up_hour(c, D0 + 7 * 3600)
        first = [
            tuple(r[1:])
            for r in c.execute(select(TelemetryHourly).order_by(TelemetryHourly.device_id)).all()
        ]
        n2 = roll_up_hour(c, D0 + 7 * 3600)
        second = [
            tuple(r[1:])
            for r in c.execute(select(TelemetryHourly).order_by(TelemetryHourly.device_id)).all()
        ]
    assert n1 == n2 == 4
    assert first == second


def test_retention_keeps_raw_summaries_that_are_not_rolled_up(engine: Engine) -> None:
    fill(engine, days=1)
    # the roll-up may catch up at most one hour a run: the raw rows of the rest stay
    TelemetryMaintenance(
        engine, RetentionPolicy(raw_days=1, samples_days=1, rollup_days=5, max_hours=1)
    ).run(D0 + 4 * DAY)
    assert rows(engine, TelemetrySummary) > 0
    with engine.connect() as c:
        assert read_mark(c, RAW_SINCE) == D0


def test_rollup_days_shorter_than_raw_days_is_refused() -> None:
    with pytest.raises(ValueError, match="rollup_days"):
        RetentionPolicy(raw_days=14, rollup_days=7)


def test_telemetry_maintain_command(tmp_path: Path) -> None:
    runner = CliRunner()
    help_text = runner.invoke(main, ["telemetry", "maintain", "--help"]).output
    assert "roll closed hours" in help_text and "--config" in help_text
    url = f"sqlite:///{tmp_path / 'server.db'}"
    engine = make_engine(url)
    import_all_tables()
    upgrade_database(engine)
    store(engine, "dev-a", [(1, "summary", summary_body())], D0 + 10)
    engine.dispose()
    result = runner.invoke(
        main,
        ["telemetry", "maintain", "--database-url", url, "--now", str(D0 + 30 * DAY)],
        env={"EDGEFLEET_SERVER_TELEMETRY_RAW_DAYS": "3"},
    )
    assert result.exit_code == 0, result.output
    assert "hours rolled up: 168" in result.output  # a first run: at most a week of history
    assert "rows deleted from telemetry_summaries: 1" in result.output
    bad = runner.invoke(
        main,
        ["telemetry", "maintain", "--database-url", url],
        env={
            "EDGEFLEET_SERVER_TELEMETRY_ROLLUP_DAYS": "1",
            "EDGEFLEET_SERVER_TELEMETRY_RAW_DAYS": "3",
        },
    )
    assert bad.exit_code == 2 and "telemetry_rollup_days" in bad.output


def test_the_server_maintains_telemetry_in_the_background(tmp_path: Path) -> None:
    """The app runs the maintenance step itself (here every 0.2 s): today's and the
    coming days' partitions appear on PostgreSQL, and the roll-up mark on both."""
    import time

    from fastapi.testclient import TestClient

    from fleet_server.app import create_app
    from tests.server_fixtures import make_settings

    with fresh_database("edgefleet_retention") as url:
        for db in (f"sqlite:///{tmp_path / 'server.db'}", url):
            settings = make_settings(
                tmp_path,
                db,
                run_scheduler=False,
                run_alerts=False,
                telemetry_maintenance_seconds=0.2,
            )
            app = create_app(settings)
            with TestClient(app):
                engine = app.state.ctx.engine
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    with engine.connect() as c:
                        if read_mark(c, RAW_SINCE) is not None:
                            break
                    time.sleep(0.1)
                with engine.connect() as c:
                    assert read_mark(c, RAW_SINCE) is not None
                    if engine.dialect.name == "postgresql":
                        days = partitions.day_partitions(c, "telemetry_summaries")
                        today = partitions.day_of(time.time())
                        assert {today, today + 1, today + 2} <= set(days)


def test_migration_0005_moves_existing_postgresql_rows_into_day_partitions() -> None:
    from alembic import command
    from alembic.config import Config

    from fleet_server.db.session import MIGRATIONS_DIR

    import_all_tables()
    with fresh_database("edgefleet_retention") as url:
        engine = make_engine(url)
        try:
            cfg = Config()
            cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
            with engine.begin() as conn:
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "0004")
            with engine.connect() as c:
                assert not partitions.is_partitioned(c, "telemetry_summaries")
            # revision 0004's plain tables, written the way that revision did
            store(engine, "dev-a", [(1, "summary", summary_body())], D0 + 10)
            store(engine, "dev-a", [(2, "summary", summary_body())], D0 + DAY + 10)
            store(engine, "dev-a", [(3, "samples", {"name": "m", "version": 7})], D0 + 20)
            upgrade_database(engine)
            with engine.connect() as c:
                assert partitions.is_partitioned(c, "telemetry_summaries")
                where = c.execute(
                    text("SELECT tableoid::regclass::text FROM telemetry_summaries ORDER BY seq")
                ).scalars()
                assert list(where) == [
                    f"{PART_SCHEMA}.telemetry_summaries_20261101",
                    f"{PART_SCHEMA}.telemetry_summaries_20261102",
                ]
                assert c.execute(text(f"SELECT count(*) FROM {KEYS_TABLE}")).scalar_one() == 3
            # and the keys keep a re-delivery out
            again = store(engine, "dev-a", [(2, "summary", summary_body())], D0 + 3 * DAY)
            assert again.stored == 0 and rows(engine, TelemetrySummary) == 2
        finally:
            engine.dispose()
