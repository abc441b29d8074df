"""A device returns to a release it ran before when the director instructs it again.

The Uptane fetcher names an assignment by the hash of what the director instructs, so
"v1, then v2, then v1 again" repeats an assignment name the device has already handled.
The rollout engine's rollback is exactly that sequence; the device must act on it.
"""

from __future__ import annotations

from device_agent.daemon import AgentDaemon
from tests.device_agent.trust.test_uptane_attacks import (  # noqa: F401  (fixtures)
    CLASS,
    assert_serving,
    clock,
    daemon,
    usim,
    v1,
    v2,
)
from tests.uptanesim import Released, UptaneSim


def test_director_instructing_an_earlier_release_again_is_installed(
    daemon: AgentDaemon,  # noqa: F811
    usim: UptaneSim,  # noqa: F811
    v1: Released,  # noqa: F811
    v2: Released,  # noqa: F811
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
