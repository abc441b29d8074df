"""A real small tmpfs for full-disk tests (needs root; CI runs as root).

with tmpfs(tmp_path / "disk", "24m") as mnt:
    fill(mnt, leave=64 * 1024)   # the disk now has ~64 KiB free
    ...
    unfill(mnt)                  # space is back
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

FILLER = ".filler"


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "24m") -> Iterator[Path]:
    """Mount a tmpfs of ``size`` at ``path`` for the block; unmount after it."""
    if os.geteuid() != 0:
        assert not os.environ.get("CI"), "the full-disk tests need root to mount a tmpfs"
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def free_bytes(mnt: Path) -> int:
    return shutil.disk_usage(mnt).free


def fill(mnt: Path, leave: int = 0) -> None:
    """Write a filler file until at most ``leave`` bytes are free on ``mnt``."""
    chunk = bytes(1 << 20)
    with open(mnt / FILLER, "ab") as f:
        while True:
            free = free_bytes(mnt)
            if free <= leave:
                return
            n = min(len(chunk), free - leave)
            try:
                f.write(chunk[: max(n, 1)])
                f.flush()
            except OSError:
                return


def unfill(mnt: Path) -> None:
    """Remove the filler: the space is back."""
    (mnt / FILLER).unlink(missing_ok=True)
