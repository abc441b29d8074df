"""After an update the replaced model keeps running beside the new one on a sample of
inputs, within a CPU budget, and the window summary carries their agreement
(``previous``), so the fleet judges every canary against the model it replaces.

Real signed bundles installed through the update path into A/B slots, real onnxruntime.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_agent.config import AgentConfig
from device_agent.update import Updater
from tests.agent_models import add_onnx, mlp_onnx, smoke_for
from tests.device_agent.test_agent import Kit, reference, x16
from tests.device_agent.test_agent import kit as kit  # noqa: F401 - fixture
from tests.device_agent.test_agent import make_agent as make_agent  # noqa: F401 - fixture

D1, D2 = mlp_onnx(0), mlp_onnx(1)


def config(rate: float, budget: float = 1.0) -> AgentConfig:
    """The budget is a share of each flush interval's wall time (0.05 of 1 s by default):
    hundreds of comparisons fill most of that, so a loaded machine would cut a sample
    short. Only the zero-budget test is about the budget; the others grant a whole
    interval, which these windows never use up."""
    cfg = AgentConfig()
    cfg.telemetry.compare_previous_rate = rate
    cfg.telemetry.compare_previous_budget = budget
    return cfg


def updated(kit: Kit, make_agent: Any, state: Path, cfg: AgentConfig) -> Any:  # noqa: F811
    agent = make_agent(config=cfg)
    x = x16(3, n=4)
    agent.install_file(
        kit.bundle(D1, version=1, smoke=smoke_for(D1, x)), kit.trust, state_dir=state
    )
    assert agent.previous is None  # the first install replaces nothing
    agent.install_file(
        kit.bundle(D2, version=2, smoke=smoke_for(D2, x)), kit.trust, state_dir=state
    )
    return agent


def window(agent: Any, xs: np.ndarray) -> dict[str, Any]:
    for i in range(len(xs)):
        (y,) = agent.predict(xs[i : i + 1])
        np.testing.assert_array_equal(y, reference(D2, xs[i : i + 1]))  # v2 serves
    agent.telemetry.tick()  # the worker's round: drains and compares within its budget
    agent.telemetry.close_all()
    body: dict[str, Any] = agent.telemetry.recent[-1]
    return body


def test_after_an_update_the_replaced_model_is_compared_on_every_input_at_rate_1(
    kit: Kit,  # noqa: F811
    make_agent: Any,  # noqa: F811
    tmp_path: Path,
) -> None:
    agent = updated(kit, make_agent, tmp_path / "state", config(1.0))
    assert (agent.model.version, agent.previous.version) == (2, 1)
    assert agent.stats()["previous"] == {"name": "m", "version": 1}
    xs = x16(7, n=300)
    prev = window(agent, xs)["previous"]
    expected = float(np.mean(reference(D1, xs).argmax(1) == reference(D2, xs).argmax(1)))
    assert 0 < expected < 1  # the two versions really disagree on some inputs
    assert (prev["name"], prev["version"], prev["count"], prev["errors"]) == ("m", 1, 300, 0)
    assert prev["agreement"] == pytest.approx(expected)


def test_the_comparison_samples_its_share_of_inputs(
    kit: Kit,  # noqa: F811
    make_agent: Any,  # noqa: F811
    tmp_path: Path,
) -> None:
    agent = updated(kit, make_agent, tmp_path / "state", config(0.2))
    prev = window(agent, x16(8, n=2000))["previous"]
    assert 300 <= prev["count"] <= 500  # 400 expected; binomial sd 18


def test_a_zero_budget_compares_nothing_and_rate_zero_keeps_nothing_loaded(
    kit: Kit,  # noqa: F811
    make_agent: Any,  # noqa: F811
    tmp_path: Path,
) -> None:
    agent = updated(kit, make_agent, tmp_path / "a", config(1.0, budget=0.0))
    assert agent.previous is not None
    assert "previous" not in window(agent, x16(9, n=100))  # no CPU granted: no comparison
    off = updated(kit, make_agent, tmp_path / "b", config(0.0))
    assert off.previous is None and "previous" not in window(off, x16(9, n=100))


def test_a_restarted_agent_compares_with_the_previous_slot_again(
    kit: Kit,  # noqa: F811
    make_agent: Any,  # noqa: F811
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    updated(kit, make_agent, state, config(1.0))
    again = make_agent(config=config(1.0))
    updater = Updater(state, kit.trust, again)
    try:
        updater.boot()
    finally:
        updater.unlock()
    assert (again.model.version, again.previous.version) == (2, 1)
    assert window(again, x16(10, n=50))["previous"]["count"] == 50


def test_a_rollback_stops_the_comparison(
    kit: Kit,  # noqa: F811
    make_agent: Any,  # noqa: F811
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    agent = updated(kit, make_agent, state, config(1.0))
    updater = Updater(state, kit.trust, agent)
    try:
        updater.rollback()
    finally:
        updater.unlock()
    assert agent.model.version == 1 and agent.previous is None
    for i in range(20):
        agent.predict(x16(i))
    agent.telemetry.tick()
    agent.telemetry.close_all()
    assert "previous" not in agent.telemetry.recent[-1]


def test_a_replaced_model_with_other_inputs_or_outputs_is_not_compared(
    kit: Kit,  # noqa: F811
    make_agent: Any,  # noqa: F811
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    agent = make_agent(config=config(1.0))
    agent.install_file(kit.bundle(add_onnx(4), version=1), kit.trust, state_dir=state)
    agent.install_file(
        kit.bundle(D2, version=2, smoke=smoke_for(D2, x16(3, n=4))), kit.trust, state_dir=state
    )
    assert agent.model.version == 2 and agent.previous is None  # inputs a, b vs x


class SteppingClock:
    """A perf clock: ``first_gap`` ns pass between the worker's round starting and its
    next reading (the drain of the active model's calls, or a preemption on a loaded
    device), then ``step`` ns per reading."""

    def __init__(self, first_gap: int, step: int) -> None:
        self.t, self.first_gap, self.step, self.calls = 0, first_gap, step, 0

    def __call__(self) -> int:
        self.calls += 1
        if self.calls == 2:
            self.t += self.first_gap
        elif self.calls > 2:
            self.t += self.step
        return self.t


def test_the_budget_counts_time_in_the_replaced_model_not_the_rest_of_the_round(
    kit: Kit,  # noqa: F811
    make_agent: Any,  # noqa: F811
    tmp_path: Path,
) -> None:
    # 0.05 of a 1 s interval is 50 ms: 60 ms of other work in the round (draining 2,000
    # calls on a busy core) must not leave the replaced model with no comparison at all
    agent = updated(kit, make_agent, tmp_path / "state", config(0.2, budget=0.05))
    agent.telemetry.perf_ns = SteppingClock(first_gap=60_000_000, step=1_000)
    prev = window(agent, x16(8, n=2000))["previous"]
    assert 300 <= prev["count"] <= 500  # each call 1 µs by this clock: all fit in 50 ms


def test_the_budget_caps_the_time_spent_in_the_replaced_model(
    kit: Kit,  # noqa: F811
    make_agent: Any,  # noqa: F811
    tmp_path: Path,
) -> None:
    agent = updated(kit, make_agent, tmp_path / "state", config(1.0, budget=0.05))
    agent.telemetry.perf_ns = SteppingClock(first_gap=0, step=1_000_000)
    prev = window(agent, x16(8, n=300))["previous"]
    # 1 ms per reading, about 2 ms per call: 50 ms of budget compares about 25 of 300
    assert 10 <= prev["count"] <= 50, prev
