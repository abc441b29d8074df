"""Serving the fleet server over TLS with the fleet CA, and the client certificate in scope.

With ``ca_dir`` set, ``edgefleet server`` serves HTTPS with a server certificate issued
from the fleet CA (kept in ``tls_dir``) and asks every client for a certificate from
that CA (``ssl_cert_reqs = CERT_OPTIONAL``: operators and devices that have not enrolled
yet connect without one; a certificate from another CA fails the handshake).

uvicorn does not put the peer certificate into the ASGI scope, so
:class:`PeerCertProtocol` (uvicorn's own HTTP protocol, one method more) copies the
verified client certificate of each TLS connection into ``scope["state"]`` under
:data:`PEER_CERT_STATE`, where :func:`peer_certificate` reads it. The state is filled by
the server only; no header can set it.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from uvicorn.protocols.http.auto import AutoHTTPProtocol

from fleet_server.pki.ca import FleetCA, write_server_files

#: key in ``scope["state"]`` holding the DER bytes of the connection's client certificate
PEER_CERT_STATE = "edgefleet.tls.client_cert"


class PeerCertProtocol(AutoHTTPProtocol):  # type: ignore[misc,valid-type]
    """uvicorn's HTTP protocol, with the TLS client certificate in every request's state."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if der:  # per connection: shadow the shared lifespan state with a copy holding it
            shared: dict[str, Any] = self.app_state  # type: ignore[has-type]
            self.app_state = {**shared, PEER_CERT_STATE: der}


def peer_certificate(scope: Mapping[str, Any]) -> bytes | None:
    """The verified client certificate (DER) of the request's TLS connection, or None."""
    state = scope.get("state")
    der = state.get(PEER_CERT_STATE) if isinstance(state, Mapping) else None
    return der if isinstance(der, bytes) else None


def server_names(host: str, extra: list[str]) -> list[str]:
    """Names the server certificate covers: ``extra`` first, then the listen address."""
    names = [*extra]
    for n in (host, "localhost", "127.0.0.1"):
        if n not in names and n not in ("0.0.0.0", "::"):
            names.append(n)
    return names


def uvicorn_tls_options(ca_dir: Path, tls_dir: Path, names: list[str]) -> dict[str, Any]:
    """``uvicorn.run`` keyword arguments for HTTPS with optional client certificates
    from the fleet CA in ``ca_dir``; the server key and certificate go to ``tls_dir``."""
    ca = FleetCA.load(ca_dir)
    key, cert = write_server_files(ca, Path(tls_dir), names)
    return {
        "ssl_keyfile": str(key),
        "ssl_certfile": str(cert),
        "ssl_ca_certs": str(ca.cert_path),
        "ssl_cert_reqs": ssl.CERT_OPTIONAL,
        "http": PeerCertProtocol,
    }


__all__ = [
    "PEER_CERT_STATE",
    "PeerCertProtocol",
    "peer_certificate",
    "server_names",
    "uvicorn_tls_options",
]
