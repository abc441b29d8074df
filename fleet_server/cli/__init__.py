"""The operator CLI, ``edgefleet``. It parses arguments and calls the libraries."""

from __future__ import annotations

import click

from .bundle import bundle
from .convert import bundle_build, convert
from .demo import demo
from .image import image
from .keys import keys, trust
from .ops import COMMANDS as OPS_COMMANDS
from .report import report
from .server import server


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
main.add_command(server)
for _ops_command in OPS_COMMANDS:
    main.add_command(_ops_command)
