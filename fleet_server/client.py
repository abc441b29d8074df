"""The admin API client: the library the operator CLI, the demo and scripts call.

One object per server (``AdminClient(url, token)``), verbs as methods. API errors raise
:class:`ApiError` with the server's error code and message; the CLI maps them to its exit
messages.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any, BinaryIO

import httpx

API_PREFIX = "/api/v1"


class ApiError(Exception):
    """The server refused a request, or could not be reached (``code == "unreachable"``)."""

    def __init__(self, code: str, message: str, status: int | None = None) -> None:
        super().__init__(f"[{code}] {message}")
        self.code = code
        self.message = message
        self.status = status


def _error_of(r: httpx.Response) -> ApiError:
    """The :class:`ApiError` of a refused request (the server's code and message)."""
    try:
        err = r.json()["error"]
        return ApiError(str(err["code"]), str(err["message"]), r.status_code)
    except (ValueError, KeyError, TypeError):
        return ApiError(f"http_{r.status_code}", r.text[:300], r.status_code)


class AdminClient:
    """A thin client of the admin API (``/api/v1``) with an operator token."""

    def __init__(
        self,
        url: str,
        token: str,
        timeout: float = 60.0,
        *,
        verify: ssl.SSLContext | str | bool = True,
    ) -> None:
        """``verify``: the CA file the server's HTTPS certificate chains to (the fleet
        CA's ``ca.crt``), an SSL context, or True for the system's trust store."""
        if isinstance(verify, str):
            verify = ssl.create_default_context(cafile=verify)
        self.url = url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.url,
            timeout=timeout,
            headers={"Authorization": f"Bearer {token}"},
            verify=verify,
        )

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """Send one request to ``/api/v1{path}``; the decoded JSON answer, or None."""
        try:
            try:
                r = self._http.request(method, f"{API_PREFIX}{path}", **kwargs)
            except httpx.RemoteProtocolError:
                # the server closed an idle keep-alive connection as the request went out
                # on it (it never saw the request): send it once more on a new connection
                r = self._http.request(method, f"{API_PREFIX}{path}", **kwargs)
        except httpx.HTTPError as e:
            raise ApiError(
                "unreachable", f"cannot reach the server at {self.url} ({e}); check --url"
            ) from e
        if r.status_code >= 400:
            try:
                err = r.json()["error"]
                code, msg = str(err["code"]), str(err["message"])
            except (ValueError, KeyError, TypeError):
                code, msg = f"http_{r.status_code}", r.text[:300]
            raise ApiError(code, msg, r.status_code)
        return r.json() if r.content else None

    def get(self, path: str, **kw: Any) -> Any:
        return self.request("GET", path, **kw)

    def post(self, path: str, **kw: Any) -> Any:
        return self.request("POST", path, **kw)

    def get_text(self, path: str, **kwargs: Any) -> str:
        """``GET /api/v1{path}`` answered with text (not JSON), e.g. a YAML file."""
        try:
            r = self._http.request("GET", f"{API_PREFIX}{path}", **kwargs)
        except httpx.HTTPError as e:
            raise ApiError(
                "unreachable", f"cannot reach the server at {self.url} ({e}); check --url"
            ) from e
        if r.status_code >= 400:
            raise _error_of(r)
        return r.text

    def download(self, path: str, dest: BinaryIO, **kwargs: Any) -> httpx.Headers:
        """Stream ``GET /api/v1{path}`` into ``dest``; the answer's headers."""
        try:
            with self._http.stream("GET", f"{API_PREFIX}{path}", **kwargs) as r:
                if r.status_code >= 400:
                    r.read()
                    raise _error_of(r)
                for chunk in r.iter_bytes(1 << 20):
                    dest.write(chunk)
                return r.headers
        except httpx.HTTPError as e:
            raise ApiError(
                "unreachable", f"cannot reach the server at {self.url} ({e}); check --url"
            ) from e

    def upload_bundle(self, path: Path) -> Any:
        """Upload a bundle file (``POST /bundles``)."""
        with open(path, "rb") as f:
            return self.post("/bundles", files={"file": (path.name, f, "application/octet-stream")})

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
