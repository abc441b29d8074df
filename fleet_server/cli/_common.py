"""Shared pieces of the operator CLI: options, passphrases, error mapping."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from converters.errors import ConverterError
from device_agent.bundle.errors import BundleError

F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_KEYS_DIR = Path(os.path.expanduser("~/.config/edgefleet/keys"))

keys_dir_option = click.option(
    "--keys-dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="EDGEFLEET_KEYS_DIR",
    default=DEFAULT_KEYS_DIR,
    show_default=True,
    help="Directory holding release signing keys (env EDGEFLEET_KEYS_DIR).",
)


def passphrase_options(f: F) -> F:
    f = click.option(
        "--passphrase-file",
        type=click.Path(dir_okay=False, exists=True, path_type=Path),
        help="Read the key passphrase from this file (first line).",
    )(f)
    f = click.option(
        "--passphrase-env",
        metavar="VAR",
        help="Read the key passphrase from environment variable VAR.",
    )(f)
    return f


def read_passphrase(env: str | None, file: Path | None) -> bytes | None:
    if env and file:
        raise click.UsageError("give --passphrase-env or --passphrase-file, not both")
    if env:
        value = os.environ.get(env)
        if value is None:
            raise click.UsageError(f"environment variable {env} is not set")
        return value.encode()
    if file:
        return file.read_text().splitlines()[0].encode()
    return None


def handle_errors(f: F) -> F:
    """Map library errors to a one-line message and a non-zero exit code."""

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return f(*args, **kwargs)
        except BundleError as e:
            click.secho(f"refused: {type(e).__name__} [{e.code}]: {e}", fg="red", err=True)
            sys.exit(1)
        except (ConverterError, FileNotFoundError, ValueError) as e:
            click.secho(f"error: {e}", fg="red", err=True)
            sys.exit(2)

    return wrapper  # type: ignore[return-value]


def parse_labels(pairs: tuple[str, ...]) -> dict[str, str]:
    """``key=value`` options into a dict; a usage error names the malformed one."""
    out = {}
    for p in pairs:
        if "=" not in p:
            raise click.BadParameter(f"label {p!r} must look like key=value")
        k, v = p.split("=", 1)
        out[k] = v
    return out
