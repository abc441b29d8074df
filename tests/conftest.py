from __future__ import annotations

from pathlib import Path

import pytest

from tests.bundlesim import BundleSim

# server fixtures (live uvicorn servers, admin clients) for every test that asks for them
pytest_plugins = ["tests.server_fixtures"]


@pytest.fixture
def sim(tmp_path: Path) -> BundleSim:
    return BundleSim(tmp_path / "repo")
