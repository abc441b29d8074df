"""A full disk never stops serving: the update is refused with ``no_space`` and retried
by itself when space returns. The state directory is on a real 24 MiB tmpfs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_agent.config import UpdateConfig
from device_agent.update.fetch import HttpFetcher
from device_agent.update.updater import Updater
from tests.bundlesim import BundleSim
from tests.faultbundles import publish_padded
from tests.httpfixtures import SMOKE_INPUT, BundleServer, ServingHost, publish, reference_outputs
from tests.tmpfs import fill, tmpfs, unfill

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def server() -> Iterator[BundleServer]:
    srv = BundleServer().start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    sim = BundleSim(tmp_path_factory.mktemp("nospace"))
    return {
        "sim": sim,
        "v1": publish(sim, version=1, seed=1),
        "v2": publish_padded(sim, version=2, seed=2, extra_bytes=4 * MiB),
    }


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    with tmpfs(tmp_path / "disk", "24m") as mnt:
        yield mnt


def _device(disk: Path, repo: dict[str, Any], server: BundleServer) -> tuple[Updater, Any]:
    host = ServingHost()
    up = Updater(
        disk / "state",
        repo["sim"].trust("release"),
        host,
        config=UpdateConfig(probation_seconds=0.0),
        fetcher=HttpFetcher(server.url, sleep=lambda s: None),
    )
    up.install_file(repo["v1"], probation=False)
    server.reports.clear()
    server.offer(repo["v2"], version=2)
    return up, host


def _serves(host: Any, seed: int) -> bool:
    return bool(np.allclose(host.predict(SMOKE_INPUT), reference_outputs(seed), atol=1e-6))


@pytest.mark.parametrize("stage,leave", [("download_failed", 1 * MiB), ("stage_failed", 6 * MiB)])
def test_disk_full_during_update_is_refused_with_no_space_then_recovers(
    stage: str, leave: int, disk: Path, repo: dict[str, Any], server: BundleServer
) -> None:
    up, host = _device(disk, repo, server)
    try:
        fill(disk, leave=leave)
        assert up.check().value == "idle"
        assert _serves(host, 1), "the serving model is untouched"
        report = server.reports[-1]
        assert (report["state"], report["error_code"]) == (stage, "no_space"), report
        assert not list((disk / "state" / "downloads").glob("*")), "partial download freed"
        unfill(disk)
        assert up.check().value == "idle"  # not remembered as failed: retried by itself
        assert _serves(host, 2)
        assert server.reports[-1]["outcome"] == "installed"
    finally:
        up.unlock()


def test_disk_too_full_to_save_update_state_keeps_serving(
    disk: Path, repo: dict[str, Any], server: BundleServer
) -> None:
    up, host = _device(disk, repo, server)
    try:
        fill(disk)
        assert up.check().value == "idle"
        assert _serves(host, 1)
        unfill(disk)
        assert up.check().value == "idle"
        assert _serves(host, 2)
    finally:
        up.unlock()
