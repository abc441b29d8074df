"""``edgefleet release``: releasing is separate from building.

On the operator's machine, which holds the offline keys::

    edgefleet release init --uptane-dir SRV --keys-dir OFFLINE --release-keys 3 --threshold 2
    edgefleet release add BUNDLE --targets targets.json --counter 4 --class x86_64-gateway
    edgefleet release sign targets.json --key release1 --keys-dir OFFLINE   # each key holder
    edgefleet release sign targets.json --key release2 --keys-dir OFFLINE
    edgefleet release upload targets.json --server URL --token TOKEN

``add`` starts from the server's current ``targets.json`` (``release fetch``), bumps its
version and clears its signatures; ``sign`` appends one signature; the server accepts the
file only when the release keys' threshold signed it.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
from tuf.api.metadata import Metadata, Targets

from fleet_server.cli._common import handle_errors, keys_dir_option
from fleet_server.cli.api import ApiClient

#: --url and --token of the commands that talk to the server (``--server`` and
#: EDGEFLEET_SERVER_URL are the older names); refusals and an unreachable server come out
#: as the admin client's coded one-line errors
_server_options = click.option(
    "--url",
    "--server",
    "server",
    required=True,
    envvar=["EDGEFLEET_URL", "EDGEFLEET_SERVER_URL"],
    help="Server URL (env EDGEFLEET_URL, as every command that talks to the server).",
)
_token_option = click.option(
    "--token",
    required=True,
    envvar="EDGEFLEET_TOKEN",
    help="Operator token (env EDGEFLEET_TOKEN).",
)


@click.group()
def release() -> None:
    """Release bundles: sign the image repository's targets with offline release keys."""


@release.command("init")
@click.option(
    "--uptane-dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="The server's Uptane directory (server setting uptane_dir).",
)
@keys_dir_option
@click.option(
    "--release-keys",
    default=3,
    show_default=True,
    type=click.IntRange(1, 32),
    help="How many release keys to create (n).",
)
@click.option(
    "--threshold",
    default=2,
    show_default=True,
    type=click.IntRange(1, 32),
    help="How many release keys must sign a release (k).",
)
@handle_errors
def init(uptane_dir: Path, keys_dir: Path, release_keys: int, threshold: int) -> None:
    """Create the image and director repositories: offline keys go to --keys-dir, the
    server's online keys and the roots to --uptane-dir."""
    from fleet_server.registry.uptane import init_uptane

    r = init_uptane(
        operator_keys=keys_dir,
        uptane_dir=uptane_dir,
        release_keys=release_keys,
        threshold=threshold,
    )
    click.echo(
        f"release keys {', '.join(r.release_keys)} (threshold {r.threshold}) in {keys_dir}; "
        f"provision devices with {r.device_roots}/image-root.json and director-root.json"
    )


def _load(path: Path) -> Metadata[Targets]:
    md: Metadata[Targets] = Metadata.from_bytes(path.read_bytes())
    if not isinstance(md.signed, Targets):
        raise ValueError(f"{path} is not TUF targets metadata")
    return md


@release.command("add")
@click.argument("bundle", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--targets",
    "targets_file",
    required=True,
    type=click.Path(path_type=Path),
    help="The targets.json to add to (from `edgefleet release fetch`).",
)
@click.option(
    "--counter",
    type=click.IntRange(min=0),
    default=None,
    help="Release counter, the devices' floor for this model (default: the version).",
)
@handle_errors
def add(bundle: Path, targets_file: Path, counter: int | None) -> None:
    """Add BUNDLE to targets.json (name, version, classes from its signed manifest)."""
    from fleet_server.registry.tufrepo import bundle_release_target

    md = _load(targets_file)
    t = bundle_release_target(bundle, counter)
    md.signed.targets[t.path] = t
    md.signed.version += 1
    md.signatures.clear()
    targets_file.write_bytes(md.to_bytes())
    click.echo(f"added {t.path} to {targets_file} (version {md.signed.version}, unsigned)")


@release.command("sign")
@click.argument("targets_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--key", "key_ref", required=True, help="Release key id or name.")
@keys_dir_option
@handle_errors
def sign(targets_file: Path, key_ref: str, keys_dir: Path) -> None:
    """Add this release key's signature to TARGETS_FILE (threshold signing)."""
    from converters.keys import KeyStore
    from fleet_server.registry.tufrepo import signer_for

    md = _load(targets_file)
    sig = md.sign(signer_for(KeyStore(keys_dir).private_key(key_ref)), append=True)
    targets_file.write_bytes(md.to_bytes())
    click.echo(f"signed {targets_file} with {sig.keyid[:16]}… ({len(md.signatures)} signature(s))")


@release.command("upload")
@click.argument("targets_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_server_options
@_token_option
@handle_errors
def upload(targets_file: Path, server: str, token: str) -> None:
    """Publish TARGETS_FILE on the server (it verifies the release keys' threshold)."""
    answer = ApiClient(server, token).request(
        "PUT", "/release/targets", content=targets_file.read_bytes()
    )
    click.echo(json.dumps(answer))


@release.command("fetch")
@click.argument("targets_file", type=click.Path(dir_okay=False, path_type=Path))
@_server_options
@_token_option
@handle_errors
def fetch(targets_file: Path, server: str, token: str) -> None:
    """Save the server's current targets.json to TARGETS_FILE (to add a release to)."""
    targets_file.write_text(ApiClient(server, token).get_text("/release/targets"))
    click.echo(f"saved {targets_file}")


@release.command("migration")
@click.option(
    "--uptane-dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="The server's Uptane directory (its device-roots/ are what devices move to).",
)
@click.option(
    "--key",
    "key_refs",
    multiple=True,
    required=True,
    help="A release key devices trust TODAY (repeat to meet their trust store's threshold).",
)
@keys_dir_option
@handle_errors
def migration(uptane_dir: Path, key_refs: tuple[str, ...], keys_dir: Path) -> None:
    """Sign and publish the one-step move of devices on today's trust store to the chain
    (devices with [uptane] migrate = true take it at their next check)."""
    from converters.keys import KeyStore
    from device_agent.bundle.trust import Signature, encode_signatures, key_id
    from device_agent.uptane.migration import migration_document

    roots = uptane_dir / "device-roots"
    doc = migration_document(
        (roots / "image-root.json").read_bytes(), (roots / "director-root.json").read_bytes()
    )
    store = KeyStore(keys_dir)
    sigs = []
    for ref in key_refs:
        private = store.private_key(ref)
        sigs.append(Signature(key_id(private.public_key()), private.sign(doc)))
    (uptane_dir / "migration.sig").write_bytes(encode_signatures(sigs))
    (uptane_dir / "migration.json").write_bytes(doc)
    click.echo(f"published the Uptane migration in {uptane_dir}, signed by {len(sigs)} key(s)")
