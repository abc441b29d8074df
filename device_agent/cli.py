"""The device CLI, ``edgefleet-agent``. It parses arguments and calls the library."""

from __future__ import annotations

import sys
from datetime import datetime, timezone
from pathlib import Path

import click

from .bundle import BundleError, TrustStore, verify_file


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edgefleet")
def main() -> None:
    """edgefleet-agent: run verified models on this device and report on them."""


@main.command("verify")
@click.argument("bundle", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--trust-store", required=True, type=click.Path(dir_okay=False, path_type=Path),
              envvar="EDGEFLEET_TRUST_STORE", help="Trust store file (env EDGEFLEET_TRUST_STORE).")
@click.option("--installed-version", type=click.IntRange(min=0),
              help="Refuse bundles older than this version.")
def verify(bundle: Path, trust_store: Path, installed_version: int | None) -> None:
    """Verify BUNDLE against this device's trust store without installing it."""
    try:
        v = verify_file(bundle, TrustStore.load(trust_store), now=datetime.now(timezone.utc),
                        installed_version=installed_version)
    except BundleError as e:
        click.secho(f"refused: {type(e).__name__} [{e.code}]: {e}", fg="red", err=True)
        sys.exit(1)
    except (FileNotFoundError, ValueError) as e:
        click.secho(f"error: {e}", fg="red", err=True)
        sys.exit(2)
    m = v.manifest
    click.echo(f"verified: {m.name} v{m.version} ({m.format}), signed by {', '.join(v.signed_by)}")
