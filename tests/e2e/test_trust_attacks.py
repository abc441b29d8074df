"""The reported trust findings, each as an attack on a real agent (AgentDaemon, real
onnxruntime, real slots) that checks in with a real HTTP server the attacker controls.

Each attack is refused with its code, reported to the server, and the model the device
serves is unchanged."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from device_agent.config import AgentConfig
from device_agent.daemon import AgentDaemon
from device_agent.protocol import ASSIGNMENT_PATH, REPORTS_PATH
from tests.bundlesim import BundleSim
from tests.httpfixtures import SMOKE_INPUT, BundleServer, reference_outputs
from tests.trustsim import AttackerServer, release

CREDENTIAL = "efd_device-credential-" + "s" * 20
DEVICE_CLASS = "x86_64-gateway"


@pytest.fixture
def server() -> Iterator[BundleServer]:
    srv = BundleServer().start()
    yield srv
    srv.stop()


@pytest.fixture
def attacker() -> Iterator[AttackerServer]:
    srv = AttackerServer(body=b"\0" * 1024).start()
    yield srv
    srv.stop()


@pytest.fixture
def daemon(tmp_path: Path, sim: BundleSim, server: BundleServer) -> Iterator[AgentDaemon]:
    """A gateway serving ``tiny`` v1 (seed 1), checking in with ``server``."""
    trust = tmp_path / "trust.json"
    sim.trust("release").save(trust)
    token = tmp_path / "credential"
    token.write_text(CREDENTIAL)
    cfg = AgentConfig.from_dict(
        {
            "device": {
                "id": "dev-1",
                "device_class": DEVICE_CLASS,
                "state_dir": str(tmp_path / "state"),
                "trust_store": str(trust),
            },
            "server": {"url": server.url, "token_file": str(token)},
            "update": {"probation_seconds": 0.0},
        }
    )
    d = AgentDaemon(cfg)
    d.updater.boot()
    d.updater.install_file(
        release(sim, version=1, seed=1, classes=(DEVICE_CLASS,)), probation=False
    )
    yield d
    d.agent.close()
    d.store.close()
    d.updater.unlock()


def serving(d: AgentDaemon) -> tuple[str, int]:
    active = d.updater.slots.active()
    assert active is not None
    return active.name, active.version


def assert_still_serving_v1(d: AgentDaemon) -> None:
    assert serving(d) == ("tiny", 1)
    out = np.asarray(d.agent.predict(SMOKE_INPUT)[0])
    assert np.allclose(out, reference_outputs(1), atol=1e-6)


def last_code(server: BundleServer) -> str | None:
    assert server.reports, "the device sent no report"
    code: str | None = server.reports[-1]["error_code"]
    return code


# -- finding 1: name, class and the floor ------------------------------------------------


def test_signed_bundle_of_another_model_name_is_refused_wrong_model(
    daemon: AgentDaemon, server: BundleServer, sim: BundleSim
) -> None:
    other = release(sim, name="totally-other-model", version=2, seed=2, classes=(DEVICE_CLASS,))
    server.offer(other, name="totally-other-model", version=2)
    daemon.updater.check()
    assert last_code(server) == "wrong_model"
    assert server.reports[-1]["outcome"] == "refused"
    assert_still_serving_v1(daemon)


def test_signed_bundle_for_another_device_class_is_refused_wrong_device_class(
    daemon: AgentDaemon, server: BundleServer, sim: BundleSim
) -> None:
    board_only = release(sim, version=2, seed=2, classes=("aarch64-board",))
    server.offer(board_only, version=2)
    daemon.updater.check()
    assert last_code(server) == "wrong_device_class"
    assert_still_serving_v1(daemon)


def test_huge_version_of_another_model_does_not_lock_out_genuine_updates(
    daemon: AgentDaemon, server: BundleServer, sim: BundleSim
) -> None:
    """The finding: a signed bundle numbered 1,000,000 locked the device out of ``tiny``
    v8. Floors are per model name, and the other name is refused anyway."""
    huge = release(sim, name="old-model", version=1_000_000, seed=3, classes=(DEVICE_CLASS,))
    server.offer(huge, name="old-model", version=1_000_000)
    daemon.updater.check()
    assert last_code(server) == "wrong_model"
    assert_still_serving_v1(daemon)

    genuine = release(sim, version=8, seed=8, classes=(DEVICE_CLASS,))
    server.offer(genuine, version=8)
    daemon.updater.check()
    assert server.reports[-1]["outcome"] == "installed", server.reports[-1]
    assert serving(daemon) == ("tiny", 8)
    out = np.asarray(daemon.agent.predict(SMOKE_INPUT)[0])
    assert np.allclose(out, reference_outputs(8), atol=1e-6)


def test_older_version_of_the_same_model_is_refused_rollback(
    daemon: AgentDaemon, server: BundleServer, sim: BundleSim
) -> None:
    daemon.updater.install_file(
        release(sim, version=5, seed=5, classes=(DEVICE_CLASS,)), probation=False
    )
    server.offer(release(sim, version=4, seed=4, classes=(DEVICE_CLASS,)), version=4)
    daemon.updater.check()
    assert last_code(server) == "rollback"
    assert serving(daemon) == ("tiny", 5)


# -- finding 5 (device part): different bytes under the installed version -------------------


def test_different_bytes_under_the_installed_version_are_refused_version_reused(
    daemon: AgentDaemon, server: BundleServer, sim: BundleSim
) -> None:
    imposter = release(sim, version=1, seed=6, classes=(DEVICE_CLASS,))
    server.offer(imposter, version=1)
    # the device already runs tiny v1, so the assignment alone would look "unchanged":
    # the attacker makes it differ by its digest, which the device must notice
    daemon.updater.check()
    if server.reports:
        assert last_code(server) == "version_reused"
    assert_still_serving_v1(daemon)
    # installing the file directly is refused too
    daemon.updater.install_file(imposter, probation=False)
    assert daemon.updater.reports[-1]["error_code"] == "version_reused"
    assert_still_serving_v1(daemon)


def test_the_same_bundle_reinstalled_is_not_a_version_reuse(
    daemon: AgentDaemon, sim: BundleSim
) -> None:
    same = release(sim, version=1, seed=1, classes=(DEVICE_CLASS,))
    daemon.updater.install_file(same, probation=False)
    assert not daemon.updater.reports or daemon.updater.reports[-1]["error_code"] is None
    assert_still_serving_v1(daemon)


# -- finding 2: the credential goes to the server's origin only ---------------------------


def test_absolute_url_to_another_origin_is_refused_and_gets_no_credential(
    daemon: AgentDaemon, server: BundleServer, sim: BundleSim, attacker: AttackerServer
) -> None:
    good = release(sim, version=2, seed=2, classes=(DEVICE_CLASS,))
    doc = server.offer(good, version=2)
    doc["desired"]["url"] = f"{attacker.url}/steal"
    server.assignment = doc
    daemon.updater.check()
    assert attacker.credentials_seen() == []
    assert last_code(server) == "foreign_origin"
    assert_still_serving_v1(daemon)


def test_cross_origin_redirect_of_a_bundle_is_refused_without_sending_the_credential(
    tmp_path: Path,
    daemon: AgentDaemon,
    server: BundleServer,
    sim: BundleSim,
    attacker: AttackerServer,
) -> None:
    """The device's own origin answers the bundle with a 302 to another origin."""
    good = release(sim, version=2, seed=2, classes=(DEVICE_CLASS,))
    doc = server.offer(good, version=2)
    origin = AttackerServer(
        routes={ASSIGNMENT_PATH: json.dumps(doc).encode(), REPORTS_PATH: b"{}"},
        redirect_to=attacker.url,
    ).start()
    try:
        daemon.updater.fetcher.base_url = origin.url + "/"  # type: ignore[union-attr]
        daemon.updater.check()
    finally:
        origin.stop()
    assert any(s.path == doc["desired"]["url"] for s in origin.seen)
    assert attacker.seen == [] or attacker.credentials_seen() == []
    assert daemon.updater.reports[-1]["error_code"] == "foreign_origin"
    assert_still_serving_v1(daemon)


def test_cross_origin_redirect_of_the_assignment_is_refused_without_the_credential(
    daemon: AgentDaemon, attacker: AttackerServer
) -> None:
    origin = AttackerServer(redirect_to=attacker.url).start()
    try:
        daemon.updater.fetcher.base_url = origin.url + "/"  # type: ignore[union-attr]
        daemon.updater.check()
    finally:
        origin.stop()
    assert origin.credentials_seen() == [f"Bearer {CREDENTIAL}"]  # its own origin: yes
    assert attacker.credentials_seen() == []
    assert_still_serving_v1(daemon)
