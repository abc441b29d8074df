"""The endpoint's default connection limit: 64 apps' connections held open at once are
all served; the 65th is refused with 503 (see docs/serving.md)."""

from __future__ import annotations

import socket
from typing import Any

from device_agent.config import ServingConfig
from device_agent.model import LoadedModel
from tests.device_agent.serving.kit import read_response, status_and_json
from tests.device_agent.serving.test_endpoint import serve as serve  # noqa: F401 - fixture
from tests.device_agent.serving.test_endpoint import sock


def test_64_connections_are_served_by_default_and_the_65th_gets_503(
    mlp: LoadedModel,
    serve: Any,  # noqa: F811
) -> None:
    assert ServingConfig().max_connections == 64
    _, ep = serve(mlp)
    held = [socket.socket(socket.AF_UNIX) for _ in range(64)]
    try:
        for s in held:
            s.settimeout(10)
            s.connect(sock(ep))
            s.sendall(b"GET /v2/health/live HTTP/1.1\r\n\r\n")
            assert read_response(s).startswith(b"HTTP/1.1 200")  # served, kept alive
        with socket.socket(socket.AF_UNIX) as extra:
            extra.settimeout(10)
            extra.connect(sock(ep))
            status, body = status_and_json(read_response(extra))
        assert (status, body["code"]) == (503, "busy")
    finally:
        for s in held:
            s.close()
