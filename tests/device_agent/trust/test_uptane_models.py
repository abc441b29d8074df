"""A device running two models on the Uptane chain (a real AgentDaemon with ``[device]
models``, real onnxruntime and slots, the repository simulator over real HTTP): one
client and one set of floors, a director target per model, each model installed into its
own slots; a target for a model the device does not run is refused ``wrong_model`` and
nothing changes; a new release of one model leaves the other alone."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from device_agent.daemon import AgentDaemon, model_dir
from tests.bundlesim import BundleSim
from tests.device_agent.trust.test_uptane_attacks import CLASS, CRED, Clock, make_daemon
from tests.trustsim import release as build
from tests.uptanesim import Released, UptaneSim

MODELS = ["tiny", "other"]


@pytest.fixture
def usim(tmp_path: Path) -> Iterator[UptaneSim]:
    s = UptaneSim(tmp_path / "uptane").setup().start()
    s.devices[CRED] = ("dev-1", CLASS)
    yield s
    s.stop()


def _release(usim: UptaneSim, sim: BundleSim, name: str, version: int, seed: int) -> Released:
    path = build(sim, name=name, version=version, seed=seed, classes=(CLASS,))
    return usim.release(path, name=name, version=version, classes=(CLASS,))


@pytest.fixture
def daemon(tmp_path: Path, sim: BundleSim, usim: UptaneSim) -> Iterator[AgentDaemon]:
    d = make_daemon(tmp_path, sim, usim, Clock(), device={"models": MODELS})
    for u in d.updaters.values():
        u.boot()
    yield d
    for a in d.agents.values():
        a.close()
    d.store.close()
    for u in d.updaters.values():
        u.unlock()


def _check(d: AgentDaemon) -> None:
    for u in d.updaters.values():
        u.check()


def _serving(d: AgentDaemon) -> dict[str, int | None]:
    return {str(n): (a.model.version if a.model is not None else None) for n, a in d.agents.items()}


def test_two_models_each_in_their_own_slots_on_one_chain(
    tmp_path: Path, sim: BundleSim, usim: UptaneSim, daemon: AgentDaemon
) -> None:
    tiny1, other1 = _release(usim, sim, "tiny", 1, 1), _release(usim, sim, "other", 4, 2)
    usim.direct(
        "dev-1",
        (tiny1.name, tiny1.sha256, tiny1.length, "desired"),
        (other1.name, other1.sha256, other1.length, "desired"),
    )
    _check(daemon)
    assert _serving(daemon) == {"tiny": 1, "other": 4}
    for name in MODELS:
        ptr = daemon.updaters[name].slots.active()
        assert ptr is not None and ptr.name == name
        assert daemon.updaters[name].state_dir == model_dir(tmp_path / "state", name)

    # a target for a model this device does not run: refused, nothing changes
    stray = _release(usim, sim, "third", 9, 3)
    usim.direct(
        "dev-1",
        (tiny1.name, tiny1.sha256, tiny1.length, "desired"),
        (other1.name, other1.sha256, other1.length, "desired"),
        (stray.name, stray.sha256, stray.length, "desired"),
    )
    before = len(usim.reports)
    _check(daemon)
    assert _serving(daemon) == {"tiny": 1, "other": 4}
    codes = {r.get("error_code") for r in usim.reports[before:]}
    assert "wrong_model" in codes, usim.reports[before:]

    # a new release of one model: the other is not touched
    tiny2 = _release(usim, sim, "tiny", 2, 5)
    usim.direct(
        "dev-1",
        (tiny2.name, tiny2.sha256, tiny2.length, "desired"),
        (other1.name, other1.sha256, other1.length, "desired"),
    )
    other_reports = list(daemon.updaters["other"].reports)
    _check(daemon)
    assert _serving(daemon) == {"tiny": 2, "other": 4}
    assert daemon.updaters["other"].reports == other_reports
    installed = [r for r in usim.reports if r.get("outcome") == "installed"]
    assert [(r["name"], r["version"]) for r in installed] == [
        ("tiny", 1),
        ("other", 4),
        ("tiny", 2),
    ]
