"""First-boot enrollment: trade a single-use token for a device id and certificate.

The device makes its key pair here (``state_dir/device.key``, never sent) and sends a
certificate signing request. A server with a fleet CA answers with the device's client
certificate, the fleet CA and the MQTT endpoint, all kept in ``state_dir`` and named in
``state_dir/identity.json``; :meth:`AgentConfig.load` picks them up from there, so HTTP
and MQTT use the certificate and the image needs no hand-typed broker address. A server
without a CA (development) answers with a bearer credential instead, written with mode
0600 to ``server.token_file``. Over ``https://`` the server is verified against
``[server] ca_file`` (the fleet CA shipped in the image). Uses only the standard library.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ._fsutil import atomic_write_bytes
from .config import IDENTITY_FILE, AgentConfig
from .protocol import ENROLL_PATH

#: files enrollment keeps in ``state_dir`` beside identity.json
DEVICE_KEY_FILE = "device.key"
DEVICE_CERT_FILE = "device.crt"
FLEET_CA_FILE = "fleet-ca.crt"


class EnrollmentError(Exception):
    """Enrollment failed; the message says whether to retry or get a new token."""


@dataclass(frozen=True)
class Enrollment:
    device_id: str
    #: the bearer credential's file; None for a device enrolled with a certificate
    credential_file: Path | None
    identity_file: Path


def enroll(config: AgentConfig, token: str, *, requested_id: str | None = None) -> Enrollment:
    """Enroll with the server named in ``config``; store the credential and identity."""
    if not config.server.url:
        raise EnrollmentError("no server url configured ([server] url); cannot enroll")
    body = {
        "enrollment_token": token.strip(),
        "device_class": config.device.device_class,
        "labels": dict(config.device.labels),
    }
    if requested_id:
        body["device_id"] = requested_id
    # the device's own key pair (made here at first boot, never sent): the server signs a
    # client certificate for it when it has a fleet CA, and ignores the request otherwise
    from .identity import FileKeyProvider, IdentityError

    keys = FileKeyProvider(Path(config.device.state_dir) / DEVICE_KEY_FILE)
    try:
        body["csr"] = keys.csr(requested_id or "device").decode()
    except (IdentityError, OSError) as e:
        raise EnrollmentError(f"cannot make the device key pair: {e}") from e
    req = urllib.request.Request(
        config.server.url.rstrip("/") + ENROLL_PATH,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    context = None
    if config.server.url.startswith("https://"):
        from .identity import client_ssl_context

        try:
            context = client_ssl_context(config.server.ca_file)
        except IdentityError as e:
            raise EnrollmentError(f"cannot set up TLS to the server: {e}") from e
    try:
        with urllib.request.urlopen(
            req, timeout=config.server.timeout_seconds, context=context
        ) as resp:
            answer = json.loads(resp.read())
    except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace")[:500]
        if e.code in (401, 403, 410):
            raise EnrollmentError(
                f"the server refused the enrollment token ({e.code}: {detail}); it is used, "
                "expired or wrong: ask the operator for a new one (`edgefleet enroll-token "
                "create`)"
            ) from e
        raise EnrollmentError(f"enrollment failed with HTTP {e.code}: {detail}") from e
    except (urllib.error.URLError, OSError) as e:
        raise EnrollmentError(
            f"cannot reach the server at {config.server.url} ({e}); check the network and "
            "retry, the token stays valid until it expires"
        ) from e
    try:
        device_id = str(answer["device_id"])
        credential = answer.get("credential")
    except (KeyError, TypeError, AttributeError) as e:
        raise EnrollmentError(f"unexpected enrollment answer: {answer!r:.300}") from e
    if not isinstance(answer.get("certificate"), str) and not isinstance(credential, str):
        raise EnrollmentError("the server answered with neither a certificate nor a credential")
    cred_file = None
    if isinstance(credential, str):  # a server without a fleet CA (development)
        if config.server.token_file is None:
            raise EnrollmentError(
                "the server enrolls by bearer credential (it has no fleet CA) and no "
                "[server] token_file is configured to store it in"
            )
        cred_file = Path(config.server.token_file)
        atomic_write_bytes(cred_file, credential.encode() + b"\n", mode=0o600)
        os.chmod(cred_file, 0o600)
    state = Path(config.device.state_dir)
    state.mkdir(parents=True, exist_ok=True)
    identity = state / IDENTITY_FILE
    record: dict[str, object] = {"device_id": device_id}
    mqtt = answer.get("mqtt")
    if isinstance(mqtt, dict):  # where to send telemetry: no hand-typed broker address
        endpoint = {k: mqtt.get(k) for k in ("host", "port", "mqtt_version", "tls")}
        if isinstance(mqtt.get("ca_pem"), str):
            atomic_write_bytes(state / FLEET_CA_FILE, mqtt["ca_pem"].encode())
            endpoint["ca_file"] = str(state / FLEET_CA_FILE)
        record["mqtt"] = endpoint
    if isinstance(answer.get("certificate"), str):
        from .identity import save_certificate

        save_certificate(state / DEVICE_CERT_FILE, answer["certificate"])
        record["certificate"] = str(state / DEVICE_CERT_FILE)
        record["key"] = str(state / DEVICE_KEY_FILE)
        if isinstance(answer.get("ca_pem"), str):
            atomic_write_bytes(state / FLEET_CA_FILE, answer["ca_pem"].encode())
            record["ca_file"] = str(state / FLEET_CA_FILE)
    atomic_write_bytes(identity, json.dumps(record).encode() + b"\n")
    return Enrollment(device_id, cred_file, identity)


def read_credential(config: AgentConfig) -> str | None:
    """The stored device credential, or None before enrollment."""
    path = config.server.token_file
    if path is None or not Path(path).exists():
        return None
    return Path(path).read_text().strip() or None
