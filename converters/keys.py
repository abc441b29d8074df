"""Release signing keys (Ed25519) on the operator's side.

A key directory holds ``<keyid>.key`` (PKCS#8 PEM, mode 0600, optionally
encrypted with a passphrase) and ``<keyid>.pub`` (SubjectPublicKeyInfo PEM)
plus ``<keyid>.json`` with the key's name and creation time.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from device_agent.bundle.trust import key_id

from .errors import KeyStoreError


@dataclass(frozen=True)
class KeyInfo:
    keyid: str
    name: str
    created_at: str
    encrypted: bool
    private_path: Path | None
    public_path: Path


def _write_new(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(path, mode)


class KeyStore:
    """A directory of release signing keys."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def generate(self, name: str, passphrase: bytes | None = None) -> KeyInfo:
        """Create a key pair; the private key file is written with mode 0600."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        private = Ed25519PrivateKey.generate()
        kid = key_id(private.public_key())
        enc: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(passphrase)
            if passphrase
            else serialization.NoEncryption()
        )
        pem = private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc
        )
        pub = private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        meta = {
            "keyid": kid,
            "name": name,
            "created_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "encrypted": bool(passphrase),
        }
        _write_new(self.root / f"{kid}.key", pem, 0o600)
        _write_new(self.root / f"{kid}.pub", pub, 0o644)
        _write_new(self.root / f"{kid}.json", json.dumps(meta, indent=2).encode(), 0o644)
        return self.info(kid)

    def list(self) -> list[KeyInfo]:
        if not self.root.is_dir():
            return []
        return [self.info(p.stem) for p in sorted(self.root.glob("*.pub"))]

    def resolve(self, ref: str) -> str:
        """Accept a key id, a unique key id prefix, or a key name."""
        keys = self.list()
        hits = [k for k in keys if k.keyid == ref or k.name == ref]
        if not hits:
            hits = [k for k in keys if k.keyid.startswith(ref)]
        if len(hits) == 1:
            return hits[0].keyid
        if not hits:
            raise KeyStoreError(
                f"no key {ref!r} in {self.root}; create one with `edgefleet keys generate`"
            )
        raise KeyStoreError(f"{ref!r} matches several keys; give the full key id")

    def info(self, kid: str) -> KeyInfo:
        pub = self.root / f"{kid}.pub"
        if not pub.exists():
            raise KeyStoreError(f"no public key {pub}")
        meta_path = self.root / f"{kid}.json"
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        priv = self.root / f"{kid}.key"
        return KeyInfo(
            keyid=kid,
            name=meta.get("name", ""),
            created_at=meta.get("created_at", ""),
            encrypted=bool(meta.get("encrypted", False)),
            private_path=priv if priv.exists() else None,
            public_path=pub,
        )

    def public_key(self, ref: str) -> Ed25519PublicKey:
        kid = self.resolve(ref)
        return load_public_key(self.root / f"{kid}.pub")

    def private_key(self, ref: str, passphrase: bytes | None = None) -> Ed25519PrivateKey:
        kid = self.resolve(ref)
        path = self.root / f"{kid}.key"
        if not path.exists():
            raise KeyStoreError(f"key {kid} has no private part in {self.root}")
        return load_private_key(path, passphrase)


def load_public_key(path: str | os.PathLike[str]) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError) as e:
        raise KeyStoreError(f"cannot read public key {path}: {e}") from e
    if not isinstance(key, Ed25519PublicKey):
        raise KeyStoreError(f"{path} is not an Ed25519 public key")
    return key


def load_private_key(
    path: str | os.PathLike[str], passphrase: bytes | None = None
) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), passphrase)
    except TypeError as e:
        raise KeyStoreError(
            f"{path} is encrypted; give its passphrase (--passphrase-env or --passphrase-file)"
            if passphrase is None
            else f"{path} is not encrypted; do not give a passphrase"
        ) from e
    except ValueError as e:
        raise KeyStoreError(f"cannot load {path}: wrong passphrase or damaged key ({e})") from e
    except OSError as e:
        raise KeyStoreError(f"cannot read {path}: {e}") from e
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyStoreError(f"{path} is not an Ed25519 private key")
    return key
