"""`edgefleet image`: device-class recipes and provisioning images."""

from __future__ import annotations

from pathlib import Path

import click

from fleet_server.images import (
    ImageBuildError,
    RecipeError,
    build_image,
    list_classes,
    load_class,
)


@click.group()
def image() -> None:
    """Build self-contained provisioning images from device-class recipes."""


@image.command("classes")
def image_classes() -> None:
    """List the device classes with a recipe in firmware_images/classes/."""
    for name in list_classes():
        dc = load_class(name)
        click.echo(
            f"{name:<18} {dc.architecture:<8} {dc.model_format:<7} {dc.precision:<8} "
            f"{dc.description}"
        )


@image.command("build")
@click.argument("device_class")
@click.option(
    "--trust-store",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Trust store to ship as the device's trust root (default: the recipe's).",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("build/images"),
    show_default=True,
    help="Output directory.",
)
@click.option("--server-url", help="Fleet server URL the devices talk to.")
@click.option("--mqtt-host", help="MQTT broker host for telemetry.")
@click.option("--mqtt-port", type=int, help="MQTT broker port.")
@click.option("--image-version", help="Version to stamp (default: agent version + content hash).")
@click.option(
    "--uptane-roots",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    help="Directory with image-root.json and director-root.json (SERVER/uptane/device-roots "
    "from `edgefleet release init`): devices then run the Uptane chain.",
)
@click.option(
    "--fleet-ca",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="The fleet CA certificate (ca.crt of `edgefleet ca init`): devices verify the "
    "server by it, enroll by certificate and learn the broker from their enrollment.",
)
def image_build(
    device_class: str,
    trust_store: Path | None,
    out_dir: Path,
    server_url: str | None,
    mqtt_host: str | None,
    mqtt_port: int | None,
    image_version: str | None,
    uptane_roots: Path | None,
    fleet_ca: Path | None,
) -> None:
    """Build the provisioning image for DEVICE_CLASS (a class name or a recipe file)."""
    try:
        dc = load_class(device_class)
        info = build_image(
            dc,
            out_dir=out_dir,
            trust_store=trust_store,
            server_url=server_url,
            mqtt_host=mqtt_host,
            mqtt_port=mqtt_port,
            image_version=image_version,
            uptane_roots=uptane_roots,
            fleet_ca=fleet_ca,
            progress=lambda msg: click.echo(f"  .. {msg}", err=True),
        )
    except (RecipeError, ImageBuildError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"image {info.device_class} {info.version}: {len(info.wheels)} wheels")
    click.echo(f"  directory {info.directory}")
    click.echo(f"  archive   {info.archive}")
    click.echo("  install on the device with: sh install.sh  (no package index needed)")
