"""The central property, end to end with a real server process and a real agent:

an attacker holding the server's database, all of its online keys (image snapshot and
timestamp, director) and an admin token cannot make the device run a bundle the release
keys did not sign, cannot move it to another model name or device class, and cannot hold
it on old metadata without the device reporting ``stale_metadata``.

Releasing goes the operator's way: ``edgefleet release fetch / add / sign (2 of 3) /
upload`` with the offline keys, which the attacker does not have.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from click.testing import CliRunner
from tuf.api.metadata import Metadata, Targets

from converters.keys import KeyStore
from device_agent.config import AgentConfig
from device_agent.daemon import AgentDaemon
from fleet_server.cli import main as cli
from fleet_server.registry.tufrepo import release_target, signer_for
from fleet_server.registry.uptane import IMAGE_ONLINE, init_uptane
from tests.bundlesim import BundleSim, tiny_onnx_model
from tests.httpfixtures import SMOKE_INPUT, reference_outputs
from tests.server_fixtures import ADMIN_TOKEN, LiveServer, server_keys, start_server, stop_server
from tests.trustsim import FreezingProxy
from tests.trustsim import release as build

CLASS = "x86_64-gateway"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


class Clock:
    def __init__(self) -> None:
        self.t = datetime.now(timezone.utc).timestamp()

    def __call__(self) -> float:
        return self.t


@dataclass
class World:
    server: LiveServer
    db: Path
    uptane_dir: Path
    offline: Path
    sim: BundleSim
    tmp: Path

    def api(self, method: str, path: str, **kw: Any) -> httpx.Response:
        return httpx.request(method, self.server.url + path, headers=ADMIN, timeout=60, **kw)

    def upload(self, bundle: Path) -> dict[str, Any]:
        with open(bundle, "rb") as f:
            r = self.api("POST", "/api/v1/bundles", files={"file": (bundle.name, f)})
        assert r.status_code == 201, r.text
        return dict(r.json())

    def release(self, bundle: Path, counter: int | None = None) -> None:
        """The operator's release, with two of the three offline release keys."""
        t = self.tmp / "targets.json"
        env = {"EDGEFLEET_SERVER_URL": self.server.url, "EDGEFLEET_TOKEN": ADMIN_TOKEN}
        run = CliRunner().invoke
        steps: list[list[str]] = [
            ["release", "fetch", str(t)],
            ["release", "add", str(bundle), "--targets", str(t)]
            + ([] if counter is None else ["--counter", str(counter)]),
            ["release", "sign", str(t), "--key", "release1", "--keys-dir", str(self.offline)],
            ["release", "sign", str(t), "--key", "release3", "--keys-dir", str(self.offline)],
            ["release", "upload", str(t)],
        ]
        for args in steps:
            r = run(cli, args, env=env)
            assert r.exit_code == 0, (args, r.output)

    def assign(self, device_id: str, bundle_id: str) -> None:
        r = self.api(
            "PUT",
            f"/api/v1/devices/{device_id}/assignment",
            json={"desired_bundle_id": bundle_id},
        )
        assert r.status_code == 200, r.text

    def sql(self, statement: str, *args: Any) -> None:
        """The attacker writes the server's database directly."""
        with sqlite3.connect(self.db) as c:
            c.execute(statement, args)


@pytest.fixture
def world(tmp_path: Path, sim: BundleSim) -> Iterator[World]:
    offline, uptane_dir = tmp_path / "offline-keys", tmp_path / "uptane"
    init_uptane(operator_keys=offline, uptane_dir=uptane_dir, release_keys=3, threshold=2)
    keys_dir, kid, trust_path = server_keys(tmp_path, sim)
    db = tmp_path / "server.db"
    server = start_server(
        {
            "database_url": f"sqlite:///{db}",
            "bundle_dir": str(tmp_path / "bundles"),
            "admin_bootstrap_token": ADMIN_TOKEN,
            "trust_store": str(trust_path),
            "signing_key_dir": str(keys_dir),
            "signing_key": kid,
            "uptane_dir": str(uptane_dir),
        },
        tmp_path / "server.log",
    )
    try:
        yield World(server, db, uptane_dir, offline, sim, tmp_path)
    finally:
        stop_server(server.proc)


def enroll(w: World, device_id: str) -> str:
    r = w.api("POST", "/api/v1/enrollment-tokens", json={})
    assert r.status_code == 201, r.text
    e = httpx.post(
        w.server.url + "/device/v1/enroll",
        json={
            "enrollment_token": r.json()["token"],
            "device_id": device_id,
            "device_class": CLASS,
            "labels": {},
        },
    )
    assert e.status_code == 201, e.text
    return str(e.json()["credential"])


