"""When the agent renews its certificate: a pure function of the certificate, a reference
time and the configured fraction (no clock, no I/O)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509

from device_agent.identity import FileKeyProvider, renewal_due
from fleet_server.pki.ca import FleetCA


@pytest.fixture
def cert(tmp_path: Path) -> bytes:
    ca = FleetCA.init(tmp_path / "ca")
    key = FileKeyProvider(tmp_path / "device.key")
    return ca.sign_device_csr(key.csr("d1"), "d1", lifetime=dt.timedelta(days=100))


@pytest.mark.parametrize(
    ("days_after_issue", "fraction", "due"),
    [
        (0, 0.33, False),
        (60, 0.33, False),  # 40 of 100 days left
        (68, 0.33, True),  # 32 left: below a third
        (68, 0.2, False),
        (99.9, 0.01, True),
        (101, 0.01, True),  # expired: renewal is all that is left to try
    ],
)
def test_renewal_due_when_less_than_the_fraction_remains(
    cert: bytes, days_after_issue: float, fraction: float, due: bool
) -> None:
    issued = x509.load_pem_x509_certificate(cert).not_valid_after_utc - dt.timedelta(days=100)
    now = (issued + dt.timedelta(days=days_after_issue)).timestamp()
    assert renewal_due(cert, now, fraction) is due


def test_a_short_lifetime_is_backdated_by_a_tenth_only(tmp_path: Path) -> None:
    """A 60 s certificate must not be born 'due': the CA backdates by at most a tenth."""
    ca = FleetCA.init(tmp_path / "ca")
    key = FileKeyProvider(tmp_path / "device.key")
    pem = ca.sign_device_csr(key.csr("d1"), "d1", lifetime=dt.timedelta(seconds=60))
    c = x509.load_pem_x509_certificate(pem)
    assert (c.not_valid_after_utc - c.not_valid_before_utc).total_seconds() == pytest.approx(66)
    now = (c.not_valid_after_utc - dt.timedelta(seconds=59)).timestamp()
    assert not renewal_due(pem, now, 0.5)
    assert renewal_due(pem, now + 30, 0.5)
