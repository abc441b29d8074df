"""Refresh the image and director repositories with python-tuf's ngclient, over the
device's own origin-locked HTTP client, and decide what to install.

* Each check builds a fresh ``ngclient.Updater`` per repository (an Updater refreshes once),
  bootstrapped from the root provisioned in the image; newer roots are walked and kept in
  ``<state_dir>/uptane/<repo>/``, so keys rotate and are revoked over the air.
* TUF judges expiry against the *device* clock (the updater's clock), not the host's.
* Freshness: the time of the last check at which both repositories refreshed is kept in
  ``<state_dir>/uptane/fresh.json``; a failing refresh within ``stale_after_seconds`` of it is
  ``metadata_unavailable`` (retried), past it ``stale_metadata``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import urllib.error
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NoReturn

from tuf.api import exceptions as tuf_exc
from tuf.ngclient import Updater, UpdaterConfig
from tuf.ngclient.fetcher import FetcherInterface

from .._fsutil import atomic_write_bytes
from ..update.fetch import HttpFetcher
from .decide import Instruction, Target, decide
from .errors import MetadataRefusedError, MetadataUnavailableError, StaleMetadataError

log = logging.getLogger(__name__)

IMAGE_PATH = "/device/v1/uptane/image/"
DIRECTOR_PATH = "/device/v1/uptane/director/"


class _OriginFetcher(FetcherInterface):
    """ngclient's fetcher over :class:`HttpFetcher`: the server's origin only, the
    credential never across a redirect, bounded reads."""

    def __init__(self, http: HttpFetcher) -> None:
        self.http = http

    def _fetch(self, url: str) -> Iterator[bytes]:
        try:
            resp = self.http._request(self.http._url(url))
        except urllib.error.HTTPError as e:
            e.close()
            raise tuf_exc.DownloadHTTPError(f"{url}: HTTP {e.code}", e.code) from e
        return self._chunks(resp)

    @staticmethod
    def _chunks(resp: Any) -> Iterator[bytes]:
        with resp:
            while chunk := resp.read(64 * 1024):
                yield chunk


@dataclass(frozen=True)
class Roots:
    """The initial roots provisioned in the device image (bytes of ``root.json``)."""

    image: bytes
    director: bytes

    @classmethod
    def load(cls, image: Path, director: Path) -> Roots:
        return cls(image.read_bytes(), director.read_bytes())


def _target(t: Any) -> Target:
    return Target(t.path, int(t.length), str(t.hashes.get("sha256", "")), dict(t.custom or {}))


class UptaneClient:
    """Both repositories, refreshed and cross-checked for one device."""

    def __init__(
        self,
        state_dir: Path,
        roots: Roots,
        http: HttpFetcher,
        *,
        device_id: str,
        device_class: str,
        stale_after_seconds: float,
        clock: Callable[[], float],
    ) -> None:
        self.dir = Path(state_dir) / "uptane"
        self.roots = roots
        self.http = http
        self.device_id = device_id
        self.device_class = device_class
        self.stale_after_seconds = stale_after_seconds
        self.clock = clock
        self.fresh_file = self.dir / "fresh.json"

    # -- freshness ----------------------------------------------------------------
    def last_fresh(self) -> float | None:
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            t = json.loads(self.fresh_file.read_text())["last_fresh"]
            if isinstance(t, (int, float)) and not isinstance(t, bool):
                return float(t)
        return None

    def _mark_fresh(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.fresh_file, json.dumps({"last_fresh": self.clock()}).encode())

    def is_stale(self) -> bool:
        last = self.last_fresh()
        if last is None:  # never refreshed: stale once the period passed since first try
            last = self._first_try()
        return self.clock() - last > self.stale_after_seconds

    def _first_try(self) -> float:
        f = self.dir / "first_try.json"
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            return float(json.loads(f.read_text())["t"])
        self.dir.mkdir(parents=True, exist_ok=True)
        now = self.clock()
        atomic_write_bytes(f, json.dumps({"t": now}).encode())
        return now

    # -- refresh ------------------------------------------------------------------
    def _updater(self, name: str, root: bytes, path: str) -> Updater:
        d = self.dir / name
        d.mkdir(parents=True, exist_ok=True)
        up = Updater(
            str(d),
            self.http._url(path),
            fetcher=_OriginFetcher(self.http),
            config=UpdaterConfig(prefix_targets_with_hash=False),
            bootstrap=root,
        )
        # expiry is judged against the device clock (ngclient reads the host clock)
        up._trusted_set.reference_time = datetime.fromtimestamp(self.clock(), timezone.utc)
        return up

    def refresh(self) -> tuple[Updater, Updater]:
        """Refresh director then image metadata; coded errors, stale past the period."""
        try:
            director = self._updater("director", self.roots.director, DIRECTOR_PATH)
            director.refresh()
            image = self._updater("image", self.roots.image, IMAGE_PATH)
            image.refresh()
        except (tuf_exc.DownloadError, OSError) as e:
            self._raise_unfresh(MetadataUnavailableError, f"cannot fetch metadata: {e}")
        except tuf_exc.RepositoryError as e:
            self._raise_unfresh(MetadataRefusedError, f"metadata refused ({type(e).__name__}): {e}")
        self._mark_fresh()
        return director, image

    def _raise_unfresh(self, cls: type[Exception], message: str) -> NoReturn:
        if self.is_stale():
            last = self.last_fresh()
            raise StaleMetadataError(
                f"{message}; no fresh timestamp/director metadata since "
                f"{'never' if last is None else datetime.fromtimestamp(last, timezone.utc)} "
                f"(more than {self.stale_after_seconds:.0f} s): possible freeze attack, or the "
                "server is unreachable. The device keeps serving its current model"
            )
        raise cls(message)

    def instructions(
        self,
        *,
        floors: Mapping[str, int],
        active_name: str | None,
        models: Collection[str] = (),
    ) -> list[Instruction]:
        """Refresh both repositories and return what both agree this device must run."""
        director, image = self.refresh()
        targets = [_target(t) for t in director._trusted_set.targets.targets.values()]

        def released(path: str) -> Target | None:
            try:
                info = image.get_targetinfo(path)
            except tuf_exc.RepositoryError as e:
                raise MetadataRefusedError(f"image metadata refused: {e}") from e
            return None if info is None else _target(info)

        return decide(
            targets,
            released,
            device_id=self.device_id,
            device_class=self.device_class,
            floors=floors,
            active_name=active_name,
            models=models,
        )
