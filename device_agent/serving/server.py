"""The endpoint's HTTP side: Open Inference Protocol routes over a Unix socket and TCP.

Standard library only (``socketserver`` and a lean HTTP/1.1 loop), so the device's install
stays small. One thread per connection, at most ``max_connections`` at once (a
connection past that gets a 503 and is closed); HTTP/1.1 keep-alive; every
socket read times out after ``timeout_seconds``. Every request goes through
``Agent.predict()``, so telemetry is the same as for an app embedding the agent.

Routes (``{name}`` is the active model's name, ``/versions/{v}`` optional):

* ``GET /v2``, ``GET /v2/health/live``, ``GET /v2/health/ready``
* ``GET /v2/models/{name}``, ``GET /v2/models/{name}/ready``
* ``POST /v2/models/{name}/infer`` (JSON tensors or the binary tensor extension)
* ``POST /v2/repository/index`` (Triton's model repository listing)

Errors are ``{"error": message, "code": token}`` with a 4xx/5xx status. Over
TCP every request must carry ``Authorization: Bearer <token>``; the Unix socket
is guarded by its file mode (0660) and group.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import os
import re
import secrets
import socket
import socketserver
import stat
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from .. import __version__
from ..agent import InputError, NoActiveModelError, PredictError, UnknownPredictionError
from ..config import ServingConfig
from .protocol import (
    ServingError,
    datatype_of,
    decode_infer_request,
    decode_labels,
    encode_infer_response,
    tensor_metadata,
)

log = logging.getLogger("edgefleet.serving")

SOCKET_NAME = "serving.sock"
TOKEN_NAME = "serving.token"
SOCKET_MODE = 0o660
#: bytes a Unix socket path may have (sun_path is 108 bytes with the terminating NUL)
MAX_SOCKET_PATH = 107

_MODEL_ROUTE = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?(/ready|/infer|/labels)?$")
_PLATFORMS = {"onnx": "onnxruntime_onnx", "tflite": "tflite"}


class ServingStartError(RuntimeError):
    """The endpoint could not start; the message names the setting to change."""


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    header_length: int | None = None


def _json(status: int, doc: Any) -> Response:
    return Response(status, json.dumps(doc, separators=(",", ":")).encode())


def _quantized(meta: dict[str, Any], model: Any) -> dict[str, Any]:
    """An input the agent quantizes says so: it also takes its integer datatype as is
    (``parameters.quantized_datatype``), with the scale and zero point."""
    q = model.io.inputs.get(meta["name"]) if model.io is not None else None
    if q is not None:
        meta["parameters"] = {
            "quantized_datatype": datatype_of(q.dtype),
            "scale": float(q.scale),
            "zero_point": q.zero_point,
        }
    return meta


class ServingApp:
    """Routes and answers requests for the device's :class:`~device_agent.agent.Agent` s:
    one agent (whichever model it runs), or one per model name on a device running several."""

    def __init__(self, agents: Any, config: ServingConfig) -> None:
        #: model name -> agent; None: the one agent of a one-model device, named by its model
        self.agents: dict[str | None, Any] = (
            dict(agents) if isinstance(agents, Mapping) else {None: agents}
        )
        self.config = config

    # -- helpers -------------------------------------------------------------------
    def _names(self) -> list[str]:
        out = []
        for key, agent in self.agents.items():
            model = agent.model
            name = key if key is not None else (model.name if model is not None else None)
            if name is not None:
                out.append(name)
        return out

    def _agent(self, name: str) -> Any:
        """The agent serving model ``name``; refused when no agent serves it."""
        found = self.agents.get(name)
        if found is None and None in self.agents:
            one = self.agents[None]
            if one.model is None:
                raise ServingError(
                    503,
                    "no model is installed yet; the agent installs one from "
                    "its assignment or `edgefleet-agent install`",
                    "no_active_model",
                )
            if one.model.name == name:
                found = one
        if found is None:
            raise ServingError(
                404,
                f"unknown model {name!r}; this device serves "
                f"{', '.join(repr(n) for n in self._names()) or 'no model yet'}",
                "unknown_model",
            )
        return found

    def _model(self, name: str, version: str | None) -> Any:
        model = self._agent(name).model
        if model is None:
            raise ServingError(
                503,
                f"model {name!r} is not installed yet; the agent installs it from "
                "its assignment or `edgefleet-agent install`",
                "no_active_model",
            )
        if version not in (None, "", str(model.version)):
            raise ServingError(
                404,
                f"{model.name} version {version} is not loaded; version {model.version} is",
                "unknown_version",
            )
        return model

    def _metadata(self, model: Any) -> dict[str, Any]:
        # as the application sees them: quantized I/O is fed and returned as FP32
        return {
            "name": model.name,
            "versions": [str(model.version)],
            "platform": _PLATFORMS.get(model.manifest.format, model.manifest.format),
            "inputs": [_quantized(tensor_metadata(s), model) for s in model.inputs],
            "outputs": [tensor_metadata(s) for s in model.outputs],
        }

    # -- dispatch ------------------------------------------------------------------
    def handle(
        self, method: str, path: str, headers: Mapping[str, str], read_body: Callable[[], bytes]
    ) -> Response:
        """Answer one request (``headers`` with lower-case names); raises
        :class:`ServingError` for refusals."""
        path = path.split("?", 1)[0]
        if path in ("/v2", "/v2/"):
            self._method(method, "GET")
            return _json(
                200,
                {
                    "name": "edgefleet-agent",
                    "version": __version__,
                    "extensions": ["binary_tensor_data"],
                },
            )
        if path == "/v2/health/live":
            self._method(method, "GET")
            return Response(200)
        if path == "/v2/health/ready":
            self._method(method, "GET")
            missing = [k or "" for k, a in self.agents.items() if a.model is None]
            if missing:
                what = ", ".join(repr(m) for m in missing if m) or "a model"
                raise ServingError(503, f"not installed yet: {what}", "no_active_model")
            return Response(200)
        if path == "/v2/repository/index":
            self._method(method, "POST")
            read_body()
            index = []
            for key, agent in self.agents.items():
                model = agent.model
                if model is not None:
                    index.append(
                        {"name": model.name, "version": str(model.version), "state": "READY"}
                    )
                elif key is not None:
                    index.append({"name": key, "version": "", "state": "UNAVAILABLE"})
            return _json(200, index)
        m = _MODEL_ROUTE.match(path)
        if m is None:
            raise ServingError(
                404, f"no route {path[:200]}; see /v2/models/<name>[/ready|/infer]", "not_found"
            )
        name, version, action = unquote(m.group(1)), m.group(2), m.group(3)
        if action == "/labels":
            self._method(method, "POST")
            self._model(name, version and unquote(version))
            return self._labels(self._agent(name), read_body())
        if action == "/infer":
            self._method(method, "POST")
            return self._infer(self._model(name, version and unquote(version)), headers, read_body)
        self._method(method, "GET")
        model = self._model(name, version and unquote(version))
        return Response(200) if action == "/ready" else _json(200, self._metadata(model))

    @staticmethod
    def _method(got: str, want: str) -> None:
        if got != want:
            raise ServingError(405, f"use {want} here, not {got}", "method_not_allowed")

    def _infer(
        self, model: Any, headers: Mapping[str, str], read_body: Callable[[], bytes]
    ) -> Response:
        raw_len = headers.get("inference-header-content-length")
        header_length = None
        if raw_len is not None:
            try:
                header_length = int(raw_len)
            except ValueError:
                raise ServingError(
                    400,
                    f"Inference-Header-Content-Length {raw_len!r} is not an integer",
                    "bad_header_length",
                ) from None
        body = read_body()
        backend = model.backend
        request = decode_infer_request(
            body,
            header_length,
            model.inputs,
            max_json_bytes=self.config.max_json_bytes,
            also={n: q.dtype for n, q in model.io.inputs.items()} if model.io else None,
        )
        try:
            prediction_id, outputs = self._agent(model.name).predict_with_id(request.feed)
        except InputError as e:
            raise ServingError(400, str(e), e.code) from e
        except NoActiveModelError as e:
            raise ServingError(503, str(e), e.code) from e
        except PredictError as e:
            raise ServingError(500, str(e), e.code) from e
        out, hlen = encode_infer_response(
            model.name,
            model.version,
            request,
            backend.output_names,
            outputs,
            {"prediction_id": prediction_id},
        )
        if hlen is None:
            return Response(200, out)
        return Response(200, out, "application/octet-stream", hlen)

    def _labels(self, agent: Any, body: bytes) -> Response:
        """Post true labels for earlier predictions; each one is accepted, not counted
        (its model was swapped out) or refused with a code."""
        accepted = not_counted = 0
        refused: list[dict[str, str]] = []
        for prediction_id, label in decode_labels(body):
            try:
                counted = agent.label(prediction_id, label)
            except (UnknownPredictionError, InputError) as e:
                refused.append(
                    {"prediction_id": prediction_id[:200], "code": e.code, "error": str(e)}
                )
                continue
            accepted += counted
            not_counted += not counted
        return _json(200, {"accepted": accepted, "not_counted": not_counted, "refused": refused})


#: longest request line or header line, and most header lines, accepted (as http.server)
MAX_LINE = 65536
MAX_HEADERS = 100


class _Handler(socketserver.StreamRequestHandler):
    """A lean HTTP/1.1 loop (keep-alive, Content-Length bodies, ``Expect: 100-continue``).

    ``http.server``'s parser spends more CPU per request than a small model's
    inference; this one reads the request line and headers directly, with the
    same limits (64 KiB lines, 100 headers), and answers every refusal in JSON.
    """

    @property
    def _server(self) -> _Server:
        return self.server  # type: ignore[return-value]

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self._server.settings.timeout_seconds)
        if self._server.token is not None:  # TCP: answers must not wait for Nagle
            with contextlib.suppress(OSError):
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def handle(self) -> None:
        self.close_connection = False
        while not self.close_connection:
            try:
                request = self._read_head()
            except (TimeoutError, ConnectionError):
                return  # an idle keep-alive connection, or the app went away
            except ServingError as e:
                self.close_connection = True
                self._send(Response(e.status, e.body()))
                return
            if request is None:
                return
            self._serve(*request)

    def _read_head(self) -> tuple[str, str, dict[str, str]] | None:
        rfile = self.rfile
        line = rfile.readline(MAX_LINE + 1)
        while line in (b"\r\n", b"\n"):  # stray line breaks between requests
            line = rfile.readline(MAX_LINE + 1)
        if not line:
            return None
        if len(line) > MAX_LINE:
            raise ServingError(414, "the request line is too long", "bad_http")
        parts = line.decode("latin-1").split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise ServingError(400, f"not an HTTP/1.x request line: {line[:80]!r}", "bad_http")
        method, target, version = parts
        headers: dict[str, str] = {}
        for _ in range(MAX_HEADERS + 1):
            raw = rfile.readline(MAX_LINE + 1)
            if len(raw) > MAX_LINE:
                raise ServingError(431, "a header line is too long", "bad_http")
            if raw in (b"\r\n", b"\n", b""):
                break
            name, sep, value = raw.decode("latin-1").partition(":")
            if not sep or not name.strip():
                raise ServingError(400, f"malformed header line {raw[:80]!r}", "bad_http")
            headers[name.strip().lower()] = value.strip()
        else:
            raise ServingError(431, f"more than {MAX_HEADERS} headers", "bad_http")
        conn = headers.get("connection", "").lower()
        self.close_connection = conn == "close" or (version == "HTTP/1.0" and conn != "keep-alive")
        length = headers.get("content-length", "0").strip()
        self._body_done = length == "0" and "transfer-encoding" not in headers
        self._headers = headers
        return method, target, headers

    def _serve(self, method: str, path: str, headers: dict[str, str]) -> None:
        app = self._server.app
        try:
            self._authorize(headers)
            if headers.get("content-encoding", "identity").lower() != "identity":
                raise ServingError(
                    415,
                    "compressed request bodies are not accepted; send the body uncompressed",
                    "unsupported_encoding",
                )
            response = app.handle(method, path, headers, self._read_body)
        except ServingError as e:
            response = Response(e.status, e.body())
        except (TimeoutError, ConnectionError):
            self.close_connection = True
            limit = self._server.settings.timeout_seconds
            response = Response(
                408,
                ServingError(
                    408,
                    f"the request did not arrive within {limit:g}s ([serving] timeout_seconds)",
                    "timeout",
                ).body(),
            )
        except Exception as e:  # noqa: BLE001 - one bad request must never stop the daemon
            log.exception("serving: %s %s failed", method, path)
            self.close_connection = True
            response = Response(
                500,
                ServingError(500, f"internal error: {type(e).__name__}: {e}", "internal").body(),
            )
        if not self._body_done:
            self.close_connection = True  # an unread body would be taken for the next request
        self._send(response)

    def _authorize(self, headers: dict[str, str]) -> None:
        token = self._server.token
        if token is None:
            return
        scheme, _, value = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            value.strip().encode(), token.encode()
        ):
            raise ServingError(
                401,
                "missing or wrong token; send 'Authorization: Bearer "
                "<token>' with the token from [serving] token_file",
                "unauthorized",
            )

    def _read_body(self) -> bytes:
        headers = self._headers
        if "transfer-encoding" in headers:
            raise ServingError(
                411, "send the body with a Content-Length, not chunked", "length_required"
            )
        raw = headers.get("content-length")
        if raw is None:
            self._body_done = True
            return b""
        try:
            length = int(raw)
            if length < 0:
                raise ValueError
        except ValueError:
            raise ServingError(
                400, f"Content-Length {raw!r} is not a byte count", "bad_http"
            ) from None
        limit = self._server.settings.max_request_bytes
        if length > limit:
            raise ServingError(
                413,
                f"the request body is {length} bytes, over the limit of "
                f"{limit} ([serving] max_request_bytes)",
                "too_large",
            )
        if headers.get("expect", "").lower() == "100-continue":
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = self.rfile.read(length)
        if len(body) != length:
            raise ServingError(
                400, f"the body ended after {len(body)} of {length} bytes", "bad_http"
            )
        self._body_done = True
        return body

    def _send(self, r: Response) -> None:
        reason = _REASONS.get(r.status, "")
        head = f"HTTP/1.1 {r.status} {reason}\r\nContent-Length: {len(r.body)}\r\n"
        if r.body:
            head += f"Content-Type: {r.content_type}\r\n"
        if r.header_length is not None:
            head += f"Inference-Header-Content-Length: {r.header_length}\r\n"
        if r.status == 401:
            head += 'WWW-Authenticate: Bearer realm="edgefleet-agent"\r\n'
        if self.close_connection:
            head += "Connection: close\r\n"
        try:
            self.wfile.write((head + "\r\n").encode("latin-1") + r.body)
        except OSError:
            self.close_connection = True


_REASONS = {s.value: s.phrase for s in HTTPStatus}


class _Server(socketserver.ThreadingMixIn):
    """Thread per connection, bounded; shared by the Unix and TCP servers."""

    daemon_threads = True
    block_on_close = False

    def _configure(self, app: ServingApp, settings: ServingConfig, token: str | None) -> None:
        self.app = app
        self.settings = settings
        self.token = token
        self.slots = threading.BoundedSemaphore(settings.max_connections)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            body = ServingError(503, "too many connections; retry shortly", "busy").body()
            with contextlib.suppress(OSError):
                request.settimeout(1.0)
                request.sendall(
                    b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\n"
                    b"Content-Type: application/json\r\nContent-Length: "
                    + str(len(body)).encode()
                    + b"\r\n\r\n"
                    + body
                )
            self.shutdown_request(request)  # type: ignore[attr-defined]
            return
        try:
            super().process_request(request, client_address)  # type: ignore[misc]
        except Exception:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.warning("serving: a connection failed", exc_info=True)


class _UnixServer(_Server, socketserver.UnixStreamServer):
    def __init__(self, path: str, app: ServingApp, settings: ServingConfig) -> None:
        self._configure(app, settings, None)
        self.group = settings.socket_group
        socketserver.UnixStreamServer.__init__(self, path, _Handler)

    def server_bind(self) -> None:
        path = Path(self.server_address)  # type: ignore[arg-type]
        _clear_stale_socket(path)
        self.socket.bind(str(path))
        # before listen(): nobody can connect while the mode is still the umask's
        os.chmod(path, SOCKET_MODE)
        if self.group:
            import grp

            try:
                gid = grp.getgrnam(self.group).gr_gid
            except KeyError:
                raise ServingStartError(
                    f"[serving] socket_group {self.group!r} does not exist"
                ) from None
            os.chown(path, -1, gid)


class _TcpServer(_Server, socketserver.TCPServer):
    allow_reuse_address = True

    def __init__(self, port: int, app: ServingApp, settings: ServingConfig, token: str) -> None:
        self._configure(app, settings, token)
        socketserver.TCPServer.__init__(self, ("127.0.0.1", port), _Handler)


def _clear_stale_socket(path: Path) -> None:
    if len(os.fsencode(str(path))) > MAX_SOCKET_PATH:
        raise ServingStartError(
            f"the socket path {path} is longer than {MAX_SOCKET_PATH} "
            "bytes; set [serving] socket to a shorter path"
        )
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ServingStartError(
            f"{path} exists and is not a socket; remove it or set [serving] socket elsewhere"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except OSError:
        path.unlink(missing_ok=True)  # left by a process that is gone
        return
    finally:
        probe.close()
    raise ServingStartError(f"another process already serves on {path}")


def load_or_create_token(path: Path) -> str:
    """The TCP token from ``path``; a new random one (file mode 0600) if there is none."""
    try:
        token = path.read_text().strip()
    except FileNotFoundError:
        token = ""
        path.parent.mkdir(parents=True, exist_ok=True)
        new = secrets.token_urlsafe(32)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return load_or_create_token(path)
        with os.fdopen(fd, "w") as f:
            f.write(new + "\n")
        return new
    except OSError as e:
        raise ServingStartError(f"cannot read [serving] token_file {path}: {e}") from e
    if not token:
        raise ServingStartError(
            f"[serving] token_file {path} is empty; put a token in it or delete it to have one made"
        )
    return token


class ServingEndpoint:
    """The device's endpoint: a Unix socket server and, optionally, a TCP one; ``agents``
    is one agent or a mapping of model name to agent."""

    def __init__(self, agents: Any, config: ServingConfig, state_dir: str | Path) -> None:
        self.app = ServingApp(agents, config)
        self.config = config
        state_dir = Path(state_dir)
        self.socket_path = Path(config.socket) if config.socket else state_dir / SOCKET_NAME
        self.token_path = Path(config.token_file) if config.token_file else state_dir / TOKEN_NAME
        self.tcp_port: int | None = None
        self._servers: list[socketserver.BaseServer] = []
        self._threads: list[threading.Thread] = []

    def start(self) -> ServingEndpoint:
        """Listen on the socket (and the TCP port); raises :class:`ServingStartError`."""
        try:
            self._servers.append(_UnixServer(str(self.socket_path), self.app, self.config))
            if self.config.tcp_port:
                token = load_or_create_token(self.token_path)
                tcp = _TcpServer(self.config.tcp_port, self.app, self.config, token)
                self._servers.append(tcp)
                self.tcp_port = int(tcp.server_address[1])
        except OSError as e:
            self.stop()
            raise ServingStartError(
                f"cannot listen: {e}; check [serving] socket and tcp_port"
            ) from e
        except ServingStartError:
            self.stop()
            raise
        for srv in self._servers:
            t = threading.Thread(
                target=srv.serve_forever,
                kwargs={"poll_interval": 0.5},
                name="edgefleet-serving",
                daemon=True,
            )
            t.start()
            self._threads.append(t)
        log.info(
            "serving the Open Inference Protocol",
            extra={"socket": str(self.socket_path), "tcp_port": self.tcp_port},
        )
        return self

    def stop(self) -> None:
        """Stop listening and remove the socket file; in-flight requests may finish."""
        for srv, t in zip(self._servers, self._threads, strict=False):
            srv.shutdown()
            t.join(5)
        for srv in self._servers:
            srv.server_close()
        if self._servers:
            with contextlib.suppress(OSError):
                self.socket_path.unlink()
        self._servers, self._threads = [], []
