"""The bundle fetcher: assignment check-in, resumable bounded download, reports.

:class:`Fetcher` is the I/O edge the updater depends on; :class:`HttpFetcher`
implements it over plain HTTP(S) with the standard library:

* ``GET assignment`` with ``If-None-Match``; ``304`` means nothing changed.
* ``GET bundle`` into ``<downloads>/<bundle_id>.part``, appending in fixed-size
  chunks (bounded memory); an existing ``.part`` is resumed with
  ``Range: bytes=<have>-`` (``206``). A ``200`` answer restarts from zero, a
  ``416`` means the part is complete (or bad and is restarted). A connection
  dropped mid-body is resumed the same way, a few times, with backoff.
* Never more than ``min(announced size, max_bytes)`` bytes are written: an
  endless or oversized stream is cut off and the part deleted.
* The finished file's sha256 must equal the assignment's before the file is
  handed to verification.
* The device credential goes to the server's origin (scheme, host, port) only:
  a URL of another origin, absolute or ``//host``, is refused
  (``foreign_origin``) before any connection; a redirect is followed only within
  the origin and never carries the credential (it is an unredirected header); a
  redirect to another origin is refused.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import json
import logging
import os
import re
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlencode, urljoin, urlsplit

from ..protocol import ASSIGNMENT_PATH, REPORTS_PATH
from .errors import (
    AssignmentError,
    DownloadDigestError,
    DownloadError,
    DownloadTooLargeError,
    ServerUnavailableError,
)
from .state import Assignment, BundleRef

log = logging.getLogger(__name__)

_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_DEFAULT_PORTS = {"http": 80, "https": 443}


class ForeignOriginError(DownloadError, AssignmentError):
    """A URL or redirect leads away from the server's origin; nothing is sent there."""

    code = "foreign_origin"


