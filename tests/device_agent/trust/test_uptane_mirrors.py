"""Bundles from mirrors: a device on the Uptane chain takes a released bundle from the
first configured mirror that serves the signed bytes, never sends a mirror its credential,
and falls back to the server when a mirror serves other bytes or is down (a real agent,
real HTTP servers)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from device_agent.config import AgentConfig, ConfigError
from device_agent.daemon import AgentDaemon
from tests.bundlesim import BundleSim
from tests.device_agent.trust.test_uptane_attacks import (  # noqa: F401  (fixtures)
    CLASS,
    Clock,
    assert_serving,
    clock,
    close,
    make_daemon,
    usim,
)
from tests.trustsim import release as build
from tests.uptanesim import Released, UptaneSim


class Mirror:
    """A static file server: target path -> bytes; records what each request carried."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, dict[str, str]]] = []
        mirror = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

            def do_GET(self) -> None:  # noqa: N802
                mirror.requests.append((self.path, dict(self.headers)))
                body = mirror.files.get(self.path.removeprefix("/pub/"))
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/pub/"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def mirror() -> Iterator[Mirror]:
    m = Mirror()
    yield m
    m.stop()


@contextlib.contextmanager
def daemon_with(
    tmp_path: Path,
    sim: BundleSim,
    usim: UptaneSim,  # noqa: F811
    clock: Clock,  # noqa: F811
    mirrors: list[str],
) -> Iterator[AgentDaemon]:
    d = make_daemon(tmp_path, sim, usim, clock, uptane={"mirrors": mirrors})
    d.updater.boot()
    try:
        yield d
    finally:
        close(d)


@pytest.fixture
def v1(usim: UptaneSim, sim: BundleSim) -> Released:  # noqa: F811
    return usim.release(
        build(sim, version=1, seed=1, classes=(CLASS,)), name="tiny", version=1, classes=(CLASS,)
    )


def target_path(rel: Released) -> str:
    return f"{rel.name}/{rel.sha256}.efb"


def test_bundle_comes_from_the_mirror_without_the_credential(
    tmp_path: Path,
    sim: BundleSim,
    usim: UptaneSim,  # noqa: F811
    clock: Clock,  # noqa: F811
    v1: Released,
    mirror: Mirror,
) -> None:
    mirror.files[target_path(v1)] = v1.path.read_bytes()
    usim.bundles.clear()  # the server no longer serves bundles: only the mirror can
    with daemon_with(tmp_path, sim, usim, clock, ["http://127.0.0.1:9/down/", mirror.url]) as d:
        usim.direct_release("dev-1", v1)
        d.updater.check()
        assert_serving(d, 1, seed=1)
    assert [p for p, _ in mirror.requests] == [f"/pub/{target_path(v1)}"]
    assert all("Authorization" not in h for _, h in mirror.requests)


def test_mirror_serving_other_bytes_is_refused_and_the_server_serves_the_release(
    tmp_path: Path,
    sim: BundleSim,
    usim: UptaneSim,  # noqa: F811
    clock: Clock,  # noqa: F811
    v1: Released,
    mirror: Mirror,
) -> None:
    other = build(sim, version=1, seed=7, classes=(CLASS,)).read_bytes()  # signed, but not v1
    mirror.files[target_path(v1)] = other[: v1.length].ljust(v1.length, b"\0")
    with daemon_with(tmp_path, sim, usim, clock, [mirror.url]) as d:
        usim.direct_release("dev-1", v1)
        d.updater.check()
        assert_serving(d, 1, seed=1)  # v1's own bytes, from the server
    assert len(mirror.requests) == 1


def test_mirror_that_is_not_an_http_url_is_refused_at_start() -> None:
    cfg = AgentConfig.from_dict({"uptane": {"mirrors": ["file:///etc/passwd"]}})
    with pytest.raises(ConfigError, match="uptane.mirrors"):
        cfg.validate()
