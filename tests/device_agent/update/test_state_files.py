"""Corrupted durable state files: moved aside, reported, and the device keeps serving.

Each case writes a hostile or broken ``update.json``, ``active.json``,
``shadow.json`` or ``floors.json`` into a device that serves verified bundles,
starts the updater again (as a restart would), and checks that the file was
moved aside with a timestamp, a ``state_file_invalid`` event was stored, the
device serves the safest verified model and a good bundle still installs.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_agent.store import TelemetryStore
from device_agent.update.floors import Floors
from device_agent.update.slots import Slots
from device_agent.update.updater import Updater, read_status
from tests.bundlesim import BundleSim
from tests.httpfixtures import SMOKE_INPUT, ServingHost, publish, reference_outputs


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    sim = BundleSim(tmp_path_factory.mktemp("statefiles"))
    return {"sim": sim, **{f"v{v}": publish(sim, version=v, seed=v) for v in (1, 2, 3, 4)}}


class Device:
    def __init__(self, root: Path, repo: dict[str, Any]) -> None:
        self.root, self.repo = root, repo
        self.state = root / "state"
        self.store = TelemetryStore(root / "telemetry.db", max_bytes=4 * 1024 * 1024)
        self.updater = self.start()

    def start(self) -> Updater:
        self.host = ServingHost()
        up = Updater(self.state, self.repo["sim"].trust("release"), self.host, events=self.store)
        up.boot()
        return up

    def restart(self) -> Updater:
        self.updater.unlock()
        self.updater = self.start()
        return self.updater

    def install(self, version: int) -> dict[str, Any]:
        self.updater.install_file(self.repo[f"v{version}"], probation=False)
        return self.updater.reports[-1]

    def serves(self, seed: int) -> bool:
        out = self.host.predict(SMOKE_INPUT)
        return bool(np.allclose(out, reference_outputs(seed), atol=1e-6))

    def events(self) -> list[dict[str, Any]]:
        return [r.body for r in self.store.pending(1000, kinds=["events"])]

    def moved_aside(self, name: str) -> list[Path]:
        return sorted(self.state.glob(f"{name}.invalid-*"))


@pytest.fixture
def device(tmp_path: Path, repo: dict[str, Any]) -> Iterator[Device]:
    d = Device(tmp_path, repo)
    assert d.install(1)["outcome"] == "installed"
    assert d.install(3)["outcome"] == "installed"  # slot a: v1, slot b: v3 (active)
    yield d
    d.updater.unlock()
    d.store.close()


def _assert_reported(device: Device, name: str) -> None:
    assert len(device.moved_aside(name)) == 1, sorted(p.name for p in device.state.iterdir())
    assert not (device.state / name).exists() or name != "shadow.json"
    found = [e for e in device.events() if e.get("error_code") == "state_file_invalid"]
    assert found and found[-1]["state_file"]["file"] == name, found
    assert found[-1]["type"] == "health"


UPDATE_JSON_CORRUPTIONS: dict[str, bytes] = {
    "garbage": b"\x00\xff garbage",
    "truncated": b'{"state": "verif',
    "empty": b"",
    "not_an_object": b"[1, 2, 3]",
    "unknown_state": json.dumps({"state": "exploding"}).encode(),
    "target_wrong_type": json.dumps({"state": "verifying", "target": "v2"}).encode(),
    "target_field_wrong_type": json.dumps(
        {
            "state": "downloading",
            "target": {
                "bundle_id": ["x"],
                "name": "tiny",
                "version": 2,
                "url": "/b",
                "sha256": "0" * 64,
                "size": 1,
            },
        }
    ).encode(),
    "slot_path_traversal": json.dumps({"state": "staging", "slot": "../../etc"}).encode(),
    "failed_wrong_type": json.dumps({"state": "idle", "failed": [1]}).encode(),
    "nan_probation": b'{"state": "probation", "probation_started": NaN}',
    "huge_integer": b'{"state": "idle", "restarts": {"idle": ' + b"9" * 5000 + b"}}",
}


@pytest.mark.parametrize("case", sorted(UPDATE_JSON_CORRUPTIONS))
def test_invalid_update_json_is_moved_aside_and_device_serves(device: Device, case: str) -> None:
    (device.state / "update.json").write_bytes(UPDATE_JSON_CORRUPTIONS[case])
    up = device.restart()
    assert up.state.value == "idle"
    assert device.serves(3)
    _assert_reported(device, "update.json")
    assert device.install(4)["outcome"] == "installed"
    assert device.serves(4)


ACTIVE_JSON_CORRUPTIONS: dict[str, bytes] = {
    "garbage": b"{{{{",
    "slot_path_traversal": json.dumps({"slot": "../../etc", "name": "tiny", "version": 3}).encode(),
    "version_wrong_type": json.dumps({"slot": "b", "name": "tiny", "version": "3"}).encode(),
    "unknown_field": json.dumps({"slot": "b", "name": "tiny", "version": 3, "evil": 1}).encode(),
    "disagrees_with_slot": json.dumps({"slot": "a", "name": "tiny", "version": 3}).encode(),
    "previous_is_active": json.dumps(
        {"slot": "b", "name": "tiny", "version": 3, "previous": "b"}
    ).encode(),
}


@pytest.mark.parametrize("case", sorted(ACTIVE_JSON_CORRUPTIONS))
def test_invalid_active_json_serves_highest_verified_slot(device: Device, case: str) -> None:
    (device.state / "active.json").write_bytes(ACTIVE_JSON_CORRUPTIONS[case])
    device.restart()
    assert device.serves(3), "the slot with the highest verified version must serve"
    ptr = Slots(device.state).active()
    assert ptr is not None and (ptr.slot, ptr.version) == ("b", 3)
    _assert_reported(device, "active.json")
    assert any(e.get("error_code") == "active_pointer_rederived" for e in device.events())
    # the floor survived: an older v2 is refused
    assert device.install(2)["error_code"] == "rollback"
    assert device.serves(3)


def test_deleted_active_json_is_rederived_without_losing_the_floor(device: Device) -> None:
    (device.state / "active.json").unlink()
    device.restart()
    assert device.serves(3)
    assert device.install(2)["error_code"] == "rollback"


def test_corrupt_active_and_floors_still_refuse_older_version(device: Device) -> None:
    (device.state / "active.json").write_bytes(b"garbage")
    (device.state / "floors.json").write_bytes(b"garbage")
    device.restart()
    assert device.serves(3)
    assert len(device.moved_aside("floors.json")) == 1
    assert Floors(device.state).get("tiny") == 3  # re-derived from the verified slots
    assert device.install(2)["error_code"] == "rollback"
    assert device.serves(3)


def test_floor_outlives_active_json_that_names_the_older_slot(device: Device) -> None:
    # a valid-looking pointer to the older slot (the attacker's edit): v1 serves only
    # if it agrees with its slot, and the floor still refuses v2
    (device.state / "active.json").write_text(
        json.dumps({"slot": "a", "name": "tiny", "version": 1})
    )
    device.restart()
    assert Floors(device.state).get("tiny") == 3
    assert device.install(2)["error_code"] == "rollback"


@pytest.mark.parametrize(
    "content", [b"nonsense", json.dumps({"slot": "../x", "name": "t", "version": 1}).encode()]
)
def test_invalid_shadow_json_is_moved_aside(device: Device, content: bytes) -> None:
    (device.state / "shadow.json").write_bytes(content)
    device.restart()
    assert device.serves(3)
    assert Slots(device.state).shadow() is None
    _assert_reported(device, "shadow.json")


def test_status_reads_invalid_files_without_changing_them(device: Device) -> None:
    (device.state / "update.json").write_bytes(b"garbage")
    status = read_status(device.state)
    assert status["state"] == "idle"
    assert (device.state / "update.json").read_bytes() == b"garbage"
    assert status["floors"] == {"tiny": 3}


def test_floors_are_per_model_name_and_never_lower(tmp_path: Path) -> None:
    floors = Floors(tmp_path)
    assert floors.get("tiny") is None
    assert floors.raise_to("tiny", 3) is True
    assert floors.raise_to("tiny", 2) is False
    assert floors.raise_to("other", 1) is True
    fresh = Floors(tmp_path)
    assert (fresh.get("tiny"), fresh.get("other")) == (3, 1)
    assert fresh.all() == {"other": 1, "tiny": 3}
