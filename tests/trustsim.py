"""Helpers for the trust-chain attack tests: real signed bundles for a model name and
device classes, and HTTP servers an attacker controls (a recorder of every request,
and a redirector to another origin)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from converters.bundle import BundleFile, build_manifest, pack_bundle, sign_bundle
from device_agent.bundle.manifest import canonical_json
from device_agent.payloads import SmokeSamples
from tests.bundlesim import NOW, BundleSim, tiny_onnx_model
from tests.httpfixtures import SMOKE_INPUT, reference_outputs


def release(
    sim: BundleSim,
    *,
    name: str = "tiny",
    version: int,
    seed: int,
    classes: tuple[str, ...] = (),
    signer: str = "release",
    created: datetime = NOW - timedelta(days=1),
    valid_for: timedelta = timedelta(days=3650),
) -> Path:
    """A bundle of ``tiny_onnx_model(seed)`` with real smoke samples, signed by ``signer``."""
    d = sim.root / f"rel-{name}-{version}-{seed}-{'_'.join(classes)}-{signer}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "model.onnx").write_bytes(tiny_onnx_model(seed))
    smoke = SmokeSamples(
        inputs={"x": SMOKE_INPUT}, expected={"probs": reference_outputs(seed)}, atol=1e-5, rtol=1e-4
    ).to_json()
    (d / "smoke_samples.json").write_bytes(canonical_json(smoke))
    (d / "drift_profile.json").write_bytes(
        canonical_json({"placeholder": True, "schema_version": 1})
    )
    files = [
        BundleFile(d / "model.onnx", "model.onnx", "model"),
        BundleFile(d / "drift_profile.json", "drift_profile.json", "drift_profile"),
        BundleFile(d / "smoke_samples.json", "smoke_samples.json", "smoke_samples"),
    ]
    manifest = build_manifest(
        name=name,
        version=version,
        fmt="onnx",
        files=files,
        created_at=created,
        valid_for=valid_for,
        target_device_classes=classes,
        runtime={"engine": "onnxruntime", "onnx_ir_version": 8},
    )
    out = d / f"{name}-v{version}.efb"
    pack_bundle(out, manifest, files)
    sign_bundle(out, sim.key(signer))
    return out


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]


@dataclass
class AttackerServer:
    """An origin that records every request: a path in ``routes`` is answered with its
    body, any other path with ``body``, or, when ``redirect_to`` is set, with a redirect to
    the same path on that origin."""

    body: bytes = b"{}"
    routes: dict[str, bytes] = field(default_factory=dict)
    redirect_to: str | None = None
    status: int = 302
    seen: list[Seen] = field(default_factory=list)

    def start(self) -> AttackerServer:
        srv = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

            def do_GET(self) -> None:  # noqa: N802
                srv.seen.append(Seen(self.command, self.path, dict(self.headers.items())))
                n = int(self.headers.get("Content-Length") or 0)
                if n:
                    self.rfile.read(n)
                if self.path in srv.routes:
                    body = srv.routes[self.path]
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                if srv.redirect_to is not None:
                    self.send_response(srv.status)
                    self.send_header("Location", srv.redirect_to + self.path)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(srv.body)))
                self.end_headers()
                self.wfile.write(srv.body)

            do_POST = do_GET  # noqa: N815

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        assert isinstance(host, str)
        return f"http://{host}:{port}"

    def credentials_seen(self) -> list[str]:
        return [v for s in self.seen for k, v in s.headers.items() if k.lower() == "authorization"]


@dataclass
class FreezingProxy:
    """An attacker on the wire in front of ``upstream``: forwards every request except
    those whose path ends with a name in ``withhold`` (answered 503: a freeze)."""

    upstream: str
    withhold: set[str] = field(default_factory=set)

    def start(self) -> FreezingProxy:
        import urllib.error
        import urllib.request

        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

            def _forward(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else None
                if any(self.path.endswith(w) for w in proxy.withhold):
                    self._answer(503, b"", {})
                    return
                headers = {
                    k: v
                    for k, v in self.headers.items()
                    if k.lower() not in ("host", "content-length", "connection")
                }
                req = urllib.request.Request(
                    proxy.upstream + self.path, data=body, headers=headers, method=self.command
                )
                try:
                    with urllib.request.urlopen(req, timeout=30) as r:  # noqa: S310
                        self._answer(r.status, r.read(), dict(r.headers.items()))
                except urllib.error.HTTPError as e:
                    self._answer(e.code, e.read(), dict(e.headers.items()))

            def _answer(self, status: int, data: bytes, headers: dict[str, str]) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    if k.lower() in ("content-type", "etag", "content-range", "accept-ranges"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = _forward  # noqa: N815

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        assert isinstance(host, str)
        return f"http://{host}:{port}"
