"""`edgefleet report`: from a server database to an HTML report and its JSON export."""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from fleet_server.cli import main
from fleet_server.db.session import make_engine
from fleet_server.report.dataset import ReviewDataset
from fleet_server.report.errors import TimeRangeError
from fleet_server.report.timerange import parse_range, parse_time
from tests.fleet_server.report.test_fixtures import Scenario, populate


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Scenario]]:
    tmp = tmp_path_factory.mktemp("cli")
    url = f"sqlite:///{tmp / 'server.db'}"
    engine = make_engine(url)
    sc = populate(engine, tmp, devices=12)
    engine.dispose()
    yield url, sc


def run(*args: str) -> click.testing.Result:
    return CliRunner().invoke(main, ["report", *args])


def test_report_writes_html_with_every_plot_and_json_with_the_same_numbers(
    db: tuple[str, Scenario], tmp_path: Path
) -> None:
    url, sc = db
    out, js = tmp_path / "review" / "report.html", tmp_path / "review" / "data.json"
    r = run("--database-url", url, "--since", "2h", "--out", str(out), "--json", str(js))
    assert r.exit_code == 0, r.output
    assert f"report written to {out}" in r.output
    html = out.read_text()
    for plot in ("adoption", "timeline", "latency", "drift", "predictions"):
        assert f'data-plot="{plot}"' in html
    ds = ReviewDataset.from_json(json.loads(js.read_text()))
    assert len(ds.devices) == 12 and {r.id for r in ds.rollouts} == {"r-good", "r-bad"}
    assert ds.until - ds.since == timedelta(hours=2)
    for d in ds.devices:
        assert f"<td>{d.id}</td>" in html
    drift_svg = re.search(r'<svg[^>]*data-plot="drift".*?</svg>', html, re.S)
    assert drift_svg
    for cell in ds.drift:
        assert f">{cell.psi:.2f}<" in drift_svg.group(0)


def test_report_as_a_real_process(db: tuple[str, Scenario], tmp_path: Path) -> None:
    url, _ = db
    out = tmp_path / "r.html"
    p = subprocess.run(
        [
            sys.executable,
            "-c",
            "from fleet_server.cli import main; main()",
            "report",
            "--database-url",
            url,
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    assert "rendering 12 devices, 2 rollouts" in p.stderr
    assert out.read_text().startswith("<!DOCTYPE html>")


def test_missing_database_file_is_refused_and_not_created(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "server.db"
    r = run("--database-url", f"sqlite:///{missing}", "--out", str(tmp_path / "r.html"))
    assert r.exit_code == 2
    assert "does not exist; pass the server's database with --database-url" in r.output
    assert not missing.exists() and not missing.parent.exists()
    assert not (tmp_path / "r.html").exists()


def test_database_that_is_not_a_server_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    sqlite3.connect(path).close()
    r = run("--database-url", f"sqlite:///{path}", "--out", str(tmp_path / "r.html"))
    assert r.exit_code == 2
    assert "cannot read the server database" in r.output
    assert not (tmp_path / "r.html").exists()


def test_unparseable_since_is_refused(db: tuple[str, Scenario], tmp_path: Path) -> None:
    r = run("--database-url", db[0], "--since", "yesterday", "--out", str(tmp_path / "r.html"))
    assert r.exit_code == 2
    assert "--since 'yesterday' is neither a span like 24h" in r.output


def test_empty_period_is_refused(db: tuple[str, Scenario], tmp_path: Path) -> None:
    r = run(
        "--database-url",
        db[0],
        "--since",
        "2026-11-21T10:00:00Z",
        "--until",
        "2026-11-21T09:00:00Z",
        "--out",
        str(tmp_path / "r.html"),
    )
    assert r.exit_code == 2 and "the period is empty" in r.output


def test_bad_drift_grouping_is_refused(db: tuple[str, Scenario], tmp_path: Path) -> None:
    r = run("--database-url", db[0], "--drift-by", "label:", "--out", str(tmp_path / "r.html"))
    assert r.exit_code == 2 and "use class, group or label:KEY" in r.output


def test_drift_by_server_group(db: tuple[str, Scenario], tmp_path: Path) -> None:
    js = tmp_path / "d.json"
    r = run(
        "--database-url",
        db[0],
        "--drift-by",
        "group",
        "--out",
        str(tmp_path / "r.html"),
        "--json",
        str(js),
    )
    assert r.exit_code == 0, r.output
    assert {c["group"] for c in json.loads(js.read_text())["drift"]} == {"all-devices"}


def test_command_and_every_option_have_help_text() -> None:
    cmd = main.commands["report"]
    assert cmd.help and "HTML report" in cmd.help
    for param in cmd.params:
        if isinstance(param, click.Option) and param.name != "help":
            assert param.help, f"--{param.name} has no help text"
    r = CliRunner().invoke(main, ["report", "--help"])
    assert r.exit_code == 0 and "--json" in r.output and "--database-url" in r.output


NOW = datetime(2026, 11, 21, 12, 0, tzinfo=timezone.utc)


@pytest.mark.parametrize(
    "text,want",
    [
        ("24h", NOW - timedelta(hours=24)),
        ("90m", NOW - timedelta(minutes=90)),
        ("7d", NOW - timedelta(days=7)),
        ("1.5h", NOW - timedelta(minutes=90)),
        ("now", NOW),
        ("2026-11-20T08:00:00Z", datetime(2026, 11, 20, 8, tzinfo=timezone.utc)),
        ("2026-11-20T10:00:00+02:00", datetime(2026, 11, 20, 8, tzinfo=timezone.utc)),
        ("2026-11-20 08:00", datetime(2026, 11, 20, 8, tzinfo=timezone.utc)),
    ],
)
def test_parse_time(text: str, want: datetime) -> None:
    assert parse_time(text, now=NOW) == want


def test_since_span_counts_back_from_until() -> None:
    lo, hi = parse_range("2h", "2026-11-21T08:00:00Z", now=NOW)
    assert (lo, hi) == (
        datetime(2026, 11, 21, 6, tzinfo=timezone.utc),
        datetime(2026, 11, 21, 8, tzinfo=timezone.utc),
    )
    with pytest.raises(TimeRangeError, match="neither a span"):
        parse_time("-3h", now=NOW)
