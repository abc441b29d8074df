"""``edgefleet telemetry``: maintenance of the server's telemetry tables."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from fleet_server.settings import SettingsError, load_settings


@click.group()
def telemetry() -> None:
    """Telemetry storage: partitions, hourly roll-ups, retention."""


@telemetry.command("maintain")
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    envvar="EDGEFLEET_SERVER_CONFIG",
    help="Server settings file (TOML, [server] table); EDGEFLEET_SERVER_* variables win.",
)
@click.option(
    "--database-url",
    help="Database to maintain instead of the settings' database_url.",
)
@click.option(
    "--now",
    "now",
    type=float,
    default=None,
    hidden=True,
    help="Server time to act at (UNIX seconds; tests).",
)
def maintain(config_file: Path | None, database_url: str | None, now: float | None) -> None:
    """Make the coming days' partitions (PostgreSQL), roll closed hours of window
    summaries up into hourly sums, and remove telemetry older than the retention
    settings (telemetry_raw_days, telemetry_samples_days, telemetry_rollup_days).

    Safe to run at any time and from several places: an hour is re-rolled the same
    way, and on PostgreSQL a second run waits for nobody (it skips). The server runs
    the same step every telemetry_maintenance_seconds.
    """
    from sqlalchemy import inspect

    from fleet_server.db.session import make_engine
    from fleet_server.ingest.retention import TelemetryMaintenance, policy_from_settings

    overrides = {"database_url": database_url} if database_url else {}
    try:
        settings = load_settings(config_file, **overrides)
        policy = policy_from_settings(settings)
    except (SettingsError, ValueError) as e:
        click.secho(f"error: {e}", fg="red", err=True)
        sys.exit(2)
    engine = make_engine(settings.database_url)
    try:
        if not inspect(engine).has_table("telemetry_marks"):
            click.secho(
                "error: this database has no telemetry_marks table (migration 0005): start "
                "the server once against it, it migrates the schema",
                fg="red",
                err=True,
            )
            sys.exit(2)
        report = TelemetryMaintenance(engine, policy).run(time.time() if now is None else now)
    finally:
        engine.dispose()
    for line in report.lines():
        click.echo(line)
