"""Migration: a device provisioned with today's trust store (no Uptane roots) moves to the
chain in one step the operator signs with today's release key, against a real server; a
migration not signed under the device's trust store is refused and reported."""

from __future__ import annotations

from click.testing import CliRunner

from converters.keys import KeyStore
from device_agent.bundle import TrustStore
from device_agent.config import AgentConfig
from device_agent.daemon import AgentDaemon
from device_agent.uptane.fetcher import UptaneFetcher
from fleet_server.cli import main as cli
from tests.bundlesim import BundleSim
from tests.e2e.test_uptane_compromise import CLASS, Clock, World, enroll, health, serving, world
from tests.trustsim import release as build

__all__ = ["world"]  # the fixture


def legacy_agent(w: World, device_id: str, credential: str, trust: TrustStore) -> AgentDaemon:
    trust_path = w.tmp / f"{device_id}-trust.json"
    trust.save(trust_path)
    cred = w.tmp / f"{device_id}.cred"
    cred.write_text(credential)
    cfg = AgentConfig.from_dict(
        {
            "device": {
                "id": device_id,
                "device_class": CLASS,
                "state_dir": str(w.tmp / f"{device_id}-state"),
                "trust_store": str(trust_path),
            },
            "server": {"url": w.server.url, "token_file": str(cred)},
            "update": {"probation_seconds": 0.0},
            "serving": {"enabled": False},
            "uptane": {"migrate": True, "stale_after_seconds": 3600.0},
        }
    )
    d = AgentDaemon(cfg, clock=Clock())
    d.updater.boot()
    return d


def close(d: AgentDaemon) -> None:
    d.agent.close()
    d.store.close()
    d.updater.unlock()


def test_a_device_on_todays_trust_store_moves_to_the_chain_in_one_signed_step(
    world: World, sim: BundleSim
) -> None:
    w = world
    legacy_keys = w.tmp / "legacy-keys"
    KeyStore(legacy_keys).generate("legacy-release")
    trust = TrustStore.load(w.tmp / "trust.json")
    trust.add(KeyStore(legacy_keys).public_key("legacy-release"), comment="legacy-release")
    v1, v2, v3 = (build(sim, version=v, seed=v, classes=(CLASS,)) for v in (1, 2, 3))
    b1, b2, b3 = w.upload(v1), w.upload(v2), w.upload(v3)
    cred = enroll(w, "dev-1")
    d = legacy_agent(w, "dev-1", cred, trust)
    try:
        w.assign("dev-1", b1["id"])
        d.updater.check()  # today's path: no migration published yet
        assert serving(d) == ("tiny", 1)
        assert not isinstance(d.updater.fetcher, UptaneFetcher)

        # a migration signed by a key the device does not trust: refused and reported
        KeyStore(w.tmp / "rogue").generate("rogue")
        r = CliRunner().invoke(
            cli,
            [
                "release",
                "migration",
                "--uptane-dir",
                str(w.uptane_dir),
                "--key",
                "rogue",
                "--keys-dir",
                str(w.tmp / "rogue"),
            ],
        )
        assert r.exit_code == 0, r.output
        d.updater.check()
        assert health(w, "dev-1")["health_code"] == "migration_refused"
        assert not isinstance(d.updater.fetcher, UptaneFetcher)
        assert serving(d) == ("tiny", 1)

        # the operator signs the migration with today's release key
        r = CliRunner().invoke(
            cli,
            [
                "release",
                "migration",
                "--uptane-dir",
                str(w.uptane_dir),
                "--key",
                "legacy-release",
                "--keys-dir",
                str(legacy_keys),
            ],
        )
        assert r.exit_code == 0, r.output
        w.release(v2)
        w.assign("dev-1", b2["id"])
        d.updater.check()
        assert isinstance(d.updater.fetcher, UptaneFetcher)
        assert serving(d) == ("tiny", 2)
    finally:
        close(d)

    # after a restart the device stays on the chain: an unreleased bundle is refused
    d = legacy_agent(w, "dev-1", cred, trust)
    try:
        assert isinstance(d.updater.fetcher, UptaneFetcher)
        w.assign("dev-1", b3["id"])
        d.updater.check()
        assert health(w, "dev-1")["health_code"] == "not_released"
        assert serving(d) == ("tiny", 2)
    finally:
        close(d)
