"""A Python client for the running agent's endpoint, shaped like ``Agent.predict()``.

An application on the device uses this instead of embedding :class:`Agent`
while ``edgefleet-agent run`` holds the state directory::

    from device_agent.serving.client import ServingClient

    with ServingClient.from_config("/etc/edgefleet/agent.toml") as client:
        probs, = client.predict(x)            # x: np.ndarray, or {"input name": array}

It speaks the Open Inference Protocol with the binary tensor extension over the
daemon's Unix socket (or TCP on 127.0.0.1 with the token), one keep-alive
connection per thread, so it is safe to share between threads. Refusals raise
the embedding API's errors: :class:`~device_agent.agent.InputError` (the inputs
do not fit), :class:`~device_agent.agent.NoActiveModelError`,
:class:`~device_agent.agent.PredictError`, or :class:`ServingClientError`
(anything else, including "no agent is listening").
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..agent import AgentError, InputError, NoActiveModelError, PredictError, UnknownPredictionError
from .protocol import datatype_of, dtype_of
from .server import SOCKET_NAME

_INPUT_CODES = {
    "bad_input",
    "bad_datatype",
    "bad_shape",
    "bad_data",
    "unknown_input",
    "missing_input",
    "unknown_output",
    "bad_json",
    "bad_request",
    "too_large",
}


class ServingClientError(AgentError):
    """The endpoint refused the request or could not be reached."""

    def __init__(self, message: str, code: str = "serving_error", status: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


class _Connection:
    """One keep-alive HTTP/1.1 connection to the agent (lean: the agent's answers always
    carry a Content-Length)."""

    def __init__(self, socket_path: str | None, port: int | None, timeout: float) -> None:
        if socket_path is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            address: Any = socket_path
        else:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            address = ("127.0.0.1", port)
        sock.settimeout(timeout)
        try:
            sock.connect(address)
        except OSError:
            sock.close()
            raise
        self.sock = sock
        self.rfile = sock.makefile("rb")

    def request(
        self, method: str, path: str, body: bytes, headers: Mapping[str, str]
    ) -> tuple[int, dict[str, str], bytes]:
        head = f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {len(body)}\r\n"
        for k, v in headers.items():
            head += f"{k}: {v}\r\n"
        self.sock.sendall((head + "\r\n").encode("latin-1") + body)
        line = self.rfile.readline(65537)
        if not line:
            raise ConnectionResetError("the agent closed the connection")
        parts = line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
            raise ConnectionResetError(f"not an HTTP response: {line[:80]!r}")
        got: dict[str, str] = {}
        while True:
            raw = self.rfile.readline(65537)
            if raw in (b"\r\n", b"\n", b""):
                break
            k, _, v = raw.decode("latin-1").partition(":")
            got[k.strip().lower()] = v.strip()
        length = int(got.get("content-length", "0"))
        data = self.rfile.read(length) if length else b""
        if len(data) != length:
            raise ConnectionResetError("the agent closed the connection mid-answer")
        return int(parts[1]), got, data

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.rfile.close()
            self.sock.close()


class ServingClient:
    """Predictions from the agent daemon running on this device."""

    def __init__(
        self,
        socket_path: str | os.PathLike[str] | None = None,
        *,
        port: int | None = None,
        token: str | None = None,
        model: str | None = None,
        timeout: float = 30.0,
    ) -> None:
        """Connect over ``socket_path``, or over TCP 127.0.0.1:``port`` with ``token``.

        ``model`` names the model to call (default: whichever the agent serves).
        """
        if (socket_path is None) == (port is None):
            raise ValueError("give the socket path or the TCP port (one of them)")
        self.socket_path = str(socket_path) if socket_path is not None else None
        self.port = port
        self.timeout = timeout
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._model = model
        self._meta: dict[str, Any] | None = None
        self._local = threading.local()

    @classmethod
    def from_config(cls, config: Any = None, **kw: Any) -> ServingClient:
        """A client for the agent configured by ``config`` (an ``AgentConfig``, a path to
        its TOML, or None for ``EDGEFLEET_AGENT_CONFIG`` and the environment)."""
        from ..config import AgentConfig, ConfigError, tomllib

        if not isinstance(config, AgentConfig):
            # only the socket's place is needed: read the file and the environment, not
            # the agent's private state (an app may run as another user)
            path = config if config is not None else os.environ.get("EDGEFLEET_AGENT_CONFIG")
            try:
                data = tomllib.loads(Path(path).read_text()) if path else {}
            except (OSError, ValueError) as e:
                raise ConfigError(f"cannot read the agent's config {path}: {e}") from e
            config = AgentConfig.from_dict(data)
            config.apply_env({k: v for k, v in os.environ.items() if k != "EDGEFLEET_AGENT_CONFIG"})
        sv = config.serving
        state_dir = Path(config.device.state_dir)
        return cls(Path(sv.socket) if sv.socket else state_dir / SOCKET_NAME, **kw)

    @staticmethod
    def read_token(path: str | os.PathLike[str]) -> str:
        """The TCP token from a ``[serving] token_file`` (default ``<state_dir>/serving.token``)."""
        return Path(path).read_text().strip()

    # -- transport -----------------------------------------------------------------
    def _request(
        self, method: str, path: str, body: bytes = b"", headers: Mapping[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        hdrs = {**self._headers, **(headers or {})}
        for attempt in (0, 1):
            conn: _Connection | None = getattr(self._local, "conn", None)
            fresh = conn is None
            try:
                if conn is None:
                    conn = self._local.conn = _Connection(self.socket_path, self.port, self.timeout)
                status, got, data = conn.request(method, path, body, hdrs)
            except OSError as e:  # ConnectionError, BrokenPipeError, timeouts, no socket
                if conn is not None:
                    conn.close()
                self._local.conn = None
                if fresh or attempt or isinstance(e, TimeoutError):
                    raise self._unreachable(e) from e
                continue  # a kept-alive connection the agent closed: once more, fresh
            if got.get("connection", "").lower() == "close":
                conn.close()
                self._local.conn = None
            return status, got, data
        raise AssertionError("unreachable")

    def _unreachable(self, e: Exception) -> ServingClientError:
        where = self.socket_path or f"127.0.0.1:{self.port}"
        return ServingClientError(
            f"no edgefleet-agent answers on {where} ({e}); is "
            "`edgefleet-agent run` active with [serving] enabled?",
            "unreachable",
        )

    @staticmethod
    def _raise(status: int, data: bytes) -> None:
        try:
            doc = json.loads(data)
            message, code = str(doc.get("error")), str(doc.get("code", "serving_error"))
        except (ValueError, AttributeError):
            message, code = data[:200].decode("utf-8", "replace"), "serving_error"
        if code == "no_active_model":
            raise NoActiveModelError(message)
        if code == "predict_failed":
            raise PredictError(message)
        if status == 400 and code in _INPUT_CODES:
            raise InputError(message)
        raise ServingClientError(f"HTTP {status}: {message}", code, status)

    # -- API -------------------------------------------------------------------------
    def ready(self) -> bool:
        """Whether the agent is up and has a model to serve."""
        try:
            status, _, _ = self._request("GET", "/v2/health/ready")
        except ServingClientError:
            return False
        return status == 200

    def metadata(self, refresh: bool = False) -> dict[str, Any]:
        """The served model's v2 metadata (``name``, ``versions``, ``inputs``, ``outputs``)."""
        if self._meta is not None and not refresh:
            return self._meta
        name = self._model
        if name is None:
            status, _, data = self._request(
                "POST", "/v2/repository/index", b"{}", {"Content-Type": "application/json"}
            )
            if status != 200:
                self._raise(status, data)
            models = json.loads(data)
            if not models:
                raise NoActiveModelError("the agent serves no model yet")
            name = str(models[0]["name"])
        status, _, data = self._request("GET", f"/v2/models/{name}")
        if status != 200:
            self._raise(status, data)
        self._meta = json.loads(data)
        return self._meta

    def predict(self, inputs: Mapping[str, np.ndarray] | np.ndarray) -> list[np.ndarray]:
        """Like ``Agent.predict``: outputs as arrays in the model's output order."""
        return list(self._call(inputs)[1].values())

    def predict_named(self, inputs: Mapping[str, np.ndarray] | np.ndarray) -> dict[str, Any]:
        """Like ``Agent.predict_named``: ``{output name: array}``."""
        return self._call(inputs)[1]

    def predict_with_id(
        self, inputs: Mapping[str, np.ndarray] | np.ndarray
    ) -> tuple[str, list[np.ndarray]]:
        """Like ``Agent.predict_with_id``: the prediction's id (for :meth:`label`) and
        the outputs."""
        pid, out = self._call(inputs)
        return pid, list(out.values())

    def label(self, prediction_id: str, label: int | list[int]) -> bool:
        """Like ``Agent.label``: post the true class of a prediction; False if its model
        was swapped out before the label came (not counted)."""
        name = self.metadata()["name"]
        body = json.dumps({"labels": [{"prediction_id": prediction_id, "label": label}]})
        status, _, data = self._request(
            "POST", f"/v2/models/{name}/labels", body.encode(), {"Content-Type": "application/json"}
        )
        if status != 200:
            self._raise(status, data)
        doc = json.loads(data)
        for refusal in doc["refused"]:
            if refusal["code"] == "unknown_prediction":
                raise UnknownPredictionError(refusal["error"])
            raise InputError(refusal["error"])
        return bool(doc["accepted"])

    def _call(self, inputs: Any) -> tuple[str, dict[str, Any]]:
        try:
            return self._infer(self.metadata(), inputs)
        except InputError:
            # the agent may have swapped to a model with another signature: look once more
            old = self._meta
            if self.metadata(refresh=True) == old:
                raise
            return self._infer(self._meta or {}, inputs)

    def _infer(self, meta: dict[str, Any], inputs: Any) -> tuple[str, dict[str, Any]]:
        specs = {i["name"]: i for i in meta["inputs"]}
        if isinstance(inputs, Mapping):
            feed = dict(inputs)
        elif len(specs) == 1:
            feed = {next(iter(specs)): inputs}
        else:
            raise InputError(
                f"{meta['name']} has inputs {sorted(specs)}; pass a dict of name -> array"
            )
        described, chunks = [], []
        for name, value in feed.items():
            want = specs.get(name, {}).get("datatype")
            arr = np.asarray(value)
            # an input the model quantizes also takes its integer datatype as is
            quantized = (specs.get(name, {}).get("parameters") or {}).get("quantized_datatype")
            if want is not None and datatype_of(arr.dtype) not in (want, quantized):
                try:
                    arr = arr.astype(dtype_of(want), casting="same_kind")
                except TypeError as e:
                    raise InputError(
                        f"input {name!r}: cannot send {arr.dtype} as {want}: {e}"
                    ) from e
            raw = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()
            described.append(
                {
                    "name": name,
                    "datatype": datatype_of(arr.dtype),
                    "shape": list(arr.shape),
                    "parameters": {"binary_data_size": len(raw)},
                }
            )
            chunks.append(raw)
        header = json.dumps(
            {"inputs": described, "parameters": {"binary_data_output": True}}
        ).encode()
        status, resp, data = self._request(
            "POST",
            f"/v2/models/{meta['name']}/infer",
            b"".join([header, *chunks]),
            {
                "Inference-Header-Content-Length": str(len(header)),
                "Content-Type": "application/octet-stream",
            },
        )
        if status != 200:
            self._raise(status, data)
        return _decode_outputs(data, resp.get("inference-header-content-length"))

    def close(self) -> None:
        """Close this thread's connection (others close when their thread ends)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def __enter__(self) -> ServingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _decode_outputs(data: bytes, header_length: str | None) -> tuple[str, dict[str, Any]]:
    hlen = int(header_length) if header_length is not None else len(data)
    doc = json.loads(data[:hlen])
    buf = bytearray(memoryview(data)[hlen:]) if header_length is not None else bytearray()
    out: dict[str, Any] = {}
    offset = 0
    for o in doc["outputs"]:
        dtype = dtype_of(o["datatype"])
        size = (o.get("parameters") or {}).get("binary_data_size")
        if size is None:
            out[o["name"]] = np.asarray(o["data"], dtype=dtype).reshape(o["shape"])
            continue
        wire = dtype.newbyteorder("<")
        arr = np.frombuffer(buf, dtype=wire, count=size // dtype.itemsize, offset=offset)
        out[o["name"]] = arr.astype(dtype, copy=False).reshape(o["shape"])
        offset += size
    return str((doc.get("parameters") or {}).get("prediction_id", "")), out