def origin(url: str) -> tuple[str, str, int]:
    """``(scheme, host, port)`` of ``url``, with the scheme's default port filled in."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:
        port = -1
    return scheme, (parts.hostname or "").lower(), port or _DEFAULT_PORTS.get(scheme, -1)


class _SameOriginRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects within ``allowed`` origins only. The credential is added as an
    unredirected header, so urllib never repeats it on the redirected request."""

    def __init__(self, allowed: set[tuple[str, str, int]]) -> None:
        self.allowed = allowed

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: Any,
        code: int,
        msg: str,
        headers: Any,
        newurl: str,
    ) -> urllib.request.Request | None:
        if origin(newurl) not in self.allowed:
            fp.close()
            raise ForeignOriginError(
                f"{req.full_url} redirected ({code}) to {newurl}, another origin than the "
                "server's; not followed and no credential sent. Check the server's proxy or "
                "storage configuration"
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class Fetcher(Protocol):
    """Where assignments and bundles come from and reports go to."""

    def get_assignment(self, etag: str | None) -> tuple[Assignment | None, str | None]:
        """Return (assignment, etag); (None, etag) when unchanged since ``etag``."""

    def download(self, ref: BundleRef, downloads: Path, max_bytes: int) -> Path:
        """Download ``ref`` (resuming a previous part) and return the verified-digest file."""

    def post_reports(self, reports: list[dict[str, Any]]) -> None:
        """Send install/health reports; raise :class:`ServerUnavailableError` on failure."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(chunk):
            h.update(data)
    return h.hexdigest()


class HttpFetcher:
    """:class:`Fetcher` over HTTP with the standard library (no extra dependency)."""

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        timeout: float = 30.0,
        chunk_bytes: int = 256 * 1024,
        retries: int = 3,
        backoff_seconds: float = 0.2,
        sleep: Callable[[float], None] = time.sleep,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        """``ssl_context`` verifies an ``https://`` server (the fleet CA) and presents the
        device's client certificate; replace the attribute after a renewal."""
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"server url {base_url!r} must start with http:// or https://")
        self.base_url = base_url.rstrip("/") + "/"
        self.token = token
        self.timeout = timeout
        self.chunk_bytes = chunk_bytes
        self.retries = retries
        self.backoff_seconds = backoff_seconds
        self.sleep = sleep
        self.ssl_context = ssl_context

    # -- plumbing --------------------------------------------------------------
    def _url(self, path: str) -> str:
        """``path`` resolved against the server URL; :class:`ForeignOriginError` when the
        result is on another origin (an absolute URL, ``//host/…``, another port)."""
        base = self.base_url
        url = urljoin(base, path) if path.startswith("//") or "://" in path else None
        if url is None:
            url = urljoin(base, path.lstrip("/"))
        if origin(url) != origin(base):
            raise ForeignOriginError(
                f"refusing {path!r}: it is not on the server's origin {base}; the device "
                "fetches only from its server and sends its credential nowhere else"
            )
        return url

    def _request(
        self, url: str, headers: dict[str, str] | None = None, data: bytes | None = None
    ) -> Any:
        h = dict(headers or {})
        if data is not None:
            h["Content-Type"] = "application/json"
        req = urllib.request.Request(
            url, data=data, headers=h, method="POST" if data is not None else "GET"
        )
        if origin(url) != origin(self.base_url):  # _url already refused it; belt and braces
            raise ForeignOriginError(f"refusing to contact {url}: not the server's origin")
        if self.token:
            req.add_unredirected_header("Authorization", f"Bearer {self.token}")
        handlers: list[urllib.request.BaseHandler] = [_SameOriginRedirects({origin(self.base_url)})]
        if self.ssl_context is not None:
            handlers.append(urllib.request.HTTPSHandler(context=self.ssl_context))
        opener = urllib.request.build_opener(*handlers)
        return opener.open(req, timeout=self.timeout)

    # -- assignment ----------------------------------------------------------
    def get_assignment(
        self, etag: str | None, model: str | None = None
    ) -> tuple[Assignment | None, str | None]:
        """``model``: the assignment of that model, on a device running several."""
        url = self._url(ASSIGNMENT_PATH)
        if model is not None:
            url += "?" + urlencode({"model": model})
        try:
            with self._request(url, {"If-None-Match": etag} if etag else None) as resp:
                body = resp.read(1024 * 1024 + 1)
                new_etag = resp.headers.get("ETag")
        except urllib.error.HTTPError as e:
            if e.code == 304:
                return None, etag
            raise ServerUnavailableError(
                f"assignment check-in at {url} answered HTTP {e.code}; check the device "
                "credential and the server"
            ) from e
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            raise ServerUnavailableError(f"cannot reach {url}: {e}; will retry") from e
        if len(body) > 1024 * 1024:
            raise AssignmentError("assignment document is larger than 1 MiB")
        try:
            obj = json.loads(body)
        except ValueError as e:
            raise AssignmentError(f"assignment from {url} is not JSON: {e}") from e
        return Assignment.from_json(obj), new_etag

    # -- reports -------------------------------------------------------------
    def post_reports(self, reports: list[dict[str, Any]]) -> None:
        url = self._url(REPORTS_PATH)
        try:
            with self._request(url, data=json.dumps({"reports": reports}).encode()) as resp:
                resp.read()
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            raise ServerUnavailableError(f"cannot post reports to {url}: {e}") from e

    # -- download ------------------------------------------------------------
    def download(self, ref: BundleRef, downloads: Path, max_bytes: int) -> Path:
        limit = min(ref.size, max_bytes)
        if ref.size > max_bytes:
            raise DownloadTooLargeError(
                f"bundle {ref.bundle_id} announces {ref.size} bytes, above this device's cap "
                f"of {max_bytes} (update.max_bundle_bytes); raise the cap or ship a smaller "
                "bundle"
            )
        downloads.mkdir(parents=True, exist_ok=True)
        part = downloads / f"{ref.bundle_id}.part"
        final = downloads / f"{ref.bundle_id}.bundle"
        if final.exists() and final.stat().st_size == ref.size and sha256_file(final) == ref.sha256:
            return final
        url = self._url(ref.url)
        failures = 0
        while True:
            try:
                if self._fetch_into(url, part, limit):
                    break
                reason = "the server closed the connection before the end"
            except DownloadTooLargeError:
                with contextlib.suppress(FileNotFoundError):
                    part.unlink()
                raise
            except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
                if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise DownloadError(f"no disk space to download {url}: {e}") from e
                if isinstance(e, urllib.error.HTTPError) and e.code not in (
                    408,
                    429,
                    500,
                    502,
                    503,
                    504,
                ):
                    raise DownloadError(f"downloading {url} failed: HTTP {e.code}") from e
                reason = str(e) or type(e).__name__
            failures += 1
            have = part.stat().st_size if part.exists() else 0
            if failures > self.retries:
                raise DownloadError(
                    f"downloading {url} failed {failures} times ({reason}); kept {have} "
                    "bytes and will resume at the next check"
                )
            log.warning(
                "download interrupted, resuming",
                extra={"bundle_id": ref.bundle_id, "have": have, "reason": reason},
            )
            self.sleep(self.backoff_seconds * failures)
        got = sha256_file(part)
        if got != ref.sha256:
            part.unlink()
            raise DownloadDigestError(
                f"downloaded {ref.bundle_id} has sha256 {got}, the assignment says "
                f"{ref.sha256}; the file was corrupted in transit or the server is misconfigured"
            )
        os.replace(part, final)
        return final

    def _fetch_into(self, url: str, part: Path, limit: int) -> bool:
        """One GET into ``part``; True when the file is complete (``limit`` bytes)."""
        have = part.stat().st_size if part.exists() else 0
        if have > limit:
            part.unlink()
            have = 0
        if have == limit and limit > 0:
            return True
        headers = {"Range": f"bytes={have}-"} if have else {}
        try:
            resp = self._request(url, headers)
        except urllib.error.HTTPError as e:
            if e.code == 416:  # our part is not a prefix of what the server has; restart
                e.close()
                part.unlink(missing_ok=True)
                return False
            raise
        with resp:
            mode = "ab"
            if resp.status == 206:
                m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
                if m is None or int(m.group(1)) != have:
                    part.unlink(missing_ok=True)
                    return False
            else:  # 200: the server ignored the range; start over
                mode, have = "wb", 0
            # read1: write what arrived, so a kill -9 keeps what was read
            read = getattr(resp, "read1", resp.read)
            with open(part, mode, buffering=0) as f:
                try:
                    while True:
                        chunk = read(self.chunk_bytes)
                        if not chunk:
                            break
                        if have + len(chunk) > limit:
                            raise DownloadTooLargeError(
                                f"{url} sent more than {limit} bytes (the announced size or "
                                "update.max_bundle_bytes); download cut off"
                            )
                        f.write(chunk)
                        have += len(chunk)
                finally:
                    f.flush()
                    os.fsync(f.fileno())
        return have == limit


class ModelFetcher:
    """One model's :class:`Fetcher` on a device running several models: its own
    assignment (``?model=``), the device's connection for downloads and reports."""

    def __init__(self, base: HttpFetcher, model: str) -> None:
        self.base = base
        self.model = model

    def get_assignment(self, etag: str | None) -> tuple[Assignment | None, str | None]:
        assignment, new_etag = self.base.get_assignment(etag, model=self.model)
        if assignment is not None and assignment.model not in (None, self.model):
            raise AssignmentError(
                f"asked for the assignment of model {self.model!r}, the server answered the "
                f"one of {assignment.model!r:.130}; not acted on"
            )
        return assignment, new_etag

    def download(self, ref: BundleRef, downloads: Path, max_bytes: int) -> Path:
        return self.base.download(ref, downloads, max_bytes)

    def post_reports(self, reports: list[dict[str, Any]]) -> None:
        self.base.post_reports(reports)
