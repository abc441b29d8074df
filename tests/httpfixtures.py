"""A real HTTP server for update tests, able to misbehave on purpose; and signed
bundles whose smoke samples are real.

:class:`BundleServer` serves the device API's assignment document (with ETag
and ``304``), bundle files (with ``Range``/``206``/``416``) and collects
reports, on ``127.0.0.1`` at a free port, from a thread of the test process.
Faults are set per bundle (:class:`Fault`): drop the connection after N bytes
(a number of times), serve other bytes, stream forever, ignore ``Range``, or
go slowly so a test can kill the client mid-body.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

from converters.bundle import BundleFile, build_manifest, pack_bundle, sign_bundle
from device_agent.bundle.manifest import canonical_json
from device_agent.payloads import SmokeSamples
from device_agent.protocol import ASSIGNMENT_PATH, DEVICE_API_PREFIX, REPORTS_PATH
from tests.bundlesim import NOW, BundleSim, tiny_onnx_model

BUNDLES_PREFIX = f"{DEVICE_API_PREFIX}/bundles/"
SMOKE_INPUT = np.linspace(-1.0, 1.0, 16, dtype=np.float32).reshape(4, 4)


# -- bundles with real smoke samples ------------------------------------------------


def reference_outputs(seed: int, x: np.ndarray = SMOKE_INPUT) -> np.ndarray:
    """What ``tiny_onnx_model(seed)`` computes on ``x``, by onnxruntime."""
    import onnxruntime as ort

    sess = ort.InferenceSession(tiny_onnx_model(seed), providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, {"x": x})[0])


def publish(
    sim: BundleSim,
    *,
    version: int,
    seed: int,
    smoke: str = "real",
    created: datetime = NOW - timedelta(days=1),
    valid_for: timedelta = timedelta(days=3650),
    name: str = "tiny",
) -> Path:
    """A signed bundle of ``tiny_onnx_model(seed)``.

    ``smoke``: ``"real"`` (expected outputs computed by onnxruntime),
    ``"mismatch"`` (expected outputs of another model: the smoke test fails),
    or ``"none"`` (placeholder).
    """
    d = sim.root / f"smoked-{name}-{version}-{seed}-{smoke}-{created.timestamp():.0f}"
    d.mkdir(parents=True, exist_ok=True)
    model = d / "model.onnx"
    model.write_bytes(tiny_onnx_model(seed))
    if smoke == "none":
        smoke_doc: dict[str, Any] = {"placeholder": True, "schema_version": 1}
    else:
        expected = reference_outputs(seed if smoke == "real" else seed + 1000)
        smoke_doc = SmokeSamples(
            inputs={"x": SMOKE_INPUT}, expected={"probs": expected}, atol=1e-5, rtol=1e-4
        ).to_json()
    (d / "smoke_samples.json").write_bytes(canonical_json(smoke_doc))
    (d / "drift_profile.json").write_bytes(
        canonical_json({"placeholder": True, "schema_version": 1})
    )
    files = [
        BundleFile(model, "model.onnx", "model"),
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
        runtime={"engine": "onnxruntime", "onnx_ir_version": 8},
    )
    out = d / f"{name}-v{version}.efb"
    pack_bundle(out, manifest, files)
    sign_bundle(out, sim.key("release"))
    return out


# -- the server ------------------------------------------------------------------------


@dataclass
class Fault:
    drop_after: int | None = None  # close the connection after this many body bytes ...
    drop_times: int = 1  # ... on this many requests
    wrong_bytes: bool = False  # serve the file with its bytes flipped
    endless: bool = False  # stream forever, no Content-Length
    ignore_range: bool = False  # always answer 200 with the whole file
    slow_seconds: float = 0.0  # sleep between chunks
    refuse_range_times: int = 0  # answer 416 to this many Range requests


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    status: int = 0
    sent: int = 0


@dataclass
class BundleServer:
    """The device API of a fake server; start with :meth:`start`, stop with :meth:`stop`."""

    assignment: dict[str, Any] | None = None
    bundles: dict[str, Path] = field(default_factory=dict)
    faults: dict[str, Fault] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    reports: list[dict[str, Any]] = field(default_factory=list)
    chunk: int = 4096

    def start(self) -> BundleServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

            def do_GET(self) -> None:  # noqa: N802
                server._get(self)

            def do_POST(self) -> None:  # noqa: N802
                server._post(self)

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

    # -- test-facing helpers -----------------------------------------------------
    def offer(
        self,
        bundle: Path,
        *,
        version: int,
        name: str = "tiny",
        shadow: Path | None = None,
        shadow_version: int | None = None,
        bundle_id: str | None = None,
        size: int | None = None,
    ) -> dict[str, Any]:
        """Serve ``bundle`` and assign it as ``desired`` (and ``shadow`` if given)."""
        doc: dict[str, Any] = {
            "device_id": "dev-1",
            "rollout_id": None,
            "stage": None,
            "telemetry": {},
        }
        doc["desired"] = self._ref(bundle, name, version, bundle_id, size)
        doc["shadow"] = (
            self._ref(shadow, name, shadow_version or version, None, None)
            if shadow is not None
            else None
        )
        body = canonical_json({k: v for k, v in doc.items()})
        doc["assignment_id"] = hashlib.sha256(body).hexdigest()
        self.assignment = doc
        return doc

    def _ref(
        self, bundle: Path, name: str, version: int, bundle_id: str | None, size: int | None
    ) -> dict[str, Any]:
        data = bundle.read_bytes()
        bid = bundle_id or f"b-{hashlib.sha256(data).hexdigest()[:16]}"
        self.bundles[bid] = bundle
        return {
            "bundle_id": bid,
            "name": name,
            "version": version,
            "url": f"{BUNDLES_PREFIX}{bid}",
            "sha256": hashlib.sha256(data).hexdigest(),
            "size": len(data) if size is None else size,
        }

    def bundle_requests(self, bundle_id: str | None = None) -> list[Request]:
        return [
            r
            for r in self.requests
            if r.path.startswith(BUNDLES_PREFIX)
            and (bundle_id is None or r.path.endswith(bundle_id))
        ]

    # -- handlers --------------------------------------------------------------------
    def _get(self, h: BaseHTTPRequestHandler) -> None:
        req = Request("GET", h.path, {k: v for k, v in h.headers.items()})
        self.requests.append(req)
        if h.path == ASSIGNMENT_PATH:
            self._assignment(h, req)
        elif h.path.startswith(BUNDLES_PREFIX):
            self._bundle(h, req, h.path[len(BUNDLES_PREFIX) :])
        else:
            self._send(h, req, 404, b"not found")

    def _post(self, h: BaseHTTPRequestHandler) -> None:
        req = Request("POST", h.path, {k: v for k, v in h.headers.items()})
        self.requests.append(req)
        n = int(h.headers.get("Content-Length", "0"))
        body = h.rfile.read(n)
        if h.path != REPORTS_PATH:
            self._send(h, req, 404, b"not found")
            return
        self.reports.extend(json.loads(body)["reports"])
        self._send(h, req, 204, b"")

    def _send(
        self,
        h: BaseHTTPRequestHandler,
        req: Request,
        status: int,
        body: bytes,
        headers: dict[str, str] | None = None,
    ) -> None:
        req.status = status
        h.send_response(status)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if body:
            h.wfile.write(body)
        req.sent = len(body)

    def _assignment(self, h: BaseHTTPRequestHandler, req: Request) -> None:
        if self.assignment is None:
            self._send(h, req, 404, b"no assignment")
            return
        etag = f'"{self.assignment["assignment_id"]}"'
        if h.headers.get("If-None-Match") == etag:
            self._send(h, req, 304, b"", {"ETag": etag})
            return
        self._send(
            h,
            req,
            200,
            json.dumps(self.assignment).encode(),
            {"ETag": etag, "Content-Type": "application/json"},
        )

    def _bundle(self, h: BaseHTTPRequestHandler, req: Request, bid: str) -> None:
        path = self.bundles.get(bid)
        if path is None:
            self._send(h, req, 404, b"no such bundle")
            return
        fault = self.faults.get(bid, Fault())
        data = path.read_bytes()
        if fault.wrong_bytes:
            data = bytes(b ^ 0x5A for b in data)
        if fault.endless:
            self._endless(h, req, fault)
            return
        start = 0
        rng = h.headers.get("Range")
        status, headers = 200, {"Accept-Ranges": "bytes"}
        if rng and fault.refuse_range_times > 0:
            fault.refuse_range_times -= 1
            self._send(h, req, 416, b"", {"Content-Range": f"bytes */{len(data)}"})
            return
        if rng and not fault.ignore_range:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                self._send(h, req, 416, b"", {"Content-Range": f"bytes */{len(data)}"})
                return
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        req.status = status
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        limit = len(body)
        if fault.drop_after is not None and fault.drop_times > 0:
            fault.drop_times -= 1
            limit = min(limit, fault.drop_after)
        for off in self._chunks(limit):
            piece = body[off : min(off + self.chunk, limit)]
            try:
                h.wfile.write(piece)
                h.wfile.flush()
            except OSError:
                break
            req.sent += len(piece)
            if fault.slow_seconds:
                time.sleep(fault.slow_seconds)
        if limit < len(body):
            h.close_connection = True
            h.connection.shutdown(2)

    def _chunks(self, limit: int) -> Iterator[int]:
        return iter(range(0, limit, self.chunk))

    def _endless(self, h: BaseHTTPRequestHandler, req: Request, fault: Fault) -> None:
        req.status = 200
        h.send_response(200)
        h.send_header("Connection", "close")
        h.end_headers()
        h.close_connection = True
        piece = b"\0" * self.chunk
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                h.wfile.write(piece)
                h.wfile.flush()
            except OSError:
                return
            req.sent += len(piece)


# -- a minimal model host ----------------------------------------------------------------


class ServingHost:
    """Serves the active model and counts predictions and errors, like the Agent does."""

    def __init__(self) -> None:
        self.active: Any = None
        self.shadow: Any = None
        self.swaps: list[tuple[str, int]] = []
        self._lock = threading.Lock()
        self._calls: list[tuple[float, bool]] = []

    def swap(self, model: Any) -> None:
        with self._lock:
            self.active = model
            self.swaps.append((model.name, model.version))

    def set_shadow(self, model: Any) -> None:
        self.shadow = model

    def predict(self, x: np.ndarray) -> np.ndarray:
        model = self.active
        try:
            out = np.asarray(model.run({"x": x})[0])
        except Exception:
            self._calls.append((time.time(), False))
            raise
        self._calls.append((time.time(), True))
        return out

    def error_rate_since(self, t: float) -> tuple[int, int]:
        calls = [ok for ts, ok in self._calls if ts >= t]
        return len(calls), sum(1 for ok in calls if not ok)
