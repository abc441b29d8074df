"""`edgefleet bundle`: pack, sign, verify and inspect model bundles."""

from __future__ import annotations

import json
import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

import click

from converters.bundle import BundleFile, build_manifest, pack_bundle, read_header, sign_bundle
from converters.introspect import model_signature
from converters.keys import KeyStore
from converters.packing import single_model_file
from device_agent.bundle import Manifest, TrustStore, VerifyLimits, verify_file
from device_agent.bundle.manifest import format_time, parse_time
from fleet_server.cli._common import (
    handle_errors,
    keys_dir_option,
    parse_labels,
    passphrase_options,
    read_passphrase,
)


@click.group()
def bundle() -> None:
    """Pack, sign, verify and inspect signed model bundles."""


def summary(manifest: Manifest, signed_by: tuple[str, ...] | list[str] = ()) -> str:
    lines = [
        f"bundle   {manifest.name} v{manifest.version} ({manifest.format})",
        f"created  {format_time(manifest.created_at)}   expires {format_time(manifest.expires_at)}",
        f"targets  {', '.join(manifest.target_device_classes) or '(any device class)'}",
    ]
    for t in manifest.inputs:
        lines.append(f"input    {t.name}: {t.dtype} {list(t.shape)}")
    for t in manifest.outputs:
        lines.append(f"output   {t.name}: {t.dtype} {list(t.shape)}")
    for f in manifest.files:
        lines.append(f"file     {f.path:<24} {f.role:<14} {f.size:>12} B  sha256 {f.sha256[:16]}…")
    if manifest.labels:
        pairs = sorted(manifest.labels.items())
        lines.append("labels   " + ", ".join(f"{k}={v}" for k, v in pairs))
    if signed_by:
        lines.append(f"signed   {', '.join(signed_by)}")
    return "\n".join(lines)


