"""Bundle file storage on the local file system (durable writes).

Bundles are stored by content hash (``<sha256>.efb``), written to a temp file in
the same directory, fsynced and renamed into place, so a crash never leaves a
half-written bundle under its final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import BinaryIO

from device_agent._fsutil import fsync_dir
from fleet_server.errors import PayloadTooLargeError

_CHUNK = 1024 * 1024


class BundleStore:
    """A directory of bundle files named by their sha256."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path_for(self, sha256: str) -> Path:
        return self.root / f"{sha256}.efb"

    def incoming(self, src: BinaryIO, max_bytes: int) -> tuple[Path, str, int]:
        """Copy ``src`` to a temp file in the store; returns (temp path, sha256, size)."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".incoming-", suffix=".tmp")
        h = hashlib.sha256()
        size = 0
        try:
            with os.fdopen(fd, "wb") as out:
                while chunk := src.read(_CHUNK):
                    size += len(chunk)
                    if size > max_bytes:
                        raise PayloadTooLargeError(
                            f"upload is larger than the limit of {max_bytes} bytes; raise "
                            "EDGEFLEET_SERVER_MAX_UPLOAD_BYTES if this is intended"
                        )
                    h.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            os.unlink(tmp)
            raise
        return Path(tmp), h.hexdigest(), size

    def commit(self, tmp: Path, sha256: str) -> Path:
        """Move a verified temp file to its final name."""
        dest = self.path_for(sha256)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
        fsync_dir(self.root)
        return dest

    def discard(self, tmp: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
