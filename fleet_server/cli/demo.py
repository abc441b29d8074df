"""`edgefleet demo`: the whole product on one machine."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("demo-output"),
    show_default=True,
    help="Where everything goes (recreated on each run).",
)
@click.option(
    "--devices",
    type=click.IntRange(min=6, max=2000),
    default=48,
    show_default=True,
    help="Number of simulated devices.",
)
@click.option(
    "--broker",
    "broker_kind",
    type=click.Choice(["auto", "mosquitto", "embedded"]),
    default="auto",
    show_default=True,
    help="MQTT broker: Mosquitto when installed (auto), or the embedded Python one.",
)
@click.option(
    "--legacy-processes/--legacy-in-process",
    default=True,
    show_default=True,
    help="Run each legacy board's agent as a process of its own on tflite-runtime 2.14 "
    "(numpy 1, built once under .venv-cache/), or in the demo's process on ai-edge-litert "
    "like the other classes.",
)
@click.option(
    "--roundtrip",
    is_flag=True,
    help="Only the short guided bundle round-trip (keys, pack, sign, verify, tamper).",
)
def demo(
    workdir: Path, devices: int, broker_kind: str, legacy_processes: bool, roundtrip: bool
) -> None:
    """Run the fleet demo: server, broker, simulated fleet, a good and a bad rollout, report."""
    if roundtrip:
        from fleet_server.demo.roundtrip import run_roundtrip

        run_roundtrip(workdir)
        return
    from fleet_server.client import ApiError
    from fleet_server.demo.fleet_demo import run_demo

    try:
        run_demo(workdir, devices, broker_kind=broker_kind, legacy_processes=legacy_processes)
    except ApiError as e:
        raise click.ClickException(f"the fleet server refused a demo step: {e}") from e
