"""`edgefleet report`: write the telemetry review (HTML with plots, optional JSON export)."""

from __future__ import annotations

import sys
from datetime import datetime, timezone
from pathlib import Path

import click

from fleet_server.settings import ServerSettings

DEFAULT_DATABASE_URL = ServerSettings.model_fields["database_url"].default


def _check_database(url: str) -> None:
    """A report reads an existing database; it never creates an empty one."""
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        path = Path(url[len("sqlite:///") :])
        if not path.is_file():
            raise click.UsageError(
                f"database file {path} does not exist; pass the server's database with "
                "--database-url (or EDGEFLEET_SERVER_DATABASE_URL)"
            )


@click.command("report")
@click.option(
    "--since",
    default="24h",
    show_default=True,
    metavar="SPAN|TIME",
    help="Start of the period: a span before --until such as 24h, 90m, 7d, or an "
    "ISO 8601 time (UTC if no zone is given).",
)
@click.option(
    "--until",
    default="now",
    show_default=True,
    metavar="SPAN|TIME",
    help="End of the period: 'now', a span before now (1h) or an ISO 8601 time.",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("edgefleet-report.html"),
    show_default=True,
    help="Where to write the HTML report (one self-contained file).",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the numbers behind every plot to this JSON file.",
)
@click.option(
    "--database-url",
    envvar="EDGEFLEET_SERVER_DATABASE_URL",
    default=DEFAULT_DATABASE_URL,
    show_default=True,
    help="The server's database (SQLAlchemy URL; env EDGEFLEET_SERVER_DATABASE_URL). Read only.",
)
@click.option(
    "--drift-by",
    default="class",
    show_default=True,
    metavar="class|group|label:KEY",
    help="Group the drift heat map by device class, by server group, or by the "
    "value of a device label.",
)
@click.option(
    "--title",
    default="edgefleet telemetry review",
    show_default=True,
    help="Title at the top of the report.",
)
def report(
    since: str,
    until: str,
    out: Path,
    json_path: Path | None,
    database_url: str,
    drift_by: str,
    title: str,
) -> None:
    """Write the telemetry review of a period as an HTML report with plots.

    The report shows the fleet, version adoption over time, each rollout's stages
    with every gate decision and the numbers behind it, latency and error rate by
    version, input drift per feature and group, and canary vs control prediction
    distributions. Example: edgefleet report --since 24h --out report.html --json data.json
    """
    from sqlalchemy.exc import SQLAlchemyError

    from fleet_server.db.session import make_engine, make_sessionmaker
    from fleet_server.report.errors import ReportError
    from fleet_server.report.load import load_dataset
    from fleet_server.report.render import write_report
    from fleet_server.report.timerange import parse_range

    if not (
        drift_by in ("class", "group")
        or (drift_by.startswith("label:") and len(drift_by) > len("label:"))
    ):
        raise click.BadParameter("use class, group or label:KEY", param_hint="--drift-by")
    now = datetime.now(timezone.utc)
    try:
        lo, hi = parse_range(since, until, now=now)
    except ReportError as e:
        raise click.UsageError(str(e)) from e
    _check_database(database_url)
    click.echo(
        f"reading {lo:%Y-%m-%d %H:%M:%S} .. {hi:%Y-%m-%d %H:%M:%S} UTC from the database", err=True
    )
    engine = make_engine(database_url)
    try:
        with make_sessionmaker(engine)() as session:
            ds = load_dataset(session, lo, hi, drift_by=drift_by, now=now)
    except SQLAlchemyError as e:
        click.secho(
            f"error: cannot read the server database ({type(e).__name__}: "
            f"{str(e).splitlines()[0]}); check --database-url and that the server "
            "has created its tables",
            fg="red",
            err=True,
        )
        sys.exit(2)
    finally:
        engine.dispose()
    click.echo(
        f"rendering {len(ds.devices)} devices, {len(ds.rollouts)} rollouts, "
        f"{len(ds.by_version)} version points",
        err=True,
    )
    try:
        write_report(ds, out, json_path=json_path, title=title)
    except OSError as e:
        click.secho(f"error: cannot write the report: {e}", fg="red", err=True)
        sys.exit(2)
    for note in ds.notes:
        click.secho(f"note: {note}", fg="yellow", err=True)
    click.echo(f"report written to {out}")
    if json_path is not None:
        click.echo(f"numbers written to {json_path}")
