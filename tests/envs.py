"""Separate virtual environments for tests that must prove what is (not) installed.

Environments are cached under ``.venv-cache/`` keyed by their requirements, so
CI pays for each once per machine.
"""

from __future__ import annotations

import hashlib
import subprocess
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".venv-cache"


def cached_venv(name: str, requirements: list[str], key_files: tuple[Path, ...] = ()) -> Path:
    """Create (once) a venv with ``requirements`` installed; return its python."""
    h = hashlib.sha256("\n".join(requirements).encode())
    for f in key_files:
        h.update(f.read_bytes())
    env_dir = CACHE / f"{name}-{h.hexdigest()[:12]}"
    python = env_dir / "bin" / "python"
    stamp = env_dir / ".complete"
    if not stamp.exists():
        if env_dir.exists():
            import shutil

            shutil.rmtree(env_dir)
        venv.EnvBuilder(with_pip=True).create(env_dir)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", *requirements],
            check=True,
            timeout=900,
        )
        stamp.touch()
    return python


def run_in(python: Path, script: str, *args: str, timeout: float = 300) -> str:
    out = subprocess.run(
        [str(python), "-c", script, *args], capture_output=True, text=True, timeout=timeout
    )
    if out.returncode != 0:
        raise AssertionError(f"script failed in {python}:\n{out.stdout}\n{out.stderr}")
    return out.stdout


__all__ = ["cached_venv", "run_in"]
