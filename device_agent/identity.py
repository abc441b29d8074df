"""The device's identity: a key pair made on the device, whose private half never leaves it.

:class:`KeyProvider` is the interface (a PKCS#11 token or a TPM can implement it);
:class:`FileKeyProvider` is the default: an ECDSA P-256 key generated at first boot into
a file of mode 0600. Enrollment sends :meth:`KeyProvider.csr` with the one-time token
and stores the certificate the server returns beside the key; MQTT and HTTP then
authenticate with that certificate (the server takes its CN as the device id), and the
agent renews it before it expires (:func:`renewal_due`, :mod:`device_agent.renew`).
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ._fsutil import atomic_write_bytes


class IdentityError(Exception):
    """The device key or certificate is missing or unusable; the message says what to do."""


class KeyProvider(Protocol):
    """Where the device's private key lives; it signs, it never exports the key."""

    def csr(self, device_id: str) -> bytes:
        """A PEM certificate signing request for ``device_id``, signed by the key."""
        ...

    def sign(self, data: bytes) -> bytes:
        """An ECDSA-SHA256 signature of ``data`` (DER)."""
        ...

    def key_file(self) -> Path | None:
        """A key file TLS libraries can load, or None for hardware keys."""
        ...


class FileKeyProvider:
    """An ECDSA P-256 key in a file (0600), created on first use."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def _key(self) -> ec.EllipticCurvePrivateKey:
        if not self.path.exists():
            key = ec.generate_private_key(ec.SECP256R1())
            pem = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            atomic_write_bytes(self.path, pem, mode=0o600)
            return key
        try:
            loaded = serialization.load_pem_private_key(self.path.read_bytes(), None)
        except ValueError as e:
            raise IdentityError(
                f"device key {self.path} is unreadable ({e}); move it away to make a new one "
                "and enroll again"
            ) from e
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise IdentityError(f"device key {self.path} is not an EC key")
        return loaded

    def csr(self, device_id: str) -> bytes:
        key = self._key()
        req = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
            .sign(key, hashes.SHA256())
        )
        return req.public_bytes(serialization.Encoding.PEM)

    def sign(self, data: bytes) -> bytes:
        return self._key().sign(data, ec.ECDSA(hashes.SHA256()))

    def key_file(self) -> Path | None:
        self._key()
        return self.path


def client_ssl_context(
    ca_file: Path | None, cert_file: Path | None = None, key_file: Path | None = None
) -> ssl.SSLContext:
    """A TLS client context that verifies the server against ``ca_file`` (None: the
    system trust store) and presents the device's certificate when given."""
    try:
        context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        if cert_file is not None:
            context.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
    except (OSError, ssl.SSLError) as e:
        raise IdentityError(
            f"cannot load the fleet CA or the device certificate ({e}); enroll the device "
            "again if they are gone"
        ) from e
    return context


def renewal_due(cert_pem: bytes, now: float, fraction: float) -> bool:
    """Whether less than ``fraction`` of the certificate's validity remains at ``now``
    (seconds since the epoch), or it has expired. Pure: no I/O, no clock."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    start = cert.not_valid_before_utc.timestamp()
    end = cert.not_valid_after_utc.timestamp()
    if end <= start:
        return True
    return (end - now) < fraction * (end - start)


def save_certificate(path: Path, cert_pem: bytes | str) -> Path:
    """Store the certificate the server issued (PEM), checking that it parses."""
    raw = cert_pem.encode() if isinstance(cert_pem, str) else cert_pem
    try:
        x509.load_pem_x509_certificate(raw)
    except ValueError as e:
        raise IdentityError(f"the server sent a certificate that does not parse: {e}") from e
    atomic_write_bytes(Path(path), raw)
    return Path(path)


__all__ = [
    "FileKeyProvider",
    "IdentityError",
    "KeyProvider",
    "client_ssl_context",
    "renewal_due",
    "save_certificate",
]
