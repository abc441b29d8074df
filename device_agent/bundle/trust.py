"""The device's trust store and the check of manifest signatures against it.

A trust store holds several Ed25519 public keys (so a release key can be
rotated without reflashing), a revocation list of key ids, and a threshold
``k``: a manifest is trusted when at least ``k`` distinct, trusted,
non-revoked keys produced valid signatures over its exact bytes.

Key ids are derived from the public key (first 32 hex digits of the sha256 of
the raw 32-byte key), so a key id can never name two different keys.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .errors import (
    BadSignatureError,
    MalformedBundleError,
    RevokedKeyError,
    ThresholdNotMetError,
    UnsignedBundleError,
    UntrustedKeyError,
)
from .manifest import canonical_json

ALGORITHM = "ed25519"
_KEY_ID = re.compile(r"^[0-9a-f]{32}$")
_STORE_FIELDS = {"version", "threshold", "keys", "revoked"}
_KEY_FIELDS = {"keyid", "alg", "public_key", "comment"}
MAX_KEYS = 256


def check_key_id(text: object, what: str = "key id") -> str:
    """``text`` if it is a key id (32 lower-case hex digits); else ValueError saying so."""
    if not isinstance(text, str) or not _KEY_ID.match(text):
        raise ValueError(
            f"{what} {text!r:.80} is not a key id (32 lower-case hex digits, as printed by "
            "`edgefleet keys list`)"
        )
    return text


def _positive_int(value: object, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_KEYS:
        raise ValueError(f"{what} must be an integer from 1 to {MAX_KEYS}, not {value!r:.80}")
    return value


def key_id(public_key: Ed25519PublicKey) -> str:
    """Derive the key id of ``public_key``."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:32]


def public_key_to_b64(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")


def public_key_from_b64(text: str) -> Ed25519PublicKey:
    try:
        raw = base64.b64decode(text, validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"not a base64 raw Ed25519 public key: {e}") from e


@dataclass(frozen=True)
class Signature:
    keyid: str
    sig: bytes
    alg: str = ALGORITHM

    def to_json(self) -> dict[str, str]:
        return {"keyid": self.keyid, "alg": self.alg, "sig": base64.b64encode(self.sig).decode()}


def encode_signatures(signatures: list[Signature]) -> bytes:
    """Encode ``manifest.sig`` (canonical JSON)."""
    body = {"signatures": [s.to_json() for s in signatures]}
    return canonical_json(body)


def decode_signatures(data: bytes) -> list[Signature]:
    """Parse ``manifest.sig``. Structural problems are malformed-bundle errors."""
    try:
        obj = json.loads(data.decode("utf-8"))
        raw = obj["signatures"]
        if not isinstance(raw, list):
            raise TypeError("'signatures' is not a list")
        out = []
        for entry in raw:
            if not isinstance(entry, dict):
                raise TypeError("signature entry is not an object")
            out.append(
                Signature(
                    keyid=str(entry["keyid"]),
                    alg=str(entry["alg"]),
                    sig=base64.b64decode(entry["sig"], validate=True),
                )
            )
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, binascii.Error) as e:
        raise MalformedBundleError(
            f"manifest.sig is not a valid signature document ({e}); re-sign the bundle"
        ) from e
    if encode_signatures(out) != data:
        # one document, one encoding: no room for bytes the signatures do not cover
        raise MalformedBundleError(
            "manifest.sig is not in canonical form; it was altered. Re-sign the bundle"
        )
    return out


@dataclass(frozen=True)
class TrustedKey:
    keyid: str
    public_key: Ed25519PublicKey
    comment: str = ""

    def to_json(self) -> dict[str, str]:
        return {
            "keyid": self.keyid,
            "alg": ALGORITHM,
            "public_key": public_key_to_b64(self.public_key),
            "comment": self.comment,
        }