def agent(w: World, device_id: str, credential: str, clock: Clock) -> AgentDaemon:
    trust = w.tmp / f"{device_id}-trust.json"
    # the bundle trust store as today's devices have it: release key and the server's key
    # (defence in depth only; the Uptane chain decides what is installable)
    from device_agent.bundle import TrustStore

    TrustStore.load(w.tmp / "trust.json").save(trust)
    cred = w.tmp / f"{device_id}.cred"
    cred.write_text(credential)
    roots = w.uptane_dir / "device-roots"
    cfg = AgentConfig.from_dict(
        {
            "device": {
                "id": device_id,
                "device_class": CLASS,
                "state_dir": str(w.tmp / f"{device_id}-state"),
                "trust_store": str(trust),
            },
            "server": {"url": w.server.url, "token_file": str(cred)},
            "update": {"probation_seconds": 0.0},
            "serving": {"enabled": False},
            "uptane": {
                "enabled": True,
                "image_root": str(roots / "image-root.json"),
                "director_root": str(roots / "director-root.json"),
                "stale_after_seconds": 3600.0,
            },
        }
    )
    d = AgentDaemon(cfg, clock=clock)
    d.updater.boot()
    return d


def health(w: World, device_id: str) -> dict[str, Any]:
    r = w.api("GET", f"/api/v1/devices/{device_id}")
    assert r.status_code == 200, r.text
    return dict(r.json())


def serving(d: AgentDaemon) -> tuple[str, int] | None:
    p = d.updater.slots.active()
    return None if p is None else (p.name, p.version)


def test_server_database_online_keys_and_admin_token_cannot_make_a_device_run_anything(
    world: World, sim: BundleSim
) -> None:
    w = world
    clock = Clock()
    v1 = build(sim, version=1, seed=1, classes=(CLASS,))
    b1 = w.upload(v1)
    w.release(v1)
    cred = enroll(w, "dev-1")
    d = agent(w, "dev-1", cred, clock)
    try:
        w.assign("dev-1", b1["id"])
        d.updater.check()
        assert serving(d) == ("tiny", 1)

        def still_v1() -> None:
            assert serving(d) == ("tiny", 1)
            out = np.asarray(d.agent.predict(SMOKE_INPUT)[0])
            assert np.allclose(out, reference_outputs(1), atol=1e-6)

        def last_code() -> str:
            return str(health(w, "dev-1").get("health_code"))

        # 1. an admin builds a model on the server (signed by the server's key) and assigns
        #    it: the director signs the instruction, the release keys never released it
        src = w.tmp / "evil.onnx"
        src.write_bytes(tiny_onnx_model(seed=66))
        with open(src, "rb") as f:
            r = w.api(
                "POST",
                "/api/v1/models/tiny/sources",
                files={"file": ("evil.onnx", f)},
                data={"version": "99", "target": [f"onnx:float32={CLASS}"]},
            )
        assert r.status_code == 201, r.text
        evil = r.json()["results"][0]["bundle"]
        w.assign("dev-1", evil["id"])
        d.updater.check()
        assert last_code() == "not_released"
        still_v1()

        # 2. with the image repository's online key, write a targets.json releasing it
        md: Metadata[Targets] = Metadata.from_bytes(
            (w.uptane_dir / "image" / "targets.json").read_bytes()
        )
        t = release_target(
            name="tiny",
            version=99,
            sha256=evil["sha256"],
            length=evil["size"],
            release_counter=99,
            device_classes=[CLASS],
        )
        md.signed.targets[t.path] = t
        md.signed.version += 1
        md.sign(signer_for(KeyStore(w.uptane_dir / "keys").private_key(IMAGE_ONLINE)))
        good_targets = (w.uptane_dir / "image" / "targets.json").read_bytes()
        (w.uptane_dir / "image" / "targets.json").write_bytes(md.to_bytes())
        d.updater.check()
        assert last_code() == "metadata_refused"
        still_v1()
        (w.uptane_dir / "image" / "targets.json").write_bytes(good_targets)

        # 3. another model, genuinely released for this class: the database assigns it
        other = build(sim, name="other", version=5, seed=5, classes=(CLASS,))
        bo = w.upload(other)
        w.release(other)
        w.assign("dev-1", bo["id"])
        d.updater.check()
        assert last_code() == "wrong_model"
        still_v1()

        # 4. the database says the device is of another class, and assigns that class's
        #    genuine release
        board = build(sim, version=3, seed=3, classes=("aarch64-board",))
        bb = w.upload(board)
        w.release(board)
        w.sql("UPDATE devices SET device_class = 'aarch64-board' WHERE id = 'dev-1'")
        w.assign("dev-1", bb["id"])
        d.updater.check()
        assert last_code() == "wrong_device_class"
        still_v1()
        w.sql(f"UPDATE devices SET device_class = '{CLASS}' WHERE id = 'dev-1'")

        # 5. freeze: the attacker, on the wire, withholds the director's timestamp (the
        #    device's reports still get through); within the period the device says the
        #    metadata is unavailable, past it stale_metadata, which the device list shows
        w.assign("dev-1", b1["id"])
        proxy = FreezingProxy(w.server.url, withhold={"/director/timestamp.json"}).start()
        try:
            d.fetcher.base_url = proxy.url + "/"  # type: ignore[union-attr]
            v2 = build(sim, version=2, seed=2, classes=(CLASS,))
            b2 = w.upload(v2)
            w.release(v2)
            w.assign("dev-1", b2["id"])
            d.updater.check()
            assert last_code() == "metadata_unavailable"
            clock.t += 2 * 3600
            d.updater.check()
            assert last_code() == "stale_metadata"
            assert health(w, "dev-1")["health"] == "degraded"
            still_v1()
        finally:
            proxy.stop()
    finally:
        d.agent.close()
        d.store.close()
        d.updater.unlock()


