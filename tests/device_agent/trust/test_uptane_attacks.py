"""TUF's and Uptane's attacks against a real agent (AgentDaemon with ``[uptane] enabled``,
real onnxruntime and slots) checking in with a repository simulator over real HTTP.

Each attack is refused with its code, reported to the server, and the model the device
serves is unchanged."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tuf.api.metadata import Metadata, Timestamp

from device_agent.config import AgentConfig
from device_agent.daemon import AgentDaemon
from fleet_server.registry.tufrepo import TufRepoError, signer_for
from tests.bundlesim import BundleSim
from tests.httpfixtures import SMOKE_INPUT, reference_outputs
from tests.trustsim import release as build
from tests.uptanesim import Released, UptaneSim

CLASS = "x86_64-gateway"
CRED = "efd_dev-one-" + "c" * 24


class Clock:
    def __init__(self) -> None:
        self.t = datetime.now(timezone.utc).timestamp()

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


@pytest.fixture
def usim(tmp_path: Path) -> Iterator[UptaneSim]:
    s = UptaneSim(tmp_path / "uptane").setup().start()
    s.devices[CRED] = ("dev-1", CLASS)
    yield s
    s.stop()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def v1(usim: UptaneSim, sim: BundleSim) -> Released:
    return usim.release(
        build(sim, version=1, seed=1, classes=(CLASS,)), name="tiny", version=1, classes=(CLASS,)
    )


def make_daemon(
    tmp_path: Path,
    sim: BundleSim,
    usim: UptaneSim,
    clock: Clock,
    *,
    update: dict[str, Any] | None = None,
    uptane: dict[str, Any] | None = None,
    device: dict[str, Any] | None = None,
) -> AgentDaemon:
    """A gateway on the chain against ``usim``; ``update``/``uptane``/``device`` override
    settings."""
    trust = tmp_path / "trust.json"
    sim.trust("release").save(trust)
    cred = tmp_path / "cred"
    cred.write_text(CRED)
    cfg = AgentConfig.from_dict(
        {
            "device": {
                "id": "dev-1",
                "device_class": CLASS,
                "state_dir": str(tmp_path / "state"),
                "trust_store": str(trust),
                **(device or {}),
            },
            "server": {"url": usim.url, "token_file": str(cred)},
            "update": {"probation_seconds": 0.0, **(update or {})},
            "uptane": {
                "enabled": True,
                "image_root": str(usim.image_root_file),
                "director_root": str(usim.director_root_file),
                "stale_after_seconds": 3600.0,
                **(uptane or {}),
            },
        }
    )
    cfg.validate()
    return AgentDaemon(cfg, clock=clock)


@pytest.fixture
def daemon(
    tmp_path: Path, sim: BundleSim, usim: UptaneSim, clock: Clock, v1: Released
) -> Iterator[AgentDaemon]:
    """A gateway that installed ``tiny`` v1 as the director instructed."""
    d = make_daemon(tmp_path, sim, usim, clock)
    d.updater.boot()
    usim.direct_release("dev-1", v1)
    d.updater.check()
    assert usim.reports and usim.reports[-1]["outcome"] == "installed", usim.reports
    yield d
    close(d)


def close(d: AgentDaemon) -> None:
    """Stop a daemon made by :func:`make_daemon` (model, store, update lock)."""
    d.agent.close()
    d.store.close()
    d.updater.unlock()


@pytest.fixture
def v2(usim: UptaneSim, sim: BundleSim) -> Released:
    """``tiny`` v2 released with v1's counter: the release keys have not retired v1, so
    the director may send a device back to it."""
    return usim.release(
        build(sim, version=2, seed=2, classes=(CLASS,)),
        name="tiny",
        version=2,
        classes=(CLASS,),
        counter=1,
    )


def serving(d: AgentDaemon) -> tuple[str, int]:
    p = d.updater.slots.active()
    assert p is not None
    return p.name, p.version


def assert_serving(d: AgentDaemon, version: int, seed: int) -> None:
    assert serving(d) == ("tiny", version)
    out = np.asarray(d.agent.predict(SMOKE_INPUT)[0])
    assert np.allclose(out, reference_outputs(seed), atol=1e-6)


def refused_with(usim: UptaneSim, code: str) -> dict[str, Any]:
    codes = [r.get("error_code") for r in usim.reports]
    assert code in codes, codes
    return next(r for r in reversed(usim.reports) if r.get("error_code") == code)


# -- the chain works -----------------------------------------------------------------------


def test_released_and_directed_bundle_installs(daemon: AgentDaemon) -> None:
    assert_serving(daemon, 1, 1)


def test_rollback_is_a_director_instruction_without_any_new_signature(
    daemon: AgentDaemon, usim: UptaneSim, v1: Released, v2: Released
) -> None:
    usim.direct_release("dev-1", v2)
    daemon.updater.check()
    assert_serving(daemon, 2, 2)
    targets_before = usim.image.file("targets.json")
    usim.direct_release("dev-1", v1)  # back to v1: no key signs anything new
    daemon.updater.check()
    assert_serving(daemon, 1, 1)
    assert usim.image.file("targets.json") == targets_before


# -- TUF's attacks -------------------------------------------------------------------------


def test_arbitrary_installation_of_an_unreleased_bundle_is_refused_not_released(
    daemon: AgentDaemon, usim: UptaneSim, sim: BundleSim
) -> None:
    """The director (online key) names a bundle whose manifest is validly signed but which
    the release keys never released."""
    sha, n = usim.serve_bundle(build(sim, version=5, seed=5, classes=(CLASS,)))
    usim.direct("dev-1", ("tiny", sha, n, "desired"))
    daemon.updater.check()
    refused_with(usim, "not_released")
    assert_serving(daemon, 1, 1)


def test_extraneous_target_beside_a_released_one_is_refused(
    daemon: AgentDaemon, usim: UptaneSim, sim: BundleSim, v1: Released
) -> None:
    sha, n = usim.serve_bundle(build(sim, version=6, seed=6, classes=(CLASS,)))
    usim.direct("dev-1", ("tiny", v1.sha256, v1.length, "desired"), ("tiny", sha, n, "shadow"))
    daemon.updater.check()
    refused_with(usim, "not_released")
    assert_serving(daemon, 1, 1)


def test_director_and_image_disagreeing_on_length_is_refused(
    daemon: AgentDaemon, usim: UptaneSim, sim: BundleSim
) -> None:
    v2 = usim.release(
        build(sim, version=2, seed=2, classes=(CLASS,)), name="tiny", version=2, classes=(CLASS,)
    )
    usim.direct("dev-1", ("tiny", v2.sha256, v2.length + 1, "desired"))
    daemon.updater.check()
    refused_with(usim, "director_image_mismatch")
    assert_serving(daemon, 1, 1)


def test_endless_data_in_metadata_is_cut_off(daemon: AgentDaemon, usim: UptaneSim) -> None:
    usim.override[("director", "timestamp.json")] = b"{" + b" " * (4 * 1024 * 1024)
    daemon.updater.check()
    refused_with(usim, "metadata_unavailable")
    assert_serving(daemon, 1, 1)


def test_fast_forward_with_a_forged_timestamp_is_refused_and_does_not_lock_out(
    daemon: AgentDaemon, usim: UptaneSim, sim: BundleSim
) -> None:
    served = usim.served[("director", "dev-1", "timestamp.json")]
    forged: Metadata[Timestamp] = Metadata.from_bytes(served)
    forged.signed.version = 2**40
    forged.sign(signer_for(usim.key("attacker")))
    usim.override[("director", "timestamp.json")] = forged.to_bytes()
    daemon.updater.check()
    refused_with(usim, "metadata_refused")
    del usim.override[("director", "timestamp.json")]
    v2 = usim.release(
        build(sim, version=2, seed=2, classes=(CLASS,)), name="tiny", version=2, classes=(CLASS,)
    )
    usim.direct_release("dev-1", v2)
    daemon.updater.check()
    assert_serving(daemon, 2, 2)


def test_indefinite_freeze_is_reported_stale_metadata(
    daemon: AgentDaemon, usim: UptaneSim, clock: Clock
) -> None:
    usim.withheld.add(("director", "timestamp.json"))
    daemon.updater.check()
    assert "stale_metadata" not in [r.get("error_code") for r in usim.reports]
    refused_with(usim, "metadata_unavailable")
    clock.advance(2 * 3600)
    daemon.updater.check()
    refused_with(usim, "stale_metadata")
    assert_serving(daemon, 1, 1)


def test_expired_director_instruction_is_never_acted_on(
    daemon: AgentDaemon, usim: UptaneSim, sim: BundleSim, clock: Clock
) -> None:
    """The server (or a replayer) keeps serving director metadata signed two days ago."""
    v2 = usim.release(
        build(sim, version=2, seed=2, classes=(CLASS,)), name="tiny", version=2, classes=(CLASS,)
    )
    usim.now = datetime.now(timezone.utc)
    usim.direct_release("dev-1", v2)
    for name in ("timestamp.json", "snapshot.json", "targets.json"):
        usim.override[("director", name)] = usim.director.file(
            name,
            device_id="dev-1",
            device_class=CLASS,
            instructions=usim.instructions["dev-1"],
            now=usim.now,
        )  # type: ignore[assignment]
    clock.advance(2 * 86400)
    daemon.updater.check()
    refused_with(usim, "stale_metadata")
    assert_serving(daemon, 1, 1)


def test_mix_and_match_of_metadata_versions_is_refused(
    daemon: AgentDaemon, usim: UptaneSim, sim: BundleSim
) -> None:
    old_targets = usim.image.file("targets.json")
    assert old_targets is not None
    usim.release(
        build(sim, version=2, seed=2, classes=(CLASS,)), name="tiny", version=2, classes=(CLASS,)
    )
    v3 = usim.release(
        build(sim, version=3, seed=3, classes=(CLASS,)), name="tiny", version=3, classes=(CLASS,)
    )
    usim.override[("image", "targets.json")] = old_targets  # with the new snapshot
    usim.direct_release("dev-1", v3)
    daemon.updater.check()
    refused_with(usim, "metadata_refused")
    assert_serving(daemon, 1, 1)


def test_rollback_attack_replaying_older_metadata_is_refused(
    daemon: AgentDaemon, usim: UptaneSim, sim: BundleSim
) -> None:
    old = {n: usim.served[("director", "dev-1", n)] for n in ("timestamp.json",)}
    v2 = usim.release(
        build(sim, version=2, seed=2, classes=(CLASS,)), name="tiny", version=2, classes=(CLASS,)
    )
    usim.direct_release("dev-1", v2)
    daemon.updater.check()
    assert_serving(daemon, 2, 2)
    usim.override[("director", "timestamp.json")] = old["timestamp.json"]
    daemon.updater.check()
    refused_with(usim, "metadata_refused")
    assert_serving(daemon, 2, 2)


def test_rollback_below_the_release_counter_floor_is_refused(
    daemon: AgentDaemon, usim: UptaneSim, sim: BundleSim, v1: Released
) -> None:
    v2 = usim.release(
        build(sim, version=2, seed=2, classes=(CLASS,)),
        name="tiny",
        version=2,
        counter=2,
        classes=(CLASS,),
    )
    usim.direct_release("dev-1", v2)
    daemon.updater.check()
    assert_serving(daemon, 2, 2)
    usim.direct_release("dev-1", v1)  # counter 1: the release keys retired it
    daemon.updater.check()
    refused_with(usim, "rollback")
    assert_serving(daemon, 2, 2)


def test_key_compromise_below_the_release_threshold_is_refused(
    daemon: AgentDaemon, usim: UptaneSim, sim: BundleSim
) -> None:
    """One release key (of a 2-of-3 threshold) signs a targets file on the wire."""
    bundle = build(sim, version=7, seed=7, classes=(CLASS,))
    sha, n = usim.serve_bundle(bundle)
    md = usim.image.targets()
    from fleet_server.registry.tufrepo import release_target

    t = release_target(
        name="tiny", version=7, sha256=sha, length=n, release_counter=7, device_classes=[CLASS]
    )
    md.signed.targets[t.path] = t
    md.signed.version += 1
    md.signatures.clear()
    md.sign(signer_for(usim.key("release1")))
    with pytest.raises(TufRepoError):
        usim.image.put_targets(md.to_bytes())  # the server refuses it too
    usim.forge_image(md)
    usim.direct("dev-1", ("tiny", sha, n, "desired"))
    daemon.updater.check()
    refused_with(usim, "metadata_refused")
    assert_serving(daemon, 1, 1)


def test_wrong_software_of_another_model_name_is_refused(
    daemon: AgentDaemon, usim: UptaneSim, sim: BundleSim
) -> None:
    other = usim.release(
        build(sim, name="other", version=9, seed=9, classes=(CLASS,)),
        name="other",
        version=9,
        classes=(CLASS,),
    )
    usim.direct_release("dev-1", other)
    daemon.updater.check()
    refused_with(usim, "wrong_model")
    assert_serving(daemon, 1, 1)


def test_wrong_software_for_another_device_class_is_refused(
    daemon: AgentDaemon, usim: UptaneSim, sim: BundleSim
) -> None:
    board = usim.release(
        build(sim, version=2, seed=2, classes=("aarch64-board",)),
        name="tiny",
        version=2,
        classes=("aarch64-board",),
    )
    usim.direct_release("dev-1", board)
    daemon.updater.check()
    refused_with(usim, "wrong_device_class")
    assert_serving(daemon, 1, 1)


# -- Uptane's compromise cases ---------------------------------------------------------------


def test_image_repository_online_key_alone_cannot_release(
    daemon: AgentDaemon, usim: UptaneSim, sim: BundleSim
) -> None:
    """The server's image online key (snapshot/timestamp) signs a targets file."""
    sha, n = usim.serve_bundle(build(sim, version=8, seed=8, classes=(CLASS,)))
    md = usim.image.targets()
    from fleet_server.registry.tufrepo import release_target

    t = release_target(
        name="tiny", version=8, sha256=sha, length=n, release_counter=8, device_classes=[CLASS]
    )
    md.signed.targets[t.path] = t
    md.signed.version += 1
    md.sign(signer_for(usim.key("image-online")))
    with pytest.raises(TufRepoError):
        usim.image.put_targets(md.to_bytes())
    usim.forge_image(md)
    usim.direct("dev-1", ("tiny", sha, n, "desired"))
    daemon.updater.check()
    refused_with(usim, "metadata_refused")
    assert_serving(daemon, 1, 1)


