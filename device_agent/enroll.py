"""First-boot enrollment: trade a single-use token for a device id and credential.

The credential is written with mode 0600 to ``server.token_file`` and the
device id to ``state_dir/identity.json``; later :meth:`AgentConfig.load` picks
the id up from there. Uses only the standard library (the agent stays small).
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
    credential_file: Path
    identity_file: Path


def enroll(config: AgentConfig, token: str, *, requested_id: str | None = None) -> Enrollment:
    """Enroll with the server named in ``config``; store the credential and identity."""
    if not config.server.url:
        raise EnrollmentError("no server url configured ([server] url); cannot enroll")
    if config.server.token_file is None:
        raise EnrollmentError("no [server] token_file configured to store the credential in")
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
    try:
        with urllib.request.urlopen(req, timeout=config.server.timeout_seconds) as resp:
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
        device_id, credential = str(answer["device_id"]), str(answer["credential"])
    except (KeyError, TypeError) as e:
        raise EnrollmentError(f"unexpected enrollment answer: {answer!r}") from e
    cred_file = Path(config.server.token_file)
    atomic_write_bytes(cred_file, credential.encode() + b"\n", mode=0o600)
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
    atomic_write_bytes(identity, json.dumps(record).encode() + b"\n")
    os.chmod(cred_file, 0o600)
    return Enrollment(device_id, cred_file, identity)


def read_credential(config: AgentConfig) -> str | None:
    """The stored device credential, or None before enrollment."""
    path = config.server.token_file
    if path is None or not Path(path).exists():
        return None
    return Path(path).read_text().strip() or None
