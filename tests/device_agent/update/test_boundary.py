"""The boundary around a candidate: a foreign exception at any step is a coded refusal.

Each test makes one step of an assigned update raise an exception of a type the
step does not expect (``ValueError``, ``KeyError``, ``ZeroDivisionError``, ...),
then checks that the update was refused with a code and reported to the
server, that the machine is back in ``idle`` with the old model serving, and
that the next good bundle installs (the device is not wedged).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_agent.config import UpdateConfig
from device_agent.store import TelemetryStore
from device_agent.update import updater as updater_module
from device_agent.update.fetch import HttpFetcher
from device_agent.update.machine import Action
from device_agent.update.slots import Slots
from device_agent.update.updater import Updater
from tests.bundlesim import BundleSim
from tests.httpfixtures import SMOKE_INPUT, BundleServer, ServingHost, publish, reference_outputs


@pytest.fixture(scope="module")
def server() -> Iterator[BundleServer]:
    srv = BundleServer().start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    sim = BundleSim(tmp_path_factory.mktemp("boundary"))
    return {
        "sim": sim,
        "v1": publish(sim, version=1, seed=1),
        "v2": publish(sim, version=2, seed=2),
        "v3": publish(sim, version=3, seed=3),
    }


class FlakyFetcher(HttpFetcher):
    """An HTTP fetcher whose download or check-in raises ``fault`` once."""

    def __init__(self, url: str) -> None:
        super().__init__(url, sleep=lambda s: None)
        self.fault: dict[str, BaseException] = {}

    def get_assignment(self, etag: str | None) -> Any:
        if "check" in self.fault:
            raise self.fault.pop("check")
        return super().get_assignment(etag)

    def download(self, ref: Any, downloads: Path, max_bytes: int) -> Path:
        if "download" in self.fault:
            raise self.fault.pop("download")
        return super().download(ref, downloads, max_bytes)


class Device:
    def __init__(self, root: Path, repo: dict[str, Any], server: BundleServer) -> None:
        self.host = ServingHost()
        self.store = TelemetryStore(root / "telemetry.db", max_bytes=4 * 1024 * 1024)
        self.fetcher = FlakyFetcher(server.url)
        self.loader_fault: BaseException | None = None
        self.updater = Updater(
            root / "state",
            repo["sim"].trust("release"),
            self.host,
            config=UpdateConfig(probation_seconds=0.0),
            fetcher=self.fetcher,
            events=self.store,
            error_rate_since=self.host.error_rate_since,
            loader=self._load,
        )
        self.updater.install_file(repo["v1"], probation=False)

    def _load(self, path: Path, slot: str, threads: int) -> Any:
        if self.loader_fault is not None:
            fault, self.loader_fault = self.loader_fault, None
            raise fault
        return updater_module._default_loader(path, slot, threads)

    def serves(self, seed: int) -> bool:
        out = self.host.predict(SMOKE_INPUT)
        return bool(np.allclose(out, reference_outputs(seed), atol=1e-6))


@pytest.fixture
def device(tmp_path: Path, repo: dict[str, Any], server: BundleServer) -> Iterator[Device]:
    server.reports.clear()
    d = Device(tmp_path, repo, server)
    yield d
    d.updater.unlock()
    d.store.close()


def _raise(exc: BaseException) -> Callable[..., Any]:
    def fn(*args: Any, **kwargs: Any) -> Any:
        raise exc

    return fn


def assert_refused_then_recovers(
    device: Device,
    server: BundleServer,
    repo: dict[str, Any],
    state: str,
    code: str,
    exc_name: str | None,
) -> None:
    assert device.updater.state.value == "idle"
    assert device.serves(1), "the serving model must be untouched"
    ptr = Slots(device.updater.state_dir).active()
    assert ptr is not None and ptr.version == 1
    report = server.reports[-1]
    assert (report["state"], report["error_code"]) == (state, code), report
    if exc_name is not None:
        assert exc_name in report["message"], report
    events = [r.body for r in device.store.pending(100, kinds=["events"])]
    assert events[-1]["error_code"] == code
    # not wedged: a new assignment installs
    server.offer(repo["v3"], version=3)
    assert device.updater.check().value == "idle"
    assert device.serves(3)
    assert server.reports[-1]["outcome"] == "installed"


def test_foreign_exception_in_check_in_is_contained(
    device: Device, server: BundleServer, repo: dict[str, Any]
) -> None:
    server.offer(repo["v2"], version=2)
    device.fetcher.fault["check"] = TypeError("unexpected None in assignment")
    assert device.updater.check().value == "idle"
    assert device.serves(1)
    assert device.updater.check().value == "idle"  # the next check proceeds
    assert device.serves(2)


def test_foreign_exception_in_download_is_internal_error(
    device: Device, server: BundleServer, repo: dict[str, Any]
) -> None:
    server.offer(repo["v2"], version=2)
    device.fetcher.fault["download"] = KeyError("content-range")
    device.updater.check()
    assert_refused_then_recovers(
        device, server, repo, "download_failed", "internal_error", "KeyError"
    )


def test_foreign_exception_in_verify_is_internal_error(
    device: Device,
    server: BundleServer,
    repo: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server.offer(repo["v2"], version=2)
    monkeypatch.setattr(updater_module, "verify_file", _raise(ValueError("negative count")))
    device.updater.check()
    monkeypatch.undo()
    assert_refused_then_recovers(
        device, server, repo, "verify_failed", "internal_error", "ValueError: negative count"
    )


def test_foreign_exception_in_stage_is_internal_error(
    device: Device,
    server: BundleServer,
    repo: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server.offer(repo["v2"], version=2)
    monkeypatch.setattr(updater_module, "unpack_bundle", _raise(ZeroDivisionError("bad")))
    device.updater.check()
    monkeypatch.undo()
    assert_refused_then_recovers(
        device, server, repo, "stage_failed", "internal_error", "ZeroDivisionError"
    )


def test_foreign_exception_in_smoke_test_is_refused(
    device: Device,
    server: BundleServer,
    repo: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server.offer(repo["v2"], version=2)
    monkeypatch.setattr(updater_module, "run_smoke_test", _raise(IndexError("out of range")))
    device.updater.check()
    monkeypatch.undo()
    assert_refused_then_recovers(
        device, server, repo, "smoke_failed", "model_load_failed", "out of range"
    )


def test_foreign_exception_in_shadow_load_is_refused(
    device: Device,
    server: BundleServer,
    repo: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server.offer(repo["v1"], version=1, shadow=repo["v2"], shadow_version=2)
    real = device.updater._load_staged
    calls = {"n": 0}

    def second_load_fails() -> Any:
        calls["n"] += 1
        if calls["n"] == 2:  # the smoke test loads first, then the shadow load
            raise MemoryError("arena")
        return real()

    monkeypatch.setattr(device.updater, "_load_staged", second_load_fails)
    device.updater.check()
    monkeypatch.undo()
    assert Slots(device.updater.state_dir).shadow() is None
    assert_refused_then_recovers(device, server, repo, "smoke_failed", "model_load_failed", "arena")


def test_foreign_exception_in_discard_is_contained_in_failure_state(
    device: Device,
    server: BundleServer,
    repo: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server.offer(repo["v2"], version=2)
    monkeypatch.setattr(updater_module, "verify_file", _raise(ValueError("x")))
    monkeypatch.setitem(Updater._ACTIONS, Action.DISCARD_DOWNLOAD, _raise(PermissionError("ro")))
    device.updater.check()
    monkeypatch.undo()
    assert_refused_then_recovers(device, server, repo, "verify_failed", "internal_error", "x")


def test_foreign_exception_in_switch_rolls_back(
    device: Device, server: BundleServer, repo: dict[str, Any]
) -> None:
    server.offer(repo["v2"], version=2)
    real_swap = device.host.swap
    calls = {"n": 0}

    def swap_fails_once(model: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError("display driver gone")
        return real_swap(model)

    device.host.swap = swap_fails_once  # type: ignore[method-assign]
    device.updater.check()
    device.host.swap = real_swap  # type: ignore[method-assign]
    assert device.updater.state.value == "idle"
    assert device.serves(1)
    ptr = Slots(device.updater.state_dir).active()
    assert ptr is not None and ptr.version == 1
    report = server.reports[-1]
    assert report["outcome"] == "rolled_back", report


def test_foreign_exception_in_probation_rolls_back(
    device: Device, server: BundleServer, repo: dict[str, Any]
) -> None:
    server.offer(repo["v2"], version=2)
    device.updater.config.probation_seconds = 60.0
    assert device.updater.check().value == "probation"
    device.updater.error_rate_since = _raise(ArithmeticError("counter overflow"))
    assert device.updater.tick().value == "idle"
    assert device.serves(1)
    failed = [r for r in server.reports if r["state"] == "probation_failed"]
    assert failed and failed[-1]["error_code"] == "internal_error", server.reports
    assert "ArithmeticError" in failed[-1]["message"]
    assert server.reports[-1]["outcome"] == "rolled_back"
