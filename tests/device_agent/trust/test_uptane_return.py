"""A device returns to a release it ran before when the director instructs it again.

The Uptane fetcher names an assignment by the hash of what the director instructs, so
"v1, then v2, then v1 again" repeats an assignment name the device has already handled.
The rollout engine's rollback is exactly that sequence; the device must act on it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from device_agent.daemon import AgentDaemon
from tests.bundlesim import BundleSim
from tests.device_agent.trust.test_uptane_attacks import (  # noqa: F401  (fixtures)
    CLASS,
    assert_serving,
    clock,
    daemon,
    usim,
    v1,
)
from tests.trustsim import release as build
from tests.uptanesim import Released, UptaneSim


@pytest.fixture
def v2(usim: UptaneSim, sim: BundleSim) -> Iterator[Released]:  # noqa: F811
    # the same release counter as v1: the release keys have not retired v1
    yield usim.release(
        build(sim, version=2, seed=2, classes=(CLASS,)),
        name="tiny",
        version=2,
        classes=(CLASS,),
        counter=1,
    )


def test_director_instructing_an_earlier_release_again_is_installed(
    daemon: AgentDaemon,  # noqa: F811
    usim: UptaneSim,  # noqa: F811
    v1: Released,  # noqa: F811
    v2: Released,
) -> None:
    daemon.updater.check()  # nothing new: v1's instructions are now fully handled
    assert_serving(daemon, 1, seed=1)

    usim.direct_release("dev-1", v2)
    daemon.updater.check()
    assert_serving(daemon, 2, seed=2)

    usim.direct_release("dev-1", v1)  # the rollback: v1's instructions once more
    daemon.updater.check()
    assert_serving(daemon, 1, seed=1)
    assert [r.get("version") for r in usim.reports if r.get("outcome") == "installed"] == [
        1,
        2,
        1,
    ]