def test_one_devices_instructions_replayed_to_another_are_refused(
    daemon: AgentDaemon, usim: UptaneSim, sim: BundleSim
) -> None:
    v2 = usim.release(
        build(sim, version=2, seed=2, classes=(CLASS,)), name="tiny", version=2, classes=(CLASS,)
    )
    usim.direct_release("dev-2", v2)
    for name in ("timestamp.json", "snapshot.json", "targets.json"):
        data = usim.director.file(
            name, device_id="dev-2", device_class=CLASS, instructions=usim.instructions["dev-2"]
        )
        assert data is not None
        usim.override[("director", name)] = data
    daemon.updater.check()
    refused_with(usim, "wrong_device")
    assert_serving(daemon, 1, 1)


def test_director_key_alone_cannot_move_a_device_to_another_model(
    daemon: AgentDaemon, usim: UptaneSim, sim: BundleSim
) -> None:
    """Director compromised: it names a released bundle of another model for this class."""
    other = usim.release(
        build(sim, name="other", version=1, seed=4, classes=(CLASS,)),
        name="other",
        version=1,
        classes=(CLASS,),
    )
    usim.direct("dev-1", ("tiny", other.sha256, other.length, "desired"))
    daemon.updater.check()
    refused_with(usim, "not_released")  # path names another model: no such release of tiny
    assert_serving(daemon, 1, 1)