def test_rollback_to_the_previous_release_signs_nothing_new(world: World, sim: BundleSim) -> None:
    w = world
    clock = Clock()
    v1, v2 = (build(sim, version=v, seed=v, classes=(CLASS,)) for v in (1, 2))
    b1, b2 = w.upload(v1), w.upload(v2)
    w.release(v1)
    w.release(v2, counter=1)
    d = agent(w, "dev-1", enroll(w, "dev-1"), clock)
    try:
        w.assign("dev-1", b2["id"])
        d.updater.check()
        assert serving(d) == ("tiny", 2)
        image_targets = (w.uptane_dir / "image" / "targets.json").read_bytes()
        w.assign("dev-1", b1["id"])
        d.updater.check()
        assert serving(d) == ("tiny", 1)
        out = np.asarray(d.agent.predict(SMOKE_INPUT)[0])
        assert np.allclose(out, reference_outputs(1), atol=1e-6)
        assert (w.uptane_dir / "image" / "targets.json").read_bytes() == image_targets
    finally:
        d.agent.close()
        d.store.close()
        d.updater.unlock()


def test_staged_rollout_rolled_back_returns_to_the_previous_release_signing_nothing(
    world: World, sim: BundleSim
) -> None:
    """The rollout engine's rollback names the previous release again; no bundle is
    re-published, no key signs anything, and the device goes back to v1."""
    w = world
    clock = Clock()
    v1, v2 = (build(sim, version=v, seed=v, classes=(CLASS,)) for v in (1, 2))
    b1, b2 = w.upload(v1), w.upload(v2)
    w.release(v1)
    w.release(v2, counter=1)
    d = agent(w, "dev-1", enroll(w, "dev-1"), clock)
    try:
        w.assign("dev-1", b1["id"])
        d.updater.check()
        assert serving(d) == ("tiny", 1)
        group = w.api("POST", "/api/v1/groups", json={"name": "gw", "device_class": CLASS})
        assert group.status_code == 201, group.text
        r = w.api(
            "POST",
            "/api/v1/rollouts",
            json={
                "name": "v2",
                "bundle_id": b2["id"],
                "group": group.json()["id"],
                "previous_bundle_id": b1["id"],
                "stages": [{"percent": 100, "min_devices": 1, "soak_seconds": 3600}],
                "gates": [],
                "start": True,
            },
        )
        assert r.status_code == 201, r.text
        rid = r.json()["id"]
        d.updater.check()
        assert serving(d) == ("tiny", 2)
        bundles_before = {b["id"] for b in w.api("GET", "/api/v1/bundles").json()["items"]}
        targets_before = (w.uptane_dir / "image" / "targets.json").read_bytes()
        rb = w.api("POST", f"/api/v1/rollouts/{rid}/rollback", json={"reason": "test"})
        assert rb.status_code == 200, rb.text
        assert rb.json()["status"] == "rolled_back", rb.json()
        d.updater.check()
        assert serving(d) == ("tiny", 1)
        out = np.asarray(d.agent.predict(SMOKE_INPUT)[0])
        assert np.allclose(out, reference_outputs(1), atol=1e-6)
        after = {b["id"] for b in w.api("GET", "/api/v1/bundles").json()["items"]}
        assert after == bundles_before  # nothing re-published
        assert (w.uptane_dir / "image" / "targets.json").read_bytes() == targets_before
    finally:
        d.agent.close()
        d.store.close()
        d.updater.unlock()
