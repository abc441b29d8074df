"""``edgefleet samples export``: a model's sampled inputs and outputs as Parquet.

The server streams the file (``GET /api/v1/samples/export``); it is written next to
``--out`` under a temporary name, flushed to disk and renamed, so an interrupted export
never leaves a partial file under the name a retraining pipeline waits for.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import click

from fleet_server.cli.api import ApiClient, api_options
from fleet_server.client import ApiError


@click.group()
def samples() -> None:
    """Sampled inferences the devices sent (inputs and outputs masked on the device)."""


@samples.command("export")
@click.option("--model", help="Model name (default: every model).")
@click.option("--group", help="Group name or id (default: every device).")
@click.option(
    "--since",
    default="24h",
    show_default=True,
    help="Start: ISO 8601 time, UNIX seconds, or a span before --until (90m, 24h, 7d).",
)
@click.option(
    "--until",
    default="now",
    show_default=True,
    help="End (exclusive): ISO 8601 time, UNIX seconds, now, or a span before now.",
)
@click.option(
    "--out",
    "out_path",
    required=True,
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    help="The Parquet file to write.",
)
@api_options
def samples_export(
    api: ApiClient,
    as_json: bool,
    model: str | None,
    group: str | None,
    since: str,
    until: str,
    out_path: Path,
) -> None:
    """Write the sampled inputs, outputs (and labels where present) of a model, group and
    time window as Parquet: the starting point of a retraining run."""
    params = {"since": since, "until": until}
    if model:
        params["model"] = model
    if group:
        params["group"] = group
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out_path.name}.", dir=out_path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            headers = api.download("/samples/export", f, params=params)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out_path)
    except ApiError as e:
        os.unlink(tmp)
        raise click.ClickException(str(e)) from e
    except BaseException:
        os.unlink(tmp)
        raise
    rows = headers.get("x-edgefleet-rows", "?")
    if as_json:
        click.echo(
            json.dumps({"rows": int(rows) if rows.isdigit() else None, "out": str(out_path)})
        )
    else:
        click.echo(f"wrote {rows} samples to {out_path}")
