"""``edgefleet server``: run the fleet server (uvicorn, app factory mode)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from fleet_server.settings import SettingsError, load_settings


@click.command("server")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port",
    default=8000,
    show_default=True,
    type=click.IntRange(1, 65535),
    help="Port to listen on.",
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    envvar="EDGEFLEET_SERVER_CONFIG",
    help="Settings file (TOML, [server] table); EDGEFLEET_SERVER_* variables win.",
)
@click.option(
    "--workers",
    default=1,
    show_default=True,
    type=click.IntRange(1, 64),
    help="uvicorn worker processes (each is a replica sharing the database).",
)
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["critical", "error", "warning", "info", "debug"]),
    help="Server log level.",
)
@click.option(
    "--access-log/--no-access-log",
    default=False,
    show_default=True,
    help="Log every request (costly with many devices checking in).",
)
def server(
    host: str, port: int, config_file: Path | None, workers: int, log_level: str, access_log: bool
) -> None:
    """Run the fleet server: admin API (/api/v1), device API (/device/v1), /metrics.

    Settings come from --config and EDGEFLEET_SERVER_* environment variables
    (e.g. EDGEFLEET_SERVER_DATABASE_URL=postgresql://..., EDGEFLEET_SERVER_ENVIRONMENT=production).
    Outside development the server refuses default secrets.
    """
    try:
        settings = load_settings(config_file)
    except SettingsError as e:
        click.secho(f"error: {e}", fg="red", err=True)
        sys.exit(2)
    if config_file is not None:
        os.environ["EDGEFLEET_SERVER_CONFIG"] = str(config_file)
    # uvicorn binds its port only after the app started (and with it the broker beside
    # the server): check first, so a busy port touches nothing
    problem = _port_problem(host, port)
    if problem:
        click.secho(f"error: {problem}", fg="red", err=True)
        sys.exit(2)
    import uvicorn

    tls: dict[str, object] = {}
    if settings.ca_dir is not None:  # HTTPS; devices authenticate by client certificate
        from fleet_server.pki.ca import CAError
        from fleet_server.pki.serve import server_names, uvicorn_tls_options

        try:
            tls = uvicorn_tls_options(
                settings.ca_dir, settings.tls_dir, server_names(host, settings.tls_names)
            )
        except CAError as e:
            click.secho(f"error: {e}", fg="red", err=True)
            sys.exit(2)
    click.echo(
        f"edgefleet server on {'https' if tls else 'http'}://{host}:{port} "
        f"({settings.environment}, database {settings.database_url.split('://')[0]}"
        + (
            "; device API by client certificate from the fleet CA)"
            if tls
            else "; plain HTTP: development only, set ca_dir for TLS)"
        ),
        err=True,
    )
    uvicorn.run(
        "fleet_server.app:app_from_env",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level=log_level,
        access_log=access_log,
        **tls,  # type: ignore[arg-type]
    )


def _port_problem(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on now, or None."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            return (
                f"cannot listen on {host}:{port} ({e.strerror}); another server may be "
                "running there: stop it or pick another --port"
            )
    return None
