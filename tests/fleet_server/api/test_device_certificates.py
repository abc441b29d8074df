"""Device certificates on the server side (SQLite and PostgreSQL), without TLS in the way.

The TLS layer hands the verified client certificate to the app in the request state;
these tests put it there the way :class:`fleet_server.pki.serve.PeerCertProtocol` does,
so the rules are checked on both databases: a recorded certificate names its device, a
revoked or unrecorded one names nobody, and a device that has a certificate is refused
by bearer token.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from device_agent.identity import FileKeyProvider
from fleet_server.pki.ca import FleetCA
from fleet_server.pki.serve import PEER_CERT_STATE, peer_certificate
from fleet_server.registry.certificates import CertificateAuth, record_certificate

if TYPE_CHECKING:
    from pathlib import Path

    from tests.server_fixtures import Fleet


def _der(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)


def _record(f: Fleet, device_id: str, pem: bytes) -> None:
    with f.ctx.session() as session:
        record_certificate(session, device_id, pem)
        session.commit()


@pytest.fixture
def ca(tmp_path: Path) -> FleetCA:
    return FleetCA.init(tmp_path / "ca")


def test_peer_certificate_comes_from_server_state_only() -> None:
    assert peer_certificate({"state": {PEER_CERT_STATE: b"\x30\x01"}}) == b"\x30\x01"
    assert peer_certificate({"headers": [(b"x-client-cert", b"x")], "state": {}}) is None
    assert peer_certificate({}) is None


def test_a_recorded_certificate_names_its_device_until_revoked(
    fleet: Fleet, ca: FleetCA, tmp_path: Path
) -> None:
    fleet.enroll("cam-1")
    key = FileKeyProvider(tmp_path / "k1")
    pem = ca.sign_device_csr(key.csr("cam-1"), "cam-1")
    auth = CertificateAuth(fleet.ctx.engine, ttl_seconds=60)
    assert auth.load(_der(pem)) is None  # signed by the CA but not recorded: nobody
    _record(fleet, "cam-1", pem)
    assert auth.load(_der(pem)) == "cam-1"
    assert auth.get(_der(pem)) == "cam-1"
    r = fleet.client.post("/api/v1/devices/cam-1/revoke", headers=fleet.admin)
    assert r.status_code == 200, r.text
    fleet.ctx.device_certs.evict_device("cam-1")
    auth.evict_device("cam-1")
    assert auth.get(_der(pem)) is None and auth.load(_der(pem)) is None


def test_a_certificate_naming_another_device_is_refused(
    fleet: Fleet, ca: FleetCA, tmp_path: Path
) -> None:
    """A row is bound to the certificate's CN: a serial recorded for cam-2 does not let a
    certificate whose CN is cam-3 through."""
    fleet.enroll("cam-2")
    fleet.enroll("cam-3")
    key = FileKeyProvider(tmp_path / "k2")
    pem = ca.sign_device_csr(key.csr("x"), "cam-3")
    with fleet.ctx.session() as session:
        cert = record_certificate(session, "cam-2", pem)
        session.commit()
    assert cert.subject.rfc4514_string() == "CN=cam-3"
    assert CertificateAuth(fleet.ctx.engine).load(_der(pem)) is None


def test_an_expired_recorded_certificate_is_refused(
    fleet: Fleet, ca: FleetCA, tmp_path: Path
) -> None:
    fleet.enroll("cam-4")
    key = FileKeyProvider(tmp_path / "k4")
    pem = ca.sign_device_csr(key.csr("cam-4"), "cam-4", lifetime=dt.timedelta(seconds=-1))
    _record(fleet, "cam-4", pem)
    assert CertificateAuth(fleet.ctx.engine).load(_der(pem)) is None


def test_bearer_token_refused_once_the_device_has_a_certificate(
    fleet: Fleet, ca: FleetCA, tmp_path: Path
) -> None:
    headers = fleet.enroll("cam-5")  # enrolled by token (a server without a CA)
    assert fleet.client.get("/device/v1/assignment", headers=headers).status_code == 200
    key = FileKeyProvider(tmp_path / "k5")
    _record(fleet, "cam-5", ca.sign_device_csr(key.csr("cam-5"), "cam-5"))
    fleet.ctx.device_auth.evict_device("cam-5")
    for path in ("/device/v1/assignment", "/device/v1/reports"):
        kw: dict[str, Any] = {"json": {"reports": []}} if path.endswith("reports") else {}
        method = fleet.client.post if kw else fleet.client.get
        r = method(path, headers=headers, **kw)
        assert r.status_code == 401, (path, r.text)
        assert "certificate" in r.text


def test_renewal_needs_a_client_certificate(fleet: Fleet, tmp_path: Path) -> None:
    headers = fleet.enroll("cam-6")
    key = FileKeyProvider(tmp_path / "k6")
    r = fleet.client.post(
        "/device/v1/certificate", headers=headers, json={"csr": key.csr("cam-6").decode()}
    )
    assert r.status_code == 401, r.text  # a bearer token renews nothing