@bundle.command("pack")
@click.argument("model", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--name", required=True, help="Model name (letters, digits, '._-').")
@click.option(
    "--version",
    "version",
    required=True,
    type=click.IntRange(min=0),
    help="Monotonically increasing integer version.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["auto", "onnx", "tflite"]),
    default="auto",
    show_default=True,
    help="Model format; auto uses the file extension.",
)
@click.option(
    "--out",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Output bundle path (default NAME-vVERSION.efb).",
)
@click.option(
    "--drift-profile",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Drift reference profile (JSON); required unless --allow-placeholders.",
)
@click.option(
    "--smoke-samples",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Smoke-test samples (JSON); required unless --allow-placeholders.",
)
@click.option(
    "--allow-placeholders",
    is_flag=True,
    help="Pack empty placeholders for a missing drift profile / smoke samples: the device "
    "then installs without a smoke test and drift has no reference (a warning is printed).",
)
@click.option("--target-class", "targets", multiple=True, help="Device class (repeatable).")
@click.option("--label", "labels", multiple=True, help="key=value label (repeatable).")
@click.option(
    "--valid-days",
    type=click.IntRange(min=1),
    default=90,
    show_default=True,
    help="Days until the bundle expires on devices.",
)
@handle_errors
def bundle_pack(
    model: Path,
    name: str,
    version: int,
    fmt: str,
    out: Path | None,
    drift_profile: Path | None,
    smoke_samples: Path | None,
    allow_placeholders: bool,
    targets: tuple[str, ...],
    labels: tuple[str, ...],
    valid_days: int,
) -> None:
    """Pack MODEL into an unsigned bundle (sign it with `edgefleet bundle sign`).

    An ONNX model with external data (model.onnx.data) is packed with the data inlined.
    `edgefleet bundle build` makes the drift profile and smoke samples; without them
    this command refuses unless --allow-placeholders.
    """
    if fmt == "auto":
        fmt = {".onnx": "onnx", ".tflite": "tflite"}.get(model.suffix.lower(), "")
        if not fmt:
            raise click.BadParameter("cannot tell the format from the extension; use --format")
    absent = [
        opt
        for opt, v in (("--drift-profile", drift_profile), ("--smoke-samples", smoke_samples))
        if v is None
    ]
    if absent and not allow_placeholders:
        raise click.UsageError(
            f"no {' and no '.join(absent)}: the device would install the model without a "
            "smoke test and with no drift reference. Build the bundle with `edgefleet bundle "
            "build` (which makes both), give the files, or pass --allow-placeholders"
        )
    for opt in absent:
        click.secho(
            f"warning: {opt} not given; packing an empty placeholder", fg="yellow", err=True
        )
    with tempfile.TemporaryDirectory() as tmp:
        model_file, notes = single_model_file(model, fmt, Path(tmp))
        for note in notes:
            click.echo(f"note     {note}", err=True)
        inputs, outputs, runtime = model_signature(model_file, fmt)
        files = [BundleFile(model_file, f"model.{fmt}", "model")]
        for given, member, role in (
            (drift_profile, "drift_profile.json", "drift_profile"),
            (smoke_samples, "smoke_samples.json", "smoke_samples"),
        ):
            if given is None:
                given = Path(tmp) / member
                given.write_text(json.dumps({"placeholder": True, "schema_version": 1}))
            files.append(BundleFile(given, member, role))
        manifest = build_manifest(
            name=name,
            version=version,
            fmt=fmt,
            files=files,
            inputs=inputs,
            outputs=outputs,
            runtime=runtime,
            target_device_classes=targets,
            labels=parse_labels(labels),
            valid_for=timedelta(days=valid_days),
        )
        path = pack_bundle(out or Path(f"{name}-v{version}.efb"), manifest, files)
    click.echo(summary(manifest))
    click.echo(f"packed unsigned bundle {path}")
    click.echo(f"sign it with `edgefleet bundle sign {path} --key KEY`")


@bundle.command("sign")
@click.argument("path", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--key", required=True, help="Signing key id, id prefix or name.")
@click.option(
    "--out",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the signed bundle here instead of in place.",
)
@passphrase_options
@keys_dir_option
@handle_errors
def bundle_sign(
    path: Path,
    key: str,
    out: Path | None,
    passphrase_env: str | None,
    passphrase_file: Path | None,
    keys_dir: Path,
) -> None:
    """Add a signature by KEY to the bundle at PATH (repeat with more keys for k-of-n)."""
    store = KeyStore(keys_dir)
    kid = store.resolve(key)
    passphrase = read_passphrase(passphrase_env, passphrase_file)
    if passphrase is None and store.info(kid).encrypted:
        passphrase = click.prompt(f"Passphrase for {kid}", hide_input=True).encode()
    sig = sign_bundle(path, store.private_key(kid, passphrase), out)
    click.echo(f"signed {out or path} with {sig.keyid}")


@bundle.command("verify")
@click.argument("path", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option(
    "--trust-store",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="EDGEFLEET_TRUST_STORE",
    help="Trust store file (env EDGEFLEET_TRUST_STORE).",
)
@click.option(
    "--installed-version",
    type=click.IntRange(min=0),
    help="Refuse bundles older than this version (anti-rollback).",
)
@click.option("--at", "at", help="Reference time, e.g. 2026-01-31T12:00:00Z (default: now).")
@click.option(
    "--max-member-bytes",
    type=click.IntRange(min=1),
    default=VerifyLimits().max_member_bytes,
    show_default=True,
    help="Refuse any member larger than this (the device's cap).",
)
@handle_errors
def bundle_verify(
    path: Path,
    trust_store: Path,
    installed_version: int | None,
    at: str | None,
    max_member_bytes: int,
) -> None:
    """Verify PATH exactly as a device would; exit 0 and print a summary if it is good."""
    now = parse_time(at) if at else datetime.now(timezone.utc)
    verified = verify_file(
        path,
        TrustStore.load(trust_store),
        now=now,
        installed_version=installed_version,
        limits=VerifyLimits(max_member_bytes=max_member_bytes),
    )
    click.echo(summary(verified.manifest, verified.signed_by))
    click.secho("verified: OK", fg="green")


@bundle.command("inspect")
@click.argument("path", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the raw manifest and signatures.")
@handle_errors
def bundle_inspect(path: Path, as_json: bool) -> None:
    """Show a bundle's manifest and signers WITHOUT verifying them."""
    manifest, sigs, _ = read_header(path)
    if as_json:
        click.echo(
            json.dumps(
                {"manifest": manifest.to_json(), "signatures": [s.keyid for s in sigs]}, indent=2
            )
        )
        return
    click.echo(summary(manifest))
    click.echo(f"sigs     {', '.join(s.keyid for s in sigs) or '(unsigned)'}")
    click.echo("note     not verified; use `edgefleet bundle verify` to check it")
