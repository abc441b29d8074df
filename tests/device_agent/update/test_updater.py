"""The updater end to end: real HTTP server, real signed bundles, real onnxruntime,
a real SQLite telemetry store for the reports."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_agent.config import UpdateConfig
from device_agent.store import TelemetryStore
from device_agent.update.errors import RollbackUnavailableError, UpdateBusyError
from device_agent.update.fetch import HttpFetcher
from device_agent.update.slots import Slots
from device_agent.update.updater import Updater
from tests.bundlesim import BundleSim, edit_manifest, replace_data, rewrite, tiny_onnx_model
from tests.httpfixtures import (
    SMOKE_INPUT,
    BundleServer,
    Fault,
    ServingHost,
    publish,
    reference_outputs,
)


@pytest.fixture
def server() -> Iterator[BundleServer]:
    srv = BundleServer().start()
    yield srv
    srv.stop()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[TelemetryStore]:
    s = TelemetryStore(tmp_path / "telemetry.db", max_bytes=4 * 1024 * 1024)
    yield s
    s.close()


class Device:
    """An updater plus its host, state dir and store, as a test sees them."""

    def __init__(
        self,
        root: Path,
        sim: BundleSim,
        server: BundleServer | None,
        store: TelemetryStore | None,
        **cfg: Any,
    ) -> None:
        self.host = ServingHost()
        self.config = UpdateConfig(**{"probation_seconds": 0.0, **cfg})
        self.updater = Updater(
            root / "state",
            sim.trust("release"),
            self.host,
            config=self.config,
            fetcher=HttpFetcher(server.url, sleep=lambda s: None) if server else None,
            events=store,
            error_rate_since=self.host.error_rate_since,
        )
        self.store = store
        self.slots = Slots(root / "state")

    def serves(self, seed: int) -> bool:
        return bool(np.allclose(self.host.predict(SMOKE_INPUT), reference_outputs(seed), atol=1e-6))

    def events(self) -> list[dict[str, Any]]:
        assert self.store is not None
        return [r.body for r in self.store.pending(1000, kinds=["events"])]


@pytest.fixture
def device(
    tmp_path: Path, sim: BundleSim, server: BundleServer, store: TelemetryStore
) -> Iterator[Device]:
    d = Device(tmp_path, sim, server, store)
    d.updater.install_file(publish(sim, version=1, seed=1), probation=False)
    assert d.serves(1)
    yield d
    d.updater.unlock()


def test_assigned_update_is_installed_and_served(
    device: Device, server: BundleServer, sim: BundleSim
) -> None:
    server.offer(publish(sim, version=2, seed=2), version=2)
    assert device.updater.check().value == "idle"
    assert device.serves(2)
    assert device.updater.history[-9:] == [
        "checking",
        "downloading",
        "verifying",
        "staging",
        "smoke_testing",
        "switching",
        "probation",
        "committed",
        "idle",
    ]
    ptr = device.slots.active()
    assert ptr is not None and (ptr.slot, ptr.version, ptr.previous) == ("b", 2, "a")
    assert server.reports[-1]["outcome"] == "installed"
    assert device.events()[-1]["outcome"] == "installed"
    # next check: the assignment is what we run; then the server answers 304
    device.updater.check()
    device.updater.check()
    assert server.requests[-1].status == 304
    assert len(server.bundle_requests()) == 1


def refused_over_http(
    device: Device,
    server: BundleServer,
    bundle: Path,
    version: int,
    code: str,
    old_version: int = 1,
) -> None:
    server.offer(bundle, version=version)
    device.updater.check()
    assert device.serves(1), "the old model must keep serving"
    assert device.slots.active().version == old_version  # type: ignore[union-attr]
    for report in (server.reports[-1], device.events()[-1]):
        assert report["outcome"] == "refused" and report["error_code"] == code
        assert report["state"] == "verify_failed"
    # a refused bundle is not fetched again while the assignment stays the same
    device.updater.check()
    assert len(server.bundle_requests()) == 1
    assert list((device.updater.downloads).iterdir()) == []


def test_tampered_bundle_over_http_is_refused_and_old_model_serves(
    device: Device, server: BundleServer, sim: BundleSim, tmp_path: Path
) -> None:
    good = publish(sim, version=2, seed=2)
    tampered = rewrite(
        good,
        tmp_path / "tampered.efb",
        lambda ms: replace_data(ms, "model.onnx", tiny_onnx_model(3)),
    )
    refused_over_http(device, server, tampered, 2, "hash_mismatch")


def test_edited_manifest_over_http_is_refused(
    device: Device, server: BundleServer, sim: BundleSim, tmp_path: Path
) -> None:
    good = publish(sim, version=2, seed=2)
    edited = rewrite(
        good, tmp_path / "edited.efb", lambda ms: edit_manifest(ms, lambda m: m.update(version=9))
    )
    refused_over_http(device, server, edited, 9, "bad_signature")


def test_rolled_back_version_over_http_is_refused(
    tmp_path: Path, sim: BundleSim, server: BundleServer, store: TelemetryStore
) -> None:
    d = Device(tmp_path, sim, server, store)
    d.updater.install_file(publish(sim, version=5, seed=1), probation=False)
    refused_over_http(d, server, publish(sim, version=4, seed=2), 4, "rollback", old_version=5)


def test_expired_bundle_over_http_is_refused(
    device: Device, server: BundleServer, sim: BundleSim
) -> None:
    old = datetime.now(timezone.utc) - timedelta(days=10)
    expired = publish(sim, version=2, seed=2, created=old, valid_for=timedelta(days=1))
    refused_over_http(device, server, expired, 2, "expired")


def test_assignment_naming_another_version_is_refused(
    device: Device, server: BundleServer, sim: BundleSim
) -> None:
    refused_over_http(device, server, publish(sim, version=3, seed=2), 2, "assignment_mismatch")


def test_smoke_test_mismatch_fails_and_old_model_serves(
    device: Device, server: BundleServer, sim: BundleSim
) -> None:
    server.offer(publish(sim, version=2, seed=2, smoke="mismatch"), version=2)
    device.updater.check()
    assert device.serves(1)
    assert "smoke_failed" in device.updater.history
    report = server.reports[-1]
    assert (report["outcome"], report["error_code"]) == ("failed", "smoke_test_failed")
    assert "does not compute what was converted" in report["message"]
    assert device.slots.manifest("b") is None  # the unfit bundle was discarded


def test_probation_failure_falls_back_to_previous_slot(
    tmp_path: Path, sim: BundleSim, server: BundleServer, store: TelemetryStore
) -> None:
    d = Device(
        tmp_path,
        sim,
        server,
        store,
        probation_seconds=60.0,
        probation_min_predictions=10,
        probation_max_error_rate=0.2,
    )
    d.updater.install_file(publish(sim, version=1, seed=1), probation=False)
    server.offer(publish(sim, version=2, seed=2), version=2)
    assert d.updater.check().value == "probation"
    assert d.serves(2)
    for _ in range(5):
        d.host.predict(SMOKE_INPUT)
    for _ in range(5):  # the application's real inputs break the new model
        with pytest.raises(Exception, match="(?i)invalid|shape|dimension|got"):
            d.host.predict(np.zeros((1, 7), np.float32))
    assert d.updater.tick().value == "idle"
    assert d.serves(1)
    assert d.updater.history[-5:] == [
        "probation",
        "probation_failed",
        "rolling_back",
        "rolled_back",
        "idle",
    ]
    failed, rolled = server.reports[-2:]
    assert (failed["outcome"], failed["error_code"]) == ("failed", "probation_failed")
    assert rolled["outcome"] == "rolled_back"
    assert "error rate 45.5% over 11 predictions" in rolled["message"]
    assert [e["outcome"] for e in d.events()[-2:]] == ["failed", "rolled_back"]
    ptr = d.slots.active()
    assert ptr is not None and (ptr.slot, ptr.version, ptr.previous) == ("a", 1, None)
    # the failed bundle is not installed again for the same assignment
    d.updater.check()
    assert d.serves(1) and len(server.bundle_requests()) == 1


def test_probation_passes_with_healthy_traffic(
    tmp_path: Path, sim: BundleSim, server: BundleServer
) -> None:
    d = Device(tmp_path, sim, server, None, probation_seconds=0.3, probation_min_predictions=5)
    d.updater.install_file(publish(sim, version=1, seed=1), probation=False)
    server.offer(publish(sim, version=2, seed=2), version=2)
    assert d.updater.check().value == "probation"
    deadline = time.monotonic() + 10
    while d.updater.tick().value != "idle":
        d.host.predict(SMOKE_INPUT)
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert d.updater.history[-2:] == ["committed", "idle"] and d.serves(2)


def test_shadow_candidate_runs_beside_active_and_is_never_switched_to(
    device: Device, server: BundleServer, sim: BundleSim
) -> None:
    v1, before = device.slots.active(), len(device.updater.history)
    server.offer(
        _bundle_path(device), version=1, shadow=publish(sim, version=2, seed=2), shadow_version=2
    )
    device.updater.check()
    assert device.host.shadow is not None and device.host.shadow.version == 2
    assert device.serves(1) and device.slots.active() == v1
    assert device.updater.history[before:] == [
        "checking",
        "downloading",
        "verifying",
        "staging",
        "smoke_testing",
        "shadow_loading",
        "shadow_started",
        "idle",
    ]
    assert device.slots.shadow()["version"] == 2  # type: ignore[index]
    assert server.reports[-1]["shadow"] is True
    # the operator ends the shadow run
    server.offer(_bundle_path(device), version=1)
    device.updater.check()
    assert device.host.shadow is None and device.slots.shadow() is None and device.serves(1)


def _bundle_path(device: Device) -> Path:
    return next(Path(device.updater.state_dir).parent.glob("repo/smoked-tiny-1-1-*/*.efb"))


def test_oversized_download_over_http_is_cut_off_and_reported(
    tmp_path: Path, sim: BundleSim, server: BundleServer, store: TelemetryStore
) -> None:
    d = Device(tmp_path, sim, server, store, max_bundle_bytes=128 * 1024)
    d.updater.install_file(publish(sim, version=1, seed=1), probation=False)
    doc = server.offer(publish(sim, version=2, seed=2), version=2, size=128 * 1024)
    server.faults[doc["desired"]["bundle_id"]] = Fault(endless=True)
    d.updater.check()
    assert d.serves(1)
    assert (server.reports[-1]["outcome"], server.reports[-1]["error_code"]) == (
        "failed",
        "oversized_download",
    )


def test_interrupted_download_resumes_with_range_and_installs(
    device: Device, server: BundleServer, sim: BundleSim
) -> None:
    doc = server.offer(publish(sim, version=2, seed=2), version=2)
    server.faults[doc["desired"]["bundle_id"]] = Fault(drop_after=5000)
    device.updater.check()
    assert device.serves(2)
    assert server.bundle_requests()[-1].headers["Range"] == "bytes=5000-"


def test_manual_rollback_switches_to_previous_verified_slot(
    device: Device, server: BundleServer, sim: BundleSim
) -> None:
    server.offer(publish(sim, version=2, seed=2), version=2)
    device.updater.check()
    assert device.serves(2)
    device.updater.rollback()
    assert device.serves(1)
    ptr = device.slots.active()
    assert ptr is not None and (ptr.slot, ptr.previous) == ("a", "b")
    assert device.events()[-1]["outcome"] == "rolled_back"


def test_manual_rollback_refuses_a_tampered_previous_slot(
    device: Device, server: BundleServer, sim: BundleSim
) -> None:
    server.offer(publish(sim, version=2, seed=2), version=2)
    device.updater.check()
    (device.slots.path("a") / "model.onnx").write_bytes(tiny_onnx_model(7))
    with pytest.raises(RollbackUnavailableError, match="does not hold a verified bundle"):
        device.updater.rollback()
    assert device.serves(2)


def test_manual_rollback_refuses_without_previous_slot(device: Device) -> None:
    with pytest.raises(RollbackUnavailableError, match="no previous slot"):
        device.updater.rollback()
    assert device.serves(1)


def test_second_updater_on_same_state_dir_is_refused(
    device: Device, sim: BundleSim, tmp_path: Path
) -> None:
    other = Updater(tmp_path / "state", sim.trust("release"), ServingHost())
    with pytest.raises(UpdateBusyError, match="update.lock"):
        other.install_file(publish(sim, version=2, seed=2))


def test_boot_serves_the_active_slot(device: Device, sim: BundleSim, tmp_path: Path) -> None:
    device.updater.unlock()
    host = ServingHost()
    again = Updater(tmp_path / "state", sim.trust("release"), host)
    model = again.boot()
    assert model is not None and model.version == 1
    assert np.allclose(host.predict(SMOKE_INPUT), reference_outputs(1), atol=1e-6)
    again.unlock()


def test_unreachable_server_leaves_device_idle_and_serving(
    tmp_path: Path, sim: BundleSim, server: BundleServer
) -> None:
    d = Device(tmp_path, sim, server, None)
    d.updater.install_file(publish(sim, version=1, seed=1), probation=False)
    server.stop()
    server.start()  # a new port: the device's URL now points nowhere
    assert d.updater.check().value == "idle"
    assert d.updater.history[-3:] == ["idle", "checking", "idle"] and d.serves(1)


def test_probation_final_smoke_check_catches_a_corrupted_slot(
    tmp_path: Path, sim: BundleSim, server: BundleServer, store: TelemetryStore
) -> None:
    d = Device(tmp_path, sim, server, store, probation_seconds=0.2)
    d.updater.install_file(publish(sim, version=1, seed=1), probation=False)
    server.offer(publish(sim, version=2, seed=2), version=2)
    assert d.updater.check().value == "probation" and d.serves(2)
    (d.slots.path("b") / "model.onnx").write_bytes(tiny_onnx_model(8))  # storage corruption
    time.sleep(0.25)
    assert d.updater.tick().value == "idle"
    assert d.serves(1)
    failed, rolled = server.reports[-2:]
    assert failed["error_code"] == "hash_mismatch"
    assert rolled["outcome"] == "rolled_back" and "final smoke check failed" in rolled["message"]


def test_boot_falls_back_to_previous_slot_when_active_slot_is_corrupt(
    device: Device, server: BundleServer, sim: BundleSim, tmp_path: Path, store: TelemetryStore
) -> None:
    server.offer(publish(sim, version=2, seed=2), version=2)
    device.updater.check()
    device.updater.unlock()
    (device.slots.path("b") / "model.onnx").write_bytes(tiny_onnx_model(8))
    host = ServingHost()
    again = Updater(tmp_path / "state", sim.trust("release"), host, events=store)
    model = again.boot()
    again.unlock()
    assert model is not None and model.version == 1
    assert np.allclose(host.predict(SMOKE_INPUT), reference_outputs(1), atol=1e-6)
    ptr = device.slots.active()
    assert ptr is not None and (ptr.slot, ptr.version) == ("a", 1)
    assert device.events()[-1]["error_code"] == "active_slot_corrupt"


def test_rolled_back_report_names_the_model_now_serving(
    tmp_path: Path, sim: BundleSim, server: BundleServer
) -> None:
    d = Device(
        tmp_path,
        sim,
        server,
        None,
        probation_seconds=60.0,
        probation_min_predictions=2,
        probation_max_error_rate=0.1,
    )
    d.updater.install_file(publish(sim, version=1, seed=1), probation=False)
    doc = server.offer(publish(sim, version=2, seed=2), version=2)
    d.updater.check()
    for _ in range(3):
        with pytest.raises(Exception, match="(?i)invalid|shape|dimension|got"):
            d.host.predict(np.zeros((1, 7), np.float32))
    d.updater.tick()
    failed, rolled = server.reports[-2:]
    assert (failed["name"], failed["version"], failed["bundle_id"]) == (
        "tiny",
        2,
        doc["desired"]["bundle_id"],
    )
    assert (rolled["name"], rolled["version"]) == ("tiny", 1)
    assert rolled["rolled_back_from"] == {
        "name": "tiny",
        "version": 2,
        "bundle_id": doc["desired"]["bundle_id"],
    }
