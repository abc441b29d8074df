from __future__ import annotations

from pathlib import Path

import pytest

from tests.bundlesim import BundleSim


@pytest.fixture
def sim(tmp_path: Path) -> BundleSim:
    return BundleSim(tmp_path / "repo")
