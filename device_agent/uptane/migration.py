"""Moving a device provisioned with today's trust store onto the Uptane chain, in one
signed step the operator approves.

The operator signs a migration document with the release keys the devices trust today
(the trust store's threshold, over the exact bytes, like a manifest)::

    {"type": "edgefleet-uptane-migration/1",
     "image_root": "<base64 of the image repository's root.json>",
     "director_root": "<base64 of the director's root.json>"}

The server serves it with its signatures at ``GET /device/v1/uptane/migration``. A device
with ``[uptane] migrate = true`` that runs without the chain asks for it at each check;
when it verifies, the roots are written to ``<state_dir>/uptane/roots/`` and the device
takes its assignments from the chain from then on (also after a restart). A document that
does not verify is refused (``migration_refused``, reported) and the device carries on as
it was.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import time
import urllib.error
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .._fsutil import atomic_write_bytes
from ..bundle import BundleError, TrustStore
from ..bundle.manifest import canonical_json
from ..bundle.trust import decode_signatures
from ..update.errors import AssignmentError
from ..update.fetch import HttpFetcher
from ..update.state import Assignment, BundleRef

log = logging.getLogger(__name__)

MIGRATION_PATH = "/device/v1/uptane/migration"
DOC_TYPE = "edgefleet-uptane-migration/1"


class MigrationRefusedError(AssignmentError):
    """The migration document does not verify against the device's trust store."""

    code = "migration_refused"


def migration_document(image_root: bytes, director_root: bytes) -> bytes:
    """The canonical bytes the operator signs."""
    return canonical_json(
        {
            "type": DOC_TYPE,
            "image_root": base64.b64encode(image_root).decode(),
            "director_root": base64.b64encode(director_root).decode(),
        }
    )


def verify_migration(doc: bytes, sig: bytes, trust: TrustStore) -> tuple[bytes, bytes]:
    """``(image_root, director_root)`` if ``doc`` is signed under ``trust``'s threshold."""
    try:
        trust.verify(doc, decode_signatures(sig))
        obj = json.loads(doc)
        if canonical_json(obj) != doc or obj.get("type") != DOC_TYPE:
            raise ValueError("not a canonical migration document")
        return (
            base64.b64decode(obj["image_root"], validate=True),
            base64.b64decode(obj["director_root"], validate=True),
        )
    except (BundleError, ValueError, KeyError, TypeError, binascii.Error) as e:
        raise MigrationRefusedError(
            f"the Uptane migration document does not verify against this device's trust "
            f"store ({type(e).__name__}: {e}); the device stays as it is. Sign it with "
            "`edgefleet release migration` and today's release keys"
        ) from e


def roots_dir(state_dir: Path) -> Path:
    return Path(state_dir) / "uptane" / "roots"


def migrated_roots(state_dir: Path) -> tuple[Path, Path] | None:
    """The roots a past migration installed, if any."""
    d = roots_dir(state_dir)
    image, director = d / "image-root.json", d / "director-root.json"
    return (image, director) if image.is_file() and director.is_file() else None


class MigratingFetcher:
    """The plain fetcher, which first looks for a signed migration at each check."""

    def __init__(
        self,
        http: HttpFetcher,
        trust: TrustStore,
        state_dir: Path,
        on_migrated: Callable[[Path, Path], Any],
    ) -> None:
        self.http = http
        self.trust = trust
        self.state_dir = Path(state_dir)
        self.on_migrated = on_migrated

    def get_assignment(self, etag: str | None) -> tuple[Assignment | None, str | None]:
        try:
            resp = self.http._request(self.http._url(MIGRATION_PATH))
        except urllib.error.HTTPError as e:
            e.close()
            return self.http.get_assignment(etag)  # 404: nothing to migrate to
        except OSError:
            return self.http.get_assignment(etag)
        with resp:
            body = json.loads(resp.read(2 * 1024 * 1024))
        try:
            try:
                doc = base64.b64decode(body["document"], validate=True)
                sig = base64.b64decode(body["signatures"], validate=True)
            except (KeyError, TypeError, ValueError, binascii.Error) as e:
                raise MigrationRefusedError(f"malformed migration answer: {e}") from e
            image, director = verify_migration(doc, sig, self.trust)
        except MigrationRefusedError as e:
            self._report(e)
            return self.http.get_assignment(etag)
        d = roots_dir(self.state_dir)
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(d / "image-root.json", image)
        atomic_write_bytes(d / "director-root.json", director)
        log.warning("migrated to the Uptane chain", extra={"roots": str(d)})
        fetcher = self.on_migrated(d / "image-root.json", d / "director-root.json")
        result: tuple[Assignment | None, str | None] = fetcher.get_assignment(None)
        return result

    def _report(self, e: MigrationRefusedError) -> None:
        log.warning("uptane migration refused", extra={"error_code": e.code, "error": str(e)})
        body = {
            "type": "health",
            "health": "degraded",
            "error_code": e.code,
            "message": str(e)[:3900],
            "ts": time.time(),
            "state": "idle",
        }
        try:
            self.http.post_reports([body])
        except Exception as err:  # noqa: BLE001 - reporting must not change the outcome
            log.warning("cannot report %s: %s", e.code, err)

    def download(self, ref: BundleRef, downloads: Path, max_bytes: int) -> Path:
        return self.http.download(ref, downloads, max_bytes)

    def post_reports(self, reports: list[dict[str, Any]]) -> None:
        self.http.post_reports(reports)
