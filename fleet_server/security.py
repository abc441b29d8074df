"""Tokens and credentials: generation, hashing, roles.

Every secret the server hands out is a high-entropy random string with a
recognisable prefix (``eft_`` operator token, ``efe_`` enrollment token,
``efd_`` device credential). Only ``HMAC-SHA256(pepper, secret)`` is stored,
so a leaked database does not leak usable secrets, and a lookup by hash is a
single indexed equality query.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from enum import IntEnum

OPERATOR_TOKEN_PREFIX = "eft_"
ENROLLMENT_TOKEN_PREFIX = "efe_"
DEVICE_CREDENTIAL_PREFIX = "efd_"


class Role(IntEnum):
    """Operator roles; a higher role may do everything a lower one may."""

    viewer = 1
    operator = 2
    admin = 3

    @classmethod
    def parse(cls, name: str) -> Role:
        try:
            return cls[name]
        except KeyError as e:
            raise ValueError(
                f"unknown role {name!r}; use one of {', '.join(r.name for r in cls)}"
            ) from e


#: Who may do what: the minimum role per permission, enforced on the routes by
#: :class:`fleet_server.api.deps.RequirePermission` (a refusal is audited as
#: ``permission.denied``). Nothing here signs a release: release keys sign the image
#: metadata offline (``edgefleet release sign``); the server only stores and serves it.
PERMISSIONS: dict[str, Role] = {
    # building on the server signs with the server's key: admins only
    "model.build": Role.admin,
    # a bundle signed offline by release keys; devices verify it themselves
    "bundle.upload": Role.operator,
    # image targets signed offline by the release keys' threshold; the server verifies them
    "release.upload": Role.operator,
    # a new image root signed offline by the root keys (rotates and revokes keys)
    "release.root": Role.admin,
    "device.assign": Role.operator,
    "rollout.create": Role.operator,
    "rollout.act": Role.operator,
    "operator.manage": Role.admin,
    # alert rules: what is watched and where alerts go
    "alert.manage": Role.operator,
    # the sampled inputs and outputs devices sent (masked on the device)
    "samples.export": Role.operator,
}


class TokenHasher:
    """Hashes secrets with a server-wide pepper."""

    def __init__(self, pepper: str) -> None:
        self._key = pepper.encode()

    def hash(self, secret: str) -> str:
        return hmac.new(self._key, secret.encode(), hashlib.sha256).hexdigest()


def new_secret(prefix: str) -> str:
    """A fresh secret: prefix + 256 bits of randomness, URL-safe."""
    return prefix + secrets.token_urlsafe(32)


def new_id(prefix: str) -> str:
    """A short random identifier such as ``r-3f9c1a2b4d5e``."""
    return f"{prefix}-{secrets.token_hex(6)}"


def bearer_token(authorization: str | None) -> str | None:
    """The token in an ``Authorization: Bearer <token>`` header, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return None
    token = token.strip()
    return token or None
