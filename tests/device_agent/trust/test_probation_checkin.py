"""A candidate on probation keeps checking in: a rollback reaches it at the next check,
not when its probation period ends (a real agent, real slots and onnxruntime, against the
repository simulator over real HTTP)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from device_agent.daemon import AgentDaemon
from device_agent.update.machine import State
from tests.bundlesim import BundleSim
from tests.device_agent.trust.test_uptane_attacks import (  # noqa: F401  (fixtures)
    CLASS,
    Clock,
    assert_serving,
    clock,
    close,
    make_daemon,
    usim,
    v1,
    v2,
)
from tests.uptanesim import Released, UptaneSim


@pytest.fixture
def slow_probation(
    tmp_path: Path,
    sim: BundleSim,
    usim: UptaneSim,  # noqa: F811
    clock: Clock,  # noqa: F811
    v1: Released,  # noqa: F811
) -> Iterator[AgentDaemon]:
    """A gateway running v1, with the recipes' five-minute probation."""
    d = make_daemon(
        tmp_path,
        sim,
        usim,
        clock,
        update={"probation_seconds": 300.0, "probation_min_predictions": 0},
    )
    d.updater.boot()
    usim.direct_release("dev-1", v1)
    d.updater.check()
    clock.advance(301)
    d.updater.check()  # v1's probation ends
    assert d.updater.state is State.IDLE
    yield d
    close(d)


def test_rollback_reaches_a_candidate_on_probation_at_the_next_check(
    slow_probation: AgentDaemon,
    usim: UptaneSim,  # noqa: F811
    clock: Clock,  # noqa: F811
    v1: Released,  # noqa: F811
    v2: Released,  # noqa: F811
) -> None:
    d = slow_probation
    usim.direct_release("dev-1", v2)
    d.updater.check()
    assert d.updater.state is State.PROBATION
    assert_serving(d, 2, seed=2)

    clock.advance(5)  # one poll later, 295 s of probation still to go
    d.updater.check()
    assert d.updater.state is State.PROBATION, "an unchanged assignment keeps probation"
    assert_serving(d, 2, seed=2)

    usim.direct_release("dev-1", v1)  # the rollout is rolled back
    clock.advance(5)
    d.updater.check()
    assert_serving(d, 1, seed=1)  # at this check, not 290 s later
    t = d.updater.record.target
    assert t is not None and t.version == 1, "v1 is installed again (its own probation)"
    clock.advance(301)
    d.updater.check()
    assert d.updater.state is State.IDLE
    installed = [r["version"] for r in usim.reports if r.get("outcome") == "installed"]
    assert installed == [1, 1], "v2 never committed; v1 installed again"
