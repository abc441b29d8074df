"""Certificate renewal: a new client certificate before the current one expires.

The device sends a new certificate signing request (made with its key) to the server
over TLS, presenting its current certificate: the handshake proves it holds the key of
a valid certificate, which is what the server checks before it signs. The new
certificate replaces the old file atomically; the earlier one stays valid on the server
until it expires, so an answer lost on the way locks the device out of nothing.

:func:`renewal_due` (in :mod:`device_agent.identity`) decides when: less than
``[server] renew_fraction`` of the validity left. Uses only the standard library.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from .config import AgentConfig
from .identity import (
    FileKeyProvider,
    IdentityError,
    client_ssl_context,
    renewal_due,
    save_certificate,
)
from .protocol import CERTIFICATE_PATH

_SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


class RenewalError(Exception):
    """The certificate was not renewed; the current one is kept (the agent retries)."""


def due(config: AgentConfig, now: float) -> bool:
    """Whether the device's certificate should be renewed at ``now``."""
    cert = config.server.cert_file
    if cert is None or not config.server.url.startswith("https://"):
        return False
    try:
        pem = Path(cert).read_bytes()
    except OSError as e:
        raise RenewalError(f"cannot read the device certificate {cert}: {e}") from e
    try:
        return renewal_due(pem, now, config.server.renew_fraction)
    except ValueError as e:
        raise RenewalError(f"the device certificate {cert} does not parse: {e}") from e


def renew(config: AgentConfig) -> Path:
    """Ask the server for a new certificate and store it; returns its file."""
    s = config.server
    if s.cert_file is None or s.key_file is None:
        raise RenewalError("the device has no certificate to renew; enroll it first")
    keys = FileKeyProvider(Path(s.key_file))
    try:
        csr = keys.csr(config.device.id)
        context = client_ssl_context(s.ca_file, Path(s.cert_file), Path(s.key_file))
    except (IdentityError, OSError) as e:
        raise RenewalError(str(e)) from e
    req = urllib.request.Request(
        s.url.rstrip("/") + CERTIFICATE_PATH,
        data=json.dumps({"csr": csr.decode()}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=s.timeout_seconds, context=context) as resp:
            answer = json.loads(resp.read(64 * 1024))
    except urllib.error.HTTPError as e:
        detail = e.read(2000).decode(errors="replace")
        raise RenewalError(f"the server refused the renewal ({e.code}: {detail})") from e
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise RenewalError(f"cannot reach the server for renewal ({e}); will retry") from e
    pem = answer.get("certificate") if isinstance(answer, dict) else None
    if not isinstance(pem, str):
        raise RenewalError(f"unexpected renewal answer: {answer!r:.200}")
    try:  # the new certificate must be for our key, or the device would lock itself out
        mine = x509.load_pem_x509_csr(csr).public_key().public_bytes(*_SPKI)
        theirs = x509.load_pem_x509_certificate(pem.encode()).public_key().public_bytes(*_SPKI)
    except ValueError as e:
        raise RenewalError(f"the server sent a certificate that does not parse: {e}") from e
    if mine != theirs:
        raise RenewalError("the server sent a certificate for another key; kept the current one")
    try:
        return save_certificate(Path(s.cert_file), pem)
    except IdentityError as e:
        raise RenewalError(str(e)) from e


__all__ = ["RenewalError", "due", "renew"]
