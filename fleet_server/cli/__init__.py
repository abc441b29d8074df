"""The operator CLI, ``edgefleet``. It parses arguments and calls the libraries."""

from __future__ import annotations

import click

from fleet_server.cli.bundle import bundle
from fleet_server.cli.ca import ca
from fleet_server.cli.convert import bundle_build, convert
from fleet_server.cli.demo import demo
from fleet_server.cli.image import image
from fleet_server.cli.keys import keys, trust
from fleet_server.cli.ops import COMMANDS as OPS_COMMANDS
from fleet_server.cli.release import release
from fleet_server.cli.report import report
from fleet_server.cli.server import server


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edgefleet")
def main() -> None:
    """edgefleet: deploy ML models to fleets of edge devices and keep watch over them."""


main.add_command(keys)
main.add_command(trust)
main.add_command(bundle)
main.add_command(demo)
main.add_command(convert)
bundle.add_command(bundle_build)
main.add_command(image)
main.add_command(report)
main.add_command(release)
main.add_command(server)
main.add_command(ca)
for _ops_command in OPS_COMMANDS:
    main.add_command(_ops_command)
