"""The operator CLI, ``edgefleet``. It parses arguments and calls the libraries.

Subcommands are imported when they run (or when ``--help`` lists them), so a command
that talks to the server does not pay for the converters, matplotlib or the server's
settings on every call.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import Any

import click

#: command name -> "module:attribute"; extra commands to attach, by group
COMMANDS: dict[str, str] = {
    "keys": "fleet_server.cli.keys:keys",
    "trust": "fleet_server.cli.keys:trust",
    "bundle": "fleet_server.cli.bundle:bundle",
    "demo": "fleet_server.cli.demo:demo",
    "convert": "fleet_server.cli.convert:convert",
    "image": "fleet_server.cli.image:image",
    "report": "fleet_server.cli.report:report",
    "release": "fleet_server.cli.release:release",
    "server": "fleet_server.cli.server:server",
    "ca": "fleet_server.cli.ca:ca",
    "rollout": "fleet_server.cli.rollouts:rollout",
    "group": "fleet_server.cli.groups:group",
    "operator": "fleet_server.cli.operators:operator",
    "whoami": "fleet_server.cli.operators:whoami",
    "devices": "fleet_server.cli.ops:devices",
    "enroll-token": "fleet_server.cli.ops:enroll_token",
    "models": "fleet_server.cli.ops:models",
    "bundles": "fleet_server.cli.ops:bundles",
    "alerts": "fleet_server.cli.alerts:alerts",
    "samples": "fleet_server.cli.samples:samples",
    "telemetry": "fleet_server.cli.telemetry:telemetry",
}
SUBCOMMANDS: dict[str, tuple[str, ...]] = {
    "bundle": ("fleet_server.cli.convert:bundle_build",),
}


def _load(ref: str) -> Any:
    module, attr = ref.split(":")
    return getattr(importlib.import_module(module), attr)


class _LazyCommands(dict[str, click.Command]):
    """``group.commands`` that imports a known command when it is first looked up."""

    def __missing__(self, name: str) -> click.Command:
        if name not in COMMANDS:
            raise KeyError(name)
        cmd: click.Command = _load(COMMANDS[name])
        if isinstance(cmd, click.Group):
            for ref in SUBCOMMANDS.get(name, ()):
                sub = _load(ref)
                if sub.name not in cmd.commands:
                    cmd.add_command(sub)
        self[name] = cmd
        return cmd

    def load_all(self) -> None:
        """Import every known command (for listings and walks over the whole CLI)."""
        for name in COMMANDS:
            if not dict.__contains__(self, name):
                self[name]

    def __iter__(self) -> Iterator[str]:
        self.load_all()
        return super().__iter__()

    def __len__(self) -> int:
        self.load_all()
        return super().__len__()

    def keys(self) -> Any:
        self.load_all()
        return super().keys()

    def values(self) -> Any:
        self.load_all()
        return super().values()

    def items(self) -> Any:
        self.load_all()
        return super().items()


class LazyGroup(click.Group):
    """A group whose commands are imported on first use."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.commands = _LazyCommands(self.commands)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(self.commands)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        try:
            return self.commands[cmd_name]
        except KeyError:
            return None


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edgefleet")
def main() -> None:
    """edgefleet: deploy ML models to fleets of edge devices and keep watch over them."""
