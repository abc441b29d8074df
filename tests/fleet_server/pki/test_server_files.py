"""The server's and broker's TLS certificate is issued again when what it names changes
(a new host name for devices), when another CA is configured or when it nears expiry;
otherwise the same files are kept across restarts."""

from __future__ import annotations

from pathlib import Path

from cryptography import x509

from fleet_server.pki.ca import FleetCA, write_server_files


def _names(cert: Path) -> set[str]:
    c = x509.load_pem_x509_certificate(cert.read_bytes())
    alt = c.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(v) for v in alt.get_values_for_type(x509.DNSName)} | {
        str(v) for v in alt.get_values_for_type(x509.IPAddress)
    }


def test_kept_while_the_names_hold_and_issued_again_when_they_change(tmp_path: Path) -> None:
    ca = FleetCA.init(tmp_path / "ca")
    tls = tmp_path / "tls"
    _, cert = write_server_files(ca, tls, ["127.0.0.1", "localhost"])
    first = cert.read_bytes()
    write_server_files(ca, tls, ["127.0.0.1", "localhost"])
    assert cert.read_bytes() == first
    write_server_files(ca, tls, ["fleet.example.com", "127.0.0.1", "localhost"])
    assert cert.read_bytes() != first
    assert _names(cert) == {"fleet.example.com", "127.0.0.1", "localhost"}


def test_issued_again_under_another_ca(tmp_path: Path) -> None:
    tls = tmp_path / "tls"
    _, cert = write_server_files(FleetCA.init(tmp_path / "ca1"), tls, ["localhost"])
    other = FleetCA.init(tmp_path / "ca2")
    write_server_files(other, tls, ["localhost"])
    other.verify_issued(cert.read_bytes())  # raises if still the first CA's
