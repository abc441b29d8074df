"""Which devices a rollout wakes (SQLite and PostgreSQL): a rollout's start gives every
device of its group a new assignment document (its ``rollout_id``), but only the devices
whose bundle changed are notified at once; the others get the new document at their next
check-in. Waking the whole group for a rollout id cost a fleet-wide burst of check-ins
at 10,000 devices."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from fleet_server.app import create_app
from fleet_server.rollouts import bucket
from tests.bundlesim import BundleSim
from tests.server_fixtures import Fleet, signed_settings

DEVICES = [f"cam-{i:02d}" for i in range(16)]


class Recorder:
    """A notifier that records what it was asked to send."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def notify(self, device_id: str, assignment_id: str) -> None:
        with self._lock:
            self.sent.append((device_id, assignment_id))

    def take(self) -> list[tuple[str, str]]:
        with self._lock:
            out, self.sent = self.sent, []
        return out


@pytest.fixture
def watched(tmp_path: Path, db_url: str, bundle_sim: BundleSim) -> Iterator[tuple[Fleet, Recorder]]:
    settings = signed_settings(tmp_path, db_url, bundle_sim, run_scheduler=False)
    recorder = Recorder()
    with TestClient(create_app(settings, notifier=recorder)) as client:
        yield Fleet(client=client, sim=bundle_sim, tmp=tmp_path), recorder


def _rollout(fleet: Fleet, bundle: dict[str, str], stages: list[int], **extra: object) -> dict:
    body = {
        "name": f"v{bundle['version']}",
        "bundle_id": bundle["id"],
        "group": "all",
        "stages": [{"percent": p, "min_devices": 1, "soak_seconds": 0} for p in stages],
        "gates": [],
        "start": True,
        **extra,
    }
    r = fleet.client.post("/api/v1/rollouts", headers=fleet.admin, json=body)
    assert r.status_code == 201, r.text
    return dict(r.json())


def test_a_rollout_start_wakes_only_devices_whose_bundle_changes(
    watched: tuple[Fleet, Recorder],
) -> None:
    fleet, recorder = watched
    creds = {d: fleet.enroll(d) for d in DEVICES}
    v1 = fleet.upload_bundle(version=1, seed=1)
    v2 = fleet.upload_bundle(version=2, seed=2)
    g = fleet.client.post("/api/v1/groups", headers=fleet.admin, json={"name": "all"})
    assert g.status_code == 201, g.text

    _rollout(fleet, v1, [100], strategy="all_at_once")
    assert sorted(d for d, _ in recorder.take()) == DEVICES  # everyone gets v1
    etags = {
        d: fleet.client.get("/device/v1/assignment", headers=creds[d]).headers["etag"]
        for d in DEVICES
    }

    r2 = _rollout(fleet, v2, [50, 100], strategy="staged_canary", previous_bundle_id=v1["id"])
    canaries = sorted(d for d in DEVICES if bucket(r2["id"], d) < 0.5)
    assert 0 < len(canaries) < len(DEVICES)
    woken = recorder.take()
    assert sorted(d for d, _ in woken) == canaries
    for d in DEVICES:
        got = fleet.client.get("/device/v1/assignment", headers=creds[d])
        doc = got.json()
        # every device's document changed (the new rollout id tags its telemetry) ...
        assert got.headers["etag"] != etags[d] and doc["rollout_id"] == r2["id"], d
        want = v2 if d in canaries else v1
        assert doc["desired"]["bundle_id"] == want["id"], d
    # ... and the canaries were told the very document they now read
    for d, assignment_id in woken:
        assert assignment_id == etags_now(fleet, creds[d])

    # promoting to 100 %: the controls move to v2 and are woken; nobody twice
    p = fleet.client.post(
        f"/api/v1/rollouts/{r2['id']}/promote", headers=fleet.admin, json={"to_end": True}
    )
    assert p.status_code == 200, p.text
    assert sorted(d for d, _ in recorder.take()) == sorted(set(DEVICES) - set(canaries))


def etags_now(fleet: Fleet, creds: dict[str, str]) -> str:
    r = fleet.client.get("/device/v1/assignment", headers=creds)
    return str(r.headers["etag"]).strip('"')