@dataclass
class TrustStore:
    """Trusted release keys, revoked key ids and the signature threshold."""

    keys: dict[str, TrustedKey] = field(default_factory=dict)
    revoked: set[str] = field(default_factory=set)
    threshold: int = 1

    def add(self, public_key: Ed25519PublicKey, comment: str = "") -> str:
        kid = key_id(public_key)
        self.keys[kid] = TrustedKey(kid, public_key, comment)
        return kid

    def revoke(self, kid: str) -> None:
        """Revoke key id ``kid``; ValueError if it is not a key id."""
        self.revoked.add(check_key_id(kid))

    # -- verification (pure) --------------------------------------------
    def verify(self, manifest_bytes: bytes, signatures: list[Signature]) -> list[str]:
        """Check ``signatures`` over ``manifest_bytes``; return the key ids that count.

        Raises the most specific :class:`SignatureError` subclass when the
        threshold is not met: a revoked signer first (the operator must know
        a revoked key is still in use), then a bad signature by a trusted key
        (the manifest was changed after signing), then unknown keys.
        """
        if self.threshold < 1:
            raise ValueError("trust store threshold must be at least 1")
        if not signatures:
            raise UnsignedBundleError(
                "bundle is not signed; sign it with `edgefleet bundle sign --key KEY BUNDLE`"
            )
        good: list[str] = []
        revoked, bad, untrusted = [], [], []
        for s in signatures:
            if s.keyid in self.revoked:
                revoked.append(s.keyid)
                continue
            trusted = self.keys.get(s.keyid)
            if trusted is None or s.alg != ALGORITHM:
                untrusted.append(s.keyid)
                continue
            try:
                trusted.public_key.verify(s.sig, manifest_bytes)
            except InvalidSignature:
                bad.append(s.keyid)
                continue
            if s.keyid not in good:
                good.append(s.keyid)
        if len(good) >= self.threshold:
            return good
        if revoked:
            raise RevokedKeyError(
                f"bundle is signed by revoked key(s) {', '.join(revoked)}; "
                "re-sign it with a current release key"
            )
        if bad:
            raise BadSignatureError(
                f"signature by trusted key(s) {', '.join(bad)} does not match the manifest: "
                "the manifest was changed after signing. Do not install this bundle; "
                "rebuild and re-sign it from the source"
            )
        if untrusted and not good:
            raise UntrustedKeyError(
                f"bundle is signed only by key(s) {', '.join(untrusted)} that this device does "
                "not trust; sign with a key in the device trust store or add the key with "
                "`edgefleet trust add`"
            )
        raise ThresholdNotMetError(
            f"bundle has {len(good)} valid signature(s) from trusted keys, the trust store "
            f"requires {self.threshold}; collect more signatures with `edgefleet bundle sign`"
        )

    # -- persistence ------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "version": 1,
            "threshold": self.threshold,
            "keys": [k.to_json() for k in sorted(self.keys.values(), key=lambda k: k.keyid)],
            "revoked": sorted(self.revoked),
        }

    @classmethod
    def from_json(cls, obj: Any) -> TrustStore:
        """Parse a trust store in its one valid shape; ValueError naming what is wrong.

        ``threshold`` is an integer (not a bool, float or string) from 1 to the number
        of keys; ``revoked`` is a list of key ids; ``keys`` a list of key objects whose
        ``keyid`` is the key's own id; no other fields."""
        if (
            not isinstance(obj, dict)
            or obj.get("version") != 1
            or isinstance(obj.get("version"), bool)
        ):
            raise ValueError('trust store must be an object with "version": 1')
        unknown = set(obj) - _STORE_FIELDS
        if unknown:
            raise ValueError(f"trust store has unknown field(s) {sorted(unknown)}")
        threshold = _positive_int(obj.get("threshold", 1), "trust store threshold")
        revoked = obj.get("revoked", [])
        if not isinstance(revoked, list) or len(revoked) > MAX_KEYS:
            raise ValueError(f"trust store revoked must be a list of key ids, not {revoked!r:.80}")
        store = cls(
            threshold=threshold, revoked={check_key_id(k, "revoked entry") for k in revoked}
        )
        keys = obj.get("keys", [])
        if not isinstance(keys, list) or len(keys) > MAX_KEYS:
            raise ValueError("trust store keys must be a list of key objects")
        for entry in keys:
            if not isinstance(entry, dict) or set(entry) - _KEY_FIELDS:
                raise ValueError(f"trust store key entry {entry!r:.80} is not a key object")
            if entry.get("alg", ALGORITHM) != ALGORITHM:
                raise ValueError(f"trust store key algorithm must be {ALGORITHM}")
            pub = public_key_from_b64(str(entry["public_key"]))
            kid = key_id(pub)
            if entry.get("keyid", kid) != kid:
                raise ValueError(
                    f"trust store entry claims key id {entry['keyid']} but the key's id is {kid}"
                )
            comment = entry.get("comment", "")
            if not isinstance(comment, str):
                raise ValueError("trust store key comment must be a string")
            store.keys[kid] = TrustedKey(kid, pub, comment)
        if store.keys and store.threshold > len(store.keys):
            raise ValueError(
                f"trust store threshold {store.threshold} exceeds its {len(store.keys)} key(s); "
                "no bundle could ever be trusted"
            )
        return store

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TrustStore:
        """Load a trust store file; errors name the file and what to fix."""
        p = Path(path)
        try:
            return cls.from_json(json.loads(p.read_text()))
        except FileNotFoundError as e:
            raise FileNotFoundError(
                f"trust store {p} does not exist; create it with `edgefleet trust add`"
            ) from e
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"trust store {p} is invalid: {e}") from e

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write durably: temp file, fsync, rename."""
        from .._fsutil import atomic_write_bytes

        data = json.dumps(self.to_json(), indent=2, sort_keys=True).encode() + b"\n"
        atomic_write_bytes(Path(path), data)
