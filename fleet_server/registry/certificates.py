"""Device certificates: what the fleet CA issued, and which client certificate is whose.

HTTP device requests over TLS carry the device's client certificate (the TLS layer has
already checked that the fleet CA signed it and that it is within its validity). The
server then accepts it only when its serial is a row of ``device_certificates`` that is
not revoked, not expired, for a device that is not revoked, and its CN names that
device. The table holds certificates only (public): a copy of the database lets no one
act as a device, since the private keys never left the devices.

:class:`CertificateAuth` caches the answer per certificate for a few seconds (the
check-in hot path does no database work on a hit); revocation on this replica evicts at
once, other replicas follow within ``ttl_seconds``.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import datetime

from cryptography import x509
from cryptography.x509.oid import NameOID
from sqlalchemy import Engine, bindparam, select, update
from sqlalchemy.orm import Session

from fleet_server.db.models import Device, DeviceCertificate
from fleet_server.db.types import utcnow


def serial_hex(cert: x509.Certificate) -> str:
    """The certificate's serial number as stored (lower-case hex)."""
    return format(cert.serial_number, "x")


def common_name(cert: x509.Certificate) -> str | None:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = names[0].value if names else None
    return value if isinstance(value, str) else None


def record_certificate(
    session: Session, device_id: str, cert_pem: bytes, *, reason: str = "enroll"
) -> x509.Certificate:
    """Store a certificate the CA just issued to ``device_id``; the caller commits."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    session.add(
        DeviceCertificate(
            serial=serial_hex(cert),
            device_id=device_id,
            pem=cert_pem.decode(),
            not_after=cert.not_valid_after_utc,
            issued_at=utcnow(),
            reason=reason,
        )
    )
    return cert


def revoke_certificates(session: Session, device_id: str) -> list[int]:
    """Mark every certificate of ``device_id`` revoked; their serials (for the CRL)."""
    serials = list(
        session.scalars(
            select(DeviceCertificate.serial).where(
                DeviceCertificate.device_id == device_id, DeviceCertificate.revoked_at.is_(None)
            )
        )
    )
    session.execute(
        update(DeviceCertificate)
        .where(DeviceCertificate.device_id == device_id, DeviceCertificate.revoked_at.is_(None))
        .values(revoked_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    return [int(s, 16) for s in serials]


class CertificateAuth:
    """Client certificate (DER) -> device id, for valid recorded certificates only."""

    def __init__(
        self,
        engine: Engine,
        *,
        ttl_seconds: float = 5.0,
        max_size: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._engine = engine
        self._ttl = ttl_seconds
        self._max = max_size
        self._clock = clock
        #: DER -> (device id, not_after, cached at)
        self._entries: OrderedDict[bytes, tuple[str, datetime, float]] = OrderedDict()
        self._lock = threading.Lock()
        self._stmt = (
            select(DeviceCertificate.device_id, DeviceCertificate.not_after)
            .join(Device, Device.id == DeviceCertificate.device_id)
            .where(
                DeviceCertificate.serial == bindparam("s"),
                DeviceCertificate.revoked_at.is_(None),
                Device.revoked_at.is_(None),
            )
        )

    def get(self, der: bytes) -> str | None:
        """The cached device id for this certificate, or None (no database access)."""
        with self._lock:
            entry = self._entries.get(der)
            if entry is None:
                return None
            device_id, not_after, at = entry
            if self._clock() - at > self._ttl or utcnow() >= not_after:
                del self._entries[der]
                return None
            self._entries.move_to_end(der)
            return device_id

    def load(self, der: bytes) -> str | None:
        """Check the certificate against the database (blocking) and cache a valid one."""
        try:
            cert = x509.load_der_x509_certificate(der)
        except ValueError:
            return None
        with self._engine.connect() as conn:
            row = conn.execute(self._stmt, {"s": serial_hex(cert)}).first()
        if row is None:
            return None
        device_id, not_after = str(row[0]), row[1]
        if common_name(cert) != device_id or utcnow() >= not_after:
            return None
        if self._max > 0:
            with self._lock:
                self._entries[der] = (device_id, not_after, self._clock())
                while len(self._entries) > self._max:
                    self._entries.popitem(last=False)
        return device_id

    def evict_device(self, device_id: str) -> None:
        with self._lock:
            for der in [k for k, v in self._entries.items() if v[0] == device_id]:
                del self._entries[der]


__all__ = [
    "CertificateAuth",
    "common_name",
    "record_certificate",
    "revoke_certificates",
    "serial_hex",
]
