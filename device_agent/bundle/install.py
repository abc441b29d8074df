"""I/O shell around :func:`verify_bundle`: verify a bundle file and stage it.

Files are streamed into a private hidden directory beside the destination while
they are verified; only when verification has fully succeeded is that directory
fsynced and renamed onto the destination. On any failure, including a full
disk, the private directory is removed, so the destination either holds a
complete verified bundle or is exactly as it was.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO

from .._fsutil import fsync_dir
from .errors import NoSpaceError, StagingError
from .manifest import MANIFEST_NAME, SIGNATURE_NAME, FileEntry, Manifest
from .trust import TrustStore
from .verify import Expectation, VerifiedBundle, VerifyLimits, verify_bundle


class _DirectorySink:
    """Writes verified member data into ``root`` (a private temp directory)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._fh: BinaryIO | None = None

    def prepare(self, manifest: Manifest) -> None:
        free = shutil.disk_usage(self.root).free
        need = manifest.total_size
        if need > free:
            raise NoSpaceError(
                f"not enough disk space to stage {manifest.name} v{manifest.version}: need "
                f"{need} bytes, {free} free in {self.root.parent}; free some space and retry"
            )

    def begin(self, entry: FileEntry) -> None:
        self._fh = open(self.root / entry.path, "xb")  # noqa: SIM115 - closed in end()/close()

    def write(self, data: memoryview) -> None:
        assert self._fh is not None
        self._fh.write(data)

    def end(self, entry: FileEntry) -> None:
        assert self._fh is not None
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        self._fh = None

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def verify_file(
    path: str | os.PathLike[str],
    trust: TrustStore,
    *,
    now: datetime | None = None,
    installed_version: int | None = None,
    limits: VerifyLimits | None = None,
    expect: Expectation | None = None,
) -> VerifiedBundle:
    """Verify a bundle file without writing anything."""
    with open(path, "rb", buffering=0) as f:
        return verify_bundle(
            f,  # type: ignore[arg-type]
            trust,
            now=now or datetime.now(timezone.utc),
            installed_version=installed_version,
            limits=limits,
            expect=expect,
        )


def unpack_bundle(
    path: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    trust: TrustStore,
    *,
    now: datetime | None = None,
    installed_version: int | None = None,
    limits: VerifyLimits | None = None,
    expect: Expectation | None = None,
) -> VerifiedBundle:
    """Verify the bundle at ``path`` and install its files into directory ``dest``.

    ``dest`` is replaced as a whole (an existing ``dest`` is swapped out only
    after verification succeeded). Raises a :class:`BundleError` subclass and
    leaves ``dest`` untouched on any failure.
    """
    dest = Path(dest)
    parent = dest.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{dest.name}.incoming-"))
    except OSError as e:
        raise StagingError(f"cannot create a staging directory in {parent}: {e}") from e
    sink = _DirectorySink(tmp)
    try:
        try:
            with open(path, "rb", buffering=0) as f:
                verified = verify_bundle(
                    f,  # type: ignore[arg-type]
                    trust,
                    now=now or datetime.now(timezone.utc),
                    installed_version=installed_version,
                    limits=limits,
                    sink=sink,
                    expect=expect,
                )
            sink.close()
            for name, data in (
                (MANIFEST_NAME, verified.manifest_bytes),
                (SIGNATURE_NAME, verified.signature_bytes),
            ):
                with open(tmp / name, "xb") as out:
                    out.write(data)
                    out.flush()
                    os.fsync(out.fileno())
            fsync_dir(tmp)
            _swap_into_place(tmp, dest)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise NoSpaceError(
                    f"could not stage bundle into {dest}: {e}; the disk is full; free some "
                    "space and retry"
                ) from e
            raise StagingError(
                f"could not stage bundle into {dest}: {e}; check permissions and the storage device"
            ) from e
    finally:
        sink.close()
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return verified


def _swap_into_place(tmp: Path, dest: Path) -> None:
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(dest, old)
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
