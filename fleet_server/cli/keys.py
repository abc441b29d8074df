"""`edgefleet keys` and `edgefleet trust`: release keys and device trust stores."""

from __future__ import annotations

import json
from pathlib import Path

import click

from converters.keys import KeyStore
from device_agent.bundle.trust import TrustStore, public_key_to_b64
from fleet_server.cli._common import (
    handle_errors,
    keys_dir_option,
    passphrase_options,
    read_passphrase,
)


@click.group()
def keys() -> None:
    """Manage Ed25519 release signing keys."""


@keys.command("generate")
@click.option("--name", required=True, help="A name to recognise the key by.")
@click.option(
    "--encrypt/--no-encrypt",
    default=False,
    help="Encrypt the private key with a passphrase (prompted unless given by option).",
)
@passphrase_options
@keys_dir_option
@handle_errors
def keys_generate(
    name: str,
    encrypt: bool,
    passphrase_env: str | None,
    passphrase_file: Path | None,
    keys_dir: Path,
) -> None:
    """Generate a key pair; the private key is written with mode 0600."""
    passphrase = read_passphrase(passphrase_env, passphrase_file)
    if encrypt and passphrase is None:
        passphrase = click.prompt("Passphrase", hide_input=True, confirmation_prompt=True).encode()
    info = KeyStore(keys_dir).generate(name, passphrase)
    click.echo(f"generated key {info.keyid} ({name}) in {keys_dir}")
    enc = ", encrypted" if info.encrypted else ""
    click.echo(f"  private: {info.private_path} (mode 0600{enc})")
    click.echo(f"  public:  {info.public_path}")


@keys.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@keys_dir_option
@handle_errors
def keys_list(as_json: bool, keys_dir: Path) -> None:
    """List the keys in the key directory."""
    infos = KeyStore(keys_dir).list()
    if as_json:
        click.echo(
            json.dumps(
                [
                    {
                        "keyid": k.keyid,
                        "name": k.name,
                        "created_at": k.created_at,
                        "encrypted": k.encrypted,
                        "has_private": k.private_path is not None,
                    }
                    for k in infos
                ],
                indent=2,
            )
        )
        return
    if not infos:
        click.echo(f"no keys in {keys_dir}; create one with `edgefleet keys generate --name NAME`")
        return
    for k in infos:
        flags = ("private" if k.private_path else "public-only") + (
            ", encrypted" if k.encrypted else ""
        )
        click.echo(f"{k.keyid}  {k.name:<20} {k.created_at}  ({flags})")


@keys.command("export-public")
@click.argument("key")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["pem", "trust-entry"]),
    default="pem",
    show_default=True,
    help="PEM public key, or a JSON entry for a device trust store.",
)
@keys_dir_option
@handle_errors
def keys_export_public(key: str, fmt: str, keys_dir: Path) -> None:
    """Print the public half of KEY (a key id, id prefix or name)."""
    store = KeyStore(keys_dir)
    info = store.info(store.resolve(key))
    if fmt == "pem":
        click.echo(info.public_path.read_text(), nl=False)
    else:
        pub = store.public_key(info.keyid)
        click.echo(
            json.dumps(
                {
                    "keyid": info.keyid,
                    "alg": "ed25519",
                    "public_key": public_key_to_b64(pub),
                    "comment": info.name,
                }
            )
        )


@click.group()
def trust() -> None:
    """Manage a device trust store (trusted keys, revocations, threshold)."""


def _load_or_new(path: Path) -> TrustStore:
    return TrustStore.load(path) if path.exists() else TrustStore()


store_option = click.option(
    "--store",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Trust store file (created if missing).",
)


@trust.command("add")
@click.argument("key")
@store_option
@keys_dir_option
@handle_errors
def trust_add(key: str, store: Path, keys_dir: Path) -> None:
    """Trust KEY: a key id/name from the key directory, or a PEM public key file."""
    from converters.keys import load_public_key

    pub = load_public_key(key) if Path(key).is_file() else KeyStore(keys_dir).public_key(key)
    ts = _load_or_new(store)
    kid = ts.add(pub, comment=key)
    ts.save(store)
    click.echo(f"trusted {kid} in {store} ({len(ts.keys)} key(s), threshold {ts.threshold})")


@trust.command("revoke")
@click.argument("keyid")
@store_option
@handle_errors
def trust_revoke(keyid: str, store: Path) -> None:
    """Revoke KEYID (32 hex digits, either case): bundles signed by it are refused."""
    from device_agent.bundle.trust import check_key_id

    keyid = check_key_id(keyid.strip().lower())
    ts = _load_or_new(store)
    ts.revoke(keyid)
    ts.save(store)
    click.echo(f"revoked {keyid} in {store}")


@trust.command("threshold")
@click.argument("k", type=click.IntRange(min=1))
@store_option
@handle_errors
def trust_threshold(k: int, store: Path) -> None:
    """Require K distinct trusted signatures on every bundle."""
    ts = _load_or_new(store)
    if k > len(ts.keys):
        raise click.UsageError(f"threshold {k} exceeds the {len(ts.keys)} trusted key(s)")
    ts.threshold = k
    ts.save(store)
    click.echo(f"threshold of {store} is now {k} of {len(ts.keys)}")


@trust.command("show")
@store_option
@handle_errors
def trust_show(store: Path) -> None:
    """Print the trust store."""
    click.echo(json.dumps(TrustStore.load(store).to_json(), indent=2))