def test_freeze_reported_then_fresh_metadata_reports_health_ok(
    daemon: AgentDaemon, usim: UptaneSim, clock: Clock
) -> None:
    usim.withheld.add(("director", "timestamp.json"))
    clock.advance(2 * 3600)
    daemon.updater.check()
    refused_with(usim, "stale_metadata")
    usim.withheld.clear()
    daemon.updater.check()
    last = usim.reports[-1]
    assert (last["type"], last["health"], last["error_code"]) == ("health", "ok", None)
    assert_serving(daemon, 1, 1)


def test_freeze_then_recovery_installs_again(
    daemon: AgentDaemon, usim: UptaneSim, sim: BundleSim, clock: Clock
) -> None:
    usim.withheld.add(("image", "timestamp.json"))
    clock.advance(2 * 3600)
    daemon.updater.check()
    refused_with(usim, "stale_metadata")
    usim.withheld.clear()
    v2 = usim.release(
        build(sim, version=2, seed=2, classes=(CLASS,)), name="tiny", version=2, classes=(CLASS,)
    )
    usim.direct_release("dev-1", v2)
    daemon.updater.check()
    assert_serving(daemon, 2, 2)


def test_root_rotation_revokes_a_release_key_over_the_air(
    daemon: AgentDaemon, usim: UptaneSim, sim: BundleSim
) -> None:
    """The image root (its own key) replaces release1 by release4; the device walks to
    root v2 at its next check; release1's signature no longer counts."""
    from fleet_server.registry.tufrepo import public_key, release_target

    md = usim.image.root()
    root = md.signed
    old = public_key(usim.key("release1"))
    root.revoke_key(old.keyid, "targets")
    root.add_key(public_key(usim.key("release4")), "targets")
    root.version += 1
    md.signatures.clear()
    md.sign(signer_for(usim.key("image-root")))
    usim.image.add_root(md)
    daemon.updater.check()  # picks up root v2
    assert (daemon.updater.state_dir / "uptane" / "image" / "root_history" / "2.root.json").exists()

    # a release signed by the revoked key and one other: refused on the wire
    bundle = build(sim, version=4, seed=4, classes=(CLASS,))
    sha, n = usim.serve_bundle(bundle)
    targets = usim.image.targets()
    t = release_target(
        name="tiny", version=4, sha256=sha, length=n, release_counter=4, device_classes=[CLASS]
    )
    targets.signed.targets[t.path] = t
    targets.signed.version += 1
    targets.signatures.clear()
    for k in ("release1", "release2"):
        targets.sign(signer_for(usim.key(k)), append=True)
    with pytest.raises(TufRepoError):
        usim.image.put_targets(targets.to_bytes())
    usim.forge_image(targets)
    usim.direct("dev-1", ("tiny", sha, n, "desired"))
    daemon.updater.check()
    refused_with(usim, "metadata_refused")
    assert_serving(daemon, 1, 1)

    # the same release signed by release2 and the new release4: installs
    usim.override.clear()
    usim.release(bundle, name="tiny", version=4, classes=(CLASS,), signers=("release2", "release4"))
    daemon.updater.check()
    assert_serving(daemon, 4, 4)
