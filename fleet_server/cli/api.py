"""Shared pieces of the API-backed commands: the client, ``--url``/``--token``, output.

Every command that talks to the server takes ``--url`` (env ``EDGEFLEET_URL``) and
``--token`` (env ``EDGEFLEET_TOKEN``); an API error is printed as
``error [code]: message`` with exit status 1.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import Any, TypeVar

import click

from fleet_server.client import AdminClient, ApiError

F = TypeVar("F", bound=Callable[..., Any])

MISSING_TOKEN = (
    "no operator token: give --token or set EDGEFLEET_TOKEN. On a new server, use the "
    "bootstrap admin token (the server's ADMIN_BOOTSTRAP_TOKEN setting, "
    "EDGEFLEET_SERVER_ADMIN_BOOTSTRAP_TOKEN) once to create your own: "
    "edgefleet operator create NAME --role admin --token-out FILE"
)

DEVICE_COLUMNS = (
    "id",
    "device_class",
    "labels",
    "last_seen_at",
    "current_name",
    "current_version",
    "shadow_version",
    "health",
)


class ApiClient(AdminClient):
    """The admin API client for CLI commands: API errors become :class:`click.ClickException`."""

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            return super().request(method, path, **kwargs)
        except ApiError as e:
            raise _click_error(e) from e

    def get_text(self, path: str, **kwargs: Any) -> str:
        try:
            return super().get_text(path, **kwargs)
        except ApiError as e:
            raise _click_error(e) from e


def _click_error(e: ApiError) -> click.ClickException:
    """The API's coded refusal as the CLI's one-line error."""
    return click.ClickException(e.message if e.code == "unreachable" else str(e))


def api_options(f: F) -> F:
    """Add ``--url``, ``--token`` and ``--json``; the command receives ``api`` and ``as_json``."""
    f = click.option(
        "--token",
        envvar="EDGEFLEET_TOKEN",
        help="Operator token (env EDGEFLEET_TOKEN; at first, the bootstrap admin token).",
    )(f)
    f = click.option(
        "--url",
        envvar="EDGEFLEET_URL",
        default="http://127.0.0.1:8000",
        show_default=True,
        help="Server URL (env EDGEFLEET_URL).",
    )(f)
    f = click.option("--json", "as_json", is_flag=True, help="Print the raw JSON answer.")(f)

    @functools.wraps(f)
    def wrapper(*args: Any, url: str, token: str | None, **kwargs: Any) -> Any:
        if not token:
            raise click.UsageError(MISSING_TOKEN)
        return f(*args, api=ApiClient(url, token), **kwargs)

    return wrapper  # type: ignore[return-value]


def out(data: Any, as_json: bool, columns: Sequence[str] | None = None) -> None:
    """Print ``data`` as JSON, or as a table of ``columns`` (a page's items or one object)."""
    if as_json or columns is None:
        click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))
        return
    items = data["items"] if isinstance(data, dict) and "items" in data else [data]
    rows = [[cell(item, c) for c in columns] for item in items]
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(columns)]
    click.echo("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for r in rows:
        click.echo("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
    if isinstance(data, dict) and data.get("next_offset") is not None:
        click.echo(f"... {data['total']} in all; next page with --offset {data['next_offset']}")


def cell(item: dict[str, Any], column: str) -> str:
    """One table cell: a dotted path into ``item``; dicts as k=v, lists comma-joined."""
    value: Any = item
    for part in column.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in sorted(value.items())) or "-"
    if isinstance(value, list):
        return ",".join(str(v) for v in value) or "-"
    if isinstance(value, str) and column.endswith("_at"):
        return readable_time(value)
    return "-" if value is None else str(value)


def readable_time(value: str | float | None) -> str:
    """An ISO timestamp or epoch seconds as ``YYYY-MM-DD HH:MM:SS UTC``."""
    if value is None or value == "":
        return "-"
    try:
        if isinstance(value, int | float):
            t = datetime.fromtimestamp(float(value), timezone.utc)
        else:
            t = datetime.fromisoformat(value.replace("Z", "+00:00"))
            if t.tzinfo is None:
                t = t.replace(tzinfo=timezone.utc)
    except (ValueError, OverflowError, OSError):
        return str(value)
    return t.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def pairs(items: Sequence[str], what: str) -> dict[str, str]:
    """``KEY=VALUE`` arguments as a dict; a usage error names the malformed one."""
    result = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint=what)
        result[k] = v
    return result


def paged(f: F) -> F:
    """Add ``--limit`` and ``--offset``."""
    f = click.option(
        "--offset", default=0, show_default=True, type=click.IntRange(0), help="Items to skip."
    )(f)
    f = click.option(
        "--limit",
        default=50,
        show_default=True,
        type=click.IntRange(1, 500),
        help="Items per page.",
    )(f)
    return f
