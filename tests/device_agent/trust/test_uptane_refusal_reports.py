"""A refused director instruction reaches the rollout that caused it: the device reports a
refused install of the release the instruction named, beside its degraded health, so the
rollout's install gate counts it and its status shows the reason."""

from __future__ import annotations

from device_agent.daemon import AgentDaemon
from tests.bundlesim import BundleSim
from tests.device_agent.trust.test_uptane_attacks import (  # noqa: F401  (fixtures)
    assert_serving,
    clock,
    daemon,
    refused_with,
    usim,
    v1,
)
from tests.trustsim import release as build
from tests.uptanesim import UptaneSim


def test_instruction_for_a_release_of_another_class_is_reported_as_a_refused_install(
    daemon: AgentDaemon,  # noqa: F811
    usim: UptaneSim,  # noqa: F811
    sim: BundleSim,
) -> None:
    board = ("aarch64-board",)
    v2 = usim.release(
        build(sim, version=2, seed=2, classes=board), name="tiny", version=2, classes=board
    )
    usim.direct_release("dev-1", v2)
    daemon.updater.check()
    refused_with(usim, "wrong_device_class")
    installs = [r for r in usim.reports if r.get("type") == "install"]
    assert installs[-1]["outcome"] == "refused", installs
    assert (installs[-1]["name"], installs[-1]["version"]) == ("tiny", 2)
    assert installs[-1]["error_code"] == "wrong_device_class"
    assert installs[-1]["bundle_id"] == f"b-{v2.sha256[:16]}"
    assert_serving(daemon, 1, seed=1)


def test_refusal_of_the_whole_metadata_names_no_release(
    daemon: AgentDaemon,  # noqa: F811
    usim: UptaneSim,  # noqa: F811
    sim: BundleSim,
) -> None:
    """An unreleased bundle has no release to charge the refusal to: health only."""
    sha, n = usim.serve_bundle(build(sim, version=5, seed=5, classes=("x86_64-gateway",)))
    usim.direct("dev-1", ("tiny", sha, n, "desired"))
    daemon.updater.check()
    refused_with(usim, "not_released")
    assert [r["outcome"] for r in usim.reports if r.get("type") == "install"] == ["installed"]
    assert_serving(daemon, 1, seed=1)
