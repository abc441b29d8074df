""":class:`UptaneFetcher`: the updater's :class:`~device_agent.update.fetch.Fetcher` when
the device runs on the Uptane chain (``[update] trust = "uptane"``).

The assignment is no longer the server's unsigned document: it is built from the director
instructions that the image repository agrees with (:mod:`device_agent.uptane.decide`).
A refusal, and ``stale_metadata``, is reported to the server as a degraded health report
with its code; the device keeps serving what it serves. Bundles are downloaded from the
configured mirrors (``[uptane] mirrors``, by target path, never with the device's
credential) or else the server's origin by content hash, and must match the signed sha256
and length.

The release counter floor per model name is raised when the device reports a committed
install of that release (``outcome == "installed"``), before the report is sent.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..protocol import DEVICE_API_PREFIX
from ..update.errors import DownloadError
from ..update.fetch import HttpFetcher
from ..update.floors import Floors
from ..update.state import Assignment, BundleRef
from .client import UptaneClient
from .decide import Instruction
from .errors import UptaneError

log = logging.getLogger(__name__)

#: a refusal with the same code is reported again after this long
REPORT_AGAIN_SECONDS = 3600.0


def bundle_ref(i: Instruction) -> BundleRef:
    bid = f"b-{i.sha256[:16]}"
    return BundleRef(
        bid, i.name, i.version, f"{DEVICE_API_PREFIX}/bundles/{bid}", i.sha256, i.length
    )


class UptaneFetcher:
    """Assignments from verified Uptane metadata; downloads and reports over ``http``."""

    def __init__(
        self,
        client: UptaneClient,
        http: HttpFetcher,
        *,
        active_name: Callable[[], str | None],
        clock: Callable[[], float] = time.time,
        mirrors: Sequence[HttpFetcher] = (),
        model: str | None = None,
        models: Collection[str] = (),
        floors: Floors | None = None,
    ) -> None:
        """On a device running several ``models``, one fetcher per ``model`` sharing the
        client and the ``floors`` (one file, one cached copy)."""
        self.client = client
        self.http = http
        #: fetchers without a credential, tried in order before the server for bundles
        self.mirrors = tuple(mirrors)
        self.active_name = active_name
        self.clock = clock
        self.model = model
        self.models = tuple(models)
        self.floors = floors if floors is not None else Floors(Path(client.dir), repair=True)
        self._instructions: list[Instruction] = []
        self._last_report: tuple[str, float] | None = None

    def get_assignment(self, etag: str | None) -> tuple[Assignment | None, str | None]:
        try:
            found = self.client.instructions(
                floors=self.floors.all(), active_name=self.active_name(), models=self.models
            )
        except UptaneError as e:
            self._report_refusal(e)
            raise
        if self._last_report is not None:
            self._report_recovered(self._last_report[0])
        if self.model is not None:  # this model's instructions; the others have their own
            found = [i for i in found if i.name == self.model]
        self._instructions = found
        by_role = {i.role: i for i in found}
        desired, shadow = by_role.get("desired"), by_role.get("shadow")
        body = {
            "desired": bundle_ref(desired).to_json() if desired else None,
            "shadow": bundle_ref(shadow).to_json() if shadow else None,
        }
        aid = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        if aid == etag:
            return None, etag
        return (
            Assignment(
                device_id=self.client.device_id,
                assignment_id=aid,
                desired=bundle_ref(desired) if desired else None,
                shadow=bundle_ref(shadow) if shadow else None,
                model=self.model,
            ),
            aid,
        )

    def download(self, ref: BundleRef, downloads: Path, max_bytes: int) -> Path:
        """The bundle from the first mirror that serves the signed bytes, else the server.

        A mirror is asked for the release's target path, with no credential; the fetcher
        cuts it off at the signed length and refuses bytes whose sha256 is not the signed
        one. A mirror that fails leaves nothing behind for the next source to resume.
        """
        path = next((i.path for i in self._instructions if i.sha256 == ref.sha256), None)
        if path is not None:
            for mirror in self.mirrors:
                try:
                    return mirror.download(replace(ref, url=path), downloads, max_bytes)
                except (DownloadError, ValueError) as e:
                    log.warning(
                        "mirror did not serve the bundle; trying the next source",
                        extra={"mirror": mirror.base_url, "error": str(e)[:300]},
                    )
                    (downloads / f"{ref.bundle_id}.part").unlink(missing_ok=True)
        return self.http.download(ref, downloads, max_bytes)

    def post_reports(self, reports: list[dict[str, Any]]) -> None:
        for r in reports:
            if r.get("type") == "install" and r.get("outcome") == "installed":
                for i in self._instructions:
                    if i.role == "desired" and (i.name, i.version) == (
                        r.get("name"),
                        r.get("version"),
                    ):
                        self.floors.raise_to(i.name, i.release_counter)
        self.http.post_reports(reports)

    def _report_recovered(self, code: str) -> None:
        """Fresh, agreeing metadata again after a refusal: health back to ok."""
        body = {
            "type": "health",
            "health": "ok",
            "error_code": None,
            "message": f"Uptane metadata fresh and agreeing again (after {code})",
            "ts": self.clock(),
            "name": self.active_name(),
            "version": None,
            "state": "idle",
        }
        try:
            self.http.post_reports([body])
            self._last_report = None
        except Exception as err:  # noqa: BLE001 - retried at the next check
            log.warning("cannot report recovery: %s", err)

    def _report_refusal(self, e: UptaneError) -> None:
        now = self.clock()
        if (
            self._last_report is not None
            and self._last_report[0] == e.code
            and now - self._last_report[1] < REPORT_AGAIN_SECONDS
        ):
            return
        log.warning("uptane check refused", extra={"error_code": e.code, "error": str(e)})
        body = {
            "type": "health",
            "health": "degraded",
            "error_code": e.code,
            "message": str(e)[:3900],
            "ts": now,
            "name": self.active_name(),
            "version": None,
            "state": "idle",
        }
        reports = [body]
        about = e.about or {}
        if isinstance(about.get("name"), str) and isinstance(about.get("version"), int):
            # one instruction refused: also a refused install of that release, which the
            # rollout that assigned it counts and shows (as for a refused bundle)
            sha = str(about.get("sha256") or "")
            reports.append(
                {
                    "type": "install",
                    "outcome": "refused",
                    "name": about["name"],
                    "version": about["version"],
                    "bundle_id": f"b-{sha[:16]}" if sha else None,
                    "error_code": e.code,
                    "message": str(e)[:3900],
                    "ts": now,
                    "state": "idle",
                }
            )
        try:
            self.http.post_reports(reports)
            self._last_report = (e.code, now)
        except Exception as err:  # noqa: BLE001 - reporting must not change the outcome
            log.warning("cannot report %s: %s", e.code, err)
