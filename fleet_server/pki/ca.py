"""The fleet CA: the operator's certificate authority for device, server and broker TLS.

``edgefleet ca init`` makes an ECDSA P-256 key and a self-signed CA certificate in a
directory (``ca.key`` mode 0600, ``ca.crt``). From it the server issues

* the broker's (and server's) TLS certificate, with the host names and addresses
  devices use (:meth:`FleetCA.issue_server`);
* each device's client certificate, from a certificate signing request the device made
  with a key that never left it (:meth:`FleetCA.sign_device_csr`): the subject is the
  device id the server enrolled, whatever the request asked for, so Mosquitto's
  ``use_identity_as_username`` makes the certificate's CN the MQTT username.

Errors are :class:`CAError` with a message that says what to do.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from device_agent._fsutil import atomic_write_bytes

CA_KEY = "ca.key"
CA_CERT = "ca.crt"
#: device certificates live this long; devices renew well before
DEVICE_CERT_DAYS = 90
MAX_CSR_BYTES = 16 * 1024


class CAError(Exception):
    """The fleet CA is missing, unreadable, or refused a request."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class Issued:
    """A key and certificate the CA issued (PEM)."""

    key_pem: bytes
    cert_pem: bytes


class FleetCA:
    """The CA key and certificate in ``root``."""

    def __init__(self, root: Path, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate):
        self.root = Path(root)
        self._key = key
        self.cert = cert

    @property
    def cert_pem(self) -> bytes:
        return _pem(self.cert)

    @property
    def cert_path(self) -> Path:
        return self.root / CA_CERT

    @classmethod
    def init(cls, root: Path, *, name: str = "edgefleet fleet CA", years: int = 10) -> FleetCA:
        """Create a new CA in ``root``; refuses to overwrite an existing one."""
        root = Path(root)
        if (root / CA_KEY).exists():
            raise CAError(f"{root / CA_KEY} exists; a fleet CA is there already (keep it)")
        root.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=365 * years))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        atomic_write_bytes(root / CA_KEY, key_pem, mode=0o600)
        atomic_write_bytes(root / CA_CERT, _pem(cert))
        return cls(root, key, cert)

    @classmethod
    def load(cls, root: Path) -> FleetCA:
        root = Path(root)
        try:
            key = serialization.load_pem_private_key((root / CA_KEY).read_bytes(), None)
            cert = x509.load_pem_x509_certificate((root / CA_CERT).read_bytes())
        except FileNotFoundError as e:
            raise CAError(f"no fleet CA in {root}; create one with `edgefleet ca init`") from e
        except ValueError as e:
            raise CAError(f"the fleet CA in {root} is unreadable: {e}") from e
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CAError(f"{root / CA_KEY} is not an EC key")
        return cls(root, key, cert)

    def _builder(
        self,
        subject: str,
        public_key: ec.EllipticCurvePublicKey,
        days: int,
        lifetime: dt.timedelta | None = None,
    ) -> x509.CertificateBuilder:
        now = _now()
        valid = lifetime if lifetime is not None else dt.timedelta(days=days)
        # valid a little before now for clocks behind ours; a tenth of a short lifetime
        backdate = dt.timedelta(minutes=5)
        if valid > dt.timedelta(0):
            backdate = min(backdate, valid / 10)
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - backdate)
            .not_valid_after(now + valid)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), False
            )
        )

    def issue_server(self, names: list[str], *, days: int = 825) -> Issued:
        """A TLS server certificate (and a new key) for ``names`` (DNS names or IPs)."""
        key = ec.generate_private_key(ec.SECP256R1())
        alt: list[x509.GeneralName] = []
        for n in names:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(n)))
            except ValueError:
                alt.append(x509.DNSName(n))
        cert = (
            self._builder(names[0], key.public_key(), days)
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
            .sign(self._key, hashes.SHA256())
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return Issued(key_pem, _pem(cert))

    def sign_device_csr(
        self,
        csr_pem: bytes | str,
        device_id: str,
        *,
        days: int = DEVICE_CERT_DAYS,
        lifetime: dt.timedelta | None = None,
    ) -> bytes:
        """A client certificate for ``device_id`` from the device's CSR (PEM), valid for
        ``lifetime`` (else ``days``) from now.

        The CSR's own signature must hold (the device has the key); its subject is
        ignored: the certificate names the enrolled device id.
        """
        raw = csr_pem.encode() if isinstance(csr_pem, str) else csr_pem
        if len(raw) > MAX_CSR_BYTES:
            raise CAError(f"the certificate request is above {MAX_CSR_BYTES} bytes")
        try:
            csr = x509.load_pem_x509_csr(raw)
        except ValueError as e:
            raise CAError(f"the certificate request is not a PEM CSR: {e}") from e
        if not csr.is_signature_valid:
            raise CAError("the certificate request's signature does not hold")
        public_key = csr.public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
            public_key.curve, (ec.SECP256R1, ec.SECP384R1)
        ):
            raise CAError("device keys must be ECDSA P-256 or P-384")
        cert = (
            self._builder(device_id, public_key, days, lifetime)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)
            .sign(self._key, hashes.SHA256())
        )
        return _pem(cert)

    def crl(self, revoked_serials: list[int], *, days: int = 30) -> bytes:
        """A certificate revocation list (PEM) naming ``revoked_serials``."""
        now = _now()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.cert.subject)
            .last_update(now - dt.timedelta(minutes=5))
            .next_update(now + dt.timedelta(days=days))
        )
        for serial in sorted(set(revoked_serials)):
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(serial)
                .revocation_date(now - dt.timedelta(minutes=5))
                .build()
            )
        return builder.sign(self._key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    def verify_issued(self, cert_pem: bytes) -> x509.Certificate:
        """The certificate if this CA signed it and it is valid now; CAError otherwise."""
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
            public = self._key.public_key()
            public.verify(
                cert.signature,
                cert.tbs_certificate_bytes,
                ec.ECDSA(cert.signature_hash_algorithm),  # type: ignore[arg-type]
            )
        except (ValueError, InvalidSignature) as e:
            raise CAError("the certificate was not issued by this fleet CA") from e
        now = _now()
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise CAError("the certificate has expired or is not valid yet")
        return cert


def _covers(cert_path: Path, ca: FleetCA, names: list[str]) -> bool:
    """Whether the certificate in ``cert_path`` is this CA's, names exactly ``names`` and
    has more than 30 days left."""
    try:
        cert = ca.verify_issued(cert_path.read_bytes())
        alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, CAError, x509.ExtensionNotFound):
        return False
    have = {str(v) for v in alt.get_values_for_type(x509.DNSName)}
    have |= {str(v) for v in alt.get_values_for_type(x509.IPAddress)}
    left = cert.not_valid_after_utc - _now()
    return have == {str(ipaddress.ip_address(n)) if _is_ip(n) else n for n in names} and (
        left > dt.timedelta(days=30)
    )


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def write_server_files(ca: FleetCA, directory: Path, names: list[str]) -> tuple[Path, Path]:
    """Issue a server certificate for ``names`` into ``directory`` (server.key 0600,
    server.crt) unless one for exactly these names, from this CA, with more than 30 days
    left is there; returns their paths."""
    key_path, cert_path = directory / "server.key", directory / "server.crt"
    if not (key_path.exists() and _covers(cert_path, ca, names)):
        issued = ca.issue_server(names)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(key_path, issued.key_pem, mode=0o600)
        atomic_write_bytes(cert_path, issued.cert_pem)
    os.chmod(key_path, 0o600)
    return key_path, cert_path


__all__ = ["CAError", "DEVICE_CERT_DAYS", "FleetCA", "Issued", "write_server_files"]
