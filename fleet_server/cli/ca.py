"""``edgefleet ca``: the fleet CA that device, server and broker TLS certificates come from."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from fleet_server.pki.ca import CAError, FleetCA


@click.group("ca")
def ca() -> None:
    """The fleet certificate authority (device identity and TLS)."""


@ca.command("init")
@click.option(
    "--dir",
    "directory",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory for ca.key (mode 0600; keep it safe) and ca.crt (ship it in images).",
)
@click.option("--name", default="edgefleet fleet CA", show_default=True, help="CA subject name.")
def ca_init(directory: Path, name: str) -> None:
    """Create the fleet CA; then set the server's ca_dir to DIR.

    With ca_dir set, the broker beside the server takes devices only over TLS with a
    client certificate, and enrollment signs each device's certificate request.
    """
    try:
        made = FleetCA.init(directory, name=name)
    except CAError as e:
        click.secho(f"error: {e}", fg="red", err=True)
        sys.exit(2)
    click.echo(f"fleet CA created: {made.root / 'ca.key'} (secret), {made.cert_path} (public)")
    click.echo(f"next: EDGEFLEET_SERVER_CA_DIR={made.root} edgefleet server ...")
