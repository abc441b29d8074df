"""Shared pieces for the endpoint tests: real signed models, raw HTTP over a socket."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_agent.bundle import TrustStore
from device_agent.model import LoadedModel
from tests.agent_models import install, make_bundle


class Signer:
    """Signs real bundles and installs them into slot directories under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.key = Ed25519PrivateKey.generate()
        self.trust = TrustStore()
        self.trust.add(self.key.public_key(), comment="test")
        self.n = 0

    def bundle(self, data: bytes, name: str = "mlp", version: int = 1) -> Path:
        return make_bundle(self.root, self.key, model_bytes=data, name=name, version=version)

    def load(self, data: bytes, name: str = "mlp", version: int = 1) -> LoadedModel:
        self.n += 1
        return install(self.bundle(data, name, version), self.root / f"slot-{self.n}", self.trust)


def raw_request(address: str | tuple[str, int], data: bytes, timeout: float = 10.0) -> bytes:
    """Send ``data`` as is and return everything the server sends before closing or
    finishing one response."""
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(address)
        s.sendall(data)
        return read_response(s)


def read_response(s: socket.socket) -> bytes:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            return buf
        buf += chunk
    head, rest = buf.split(b"\r\n\r\n", 1)
    length = 0
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            length = int(v)
    while len(rest) < length:
        chunk = s.recv(65536)
        if not chunk:
            break
        rest += chunk
    return head + b"\r\n\r\n" + rest


def status_and_json(response: bytes) -> tuple[int, Any]:
    head, _, body = response.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, (json.loads(body) if body else None)


def infer_request(path: str, doc: dict[str, Any], binary: bytes = b"",
                  extra: str = "") -> bytes:  # fmt: skip
    header = json.dumps(doc).encode()
    body = header + binary
    hl = f"Inference-Header-Content-Length: {len(header)}\r\n" if binary else ""
    return (
        f"POST {path} HTTP/1.1\r\nHost: local\r\nContent-Length: {len(body)}\r\n{hl}{extra}\r\n"
    ).encode() + body


def x16(seed: int, batch: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(batch, 16)).astype(np.float32)
