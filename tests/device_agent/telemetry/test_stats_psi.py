"""The project's one PSI (device_agent.telemetry.stats.psi), used by the device's drift
summaries and the server's gates, against an independent computation: PSI is the
symmetrised Kullback-Leibler divergence, KL(a||e) + KL(e||a), which scipy computes
with ``rel_entr``."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import rel_entr

from device_agent.telemetry.stats import PSI_EPSILON, psi
from fleet_server.rollouts import gates


def _independent(counts: list[float], reference: list[float], eps: float) -> float:
    n = max(len(counts), len(reference))
    c = np.array(counts + [0.0] * (n - len(counts)))
    r = np.array(reference + [0.0] * (n - len(reference)))
    a = np.maximum(c / c.sum(), eps)
    e = np.maximum(r / r.sum(), eps)
    return float(np.sum(rel_entr(a, e) + rel_entr(e, a)))


bins = st.lists(st.integers(0, 10_000).map(float), min_size=1, max_size=20)


@settings(max_examples=300, deadline=None)
@given(bins, bins)
def test_psi_matches_symmetrised_kl(counts: list[float], reference: list[float]) -> None:
    value = psi(counts, reference)
    if sum(counts) == 0 or sum(reference) == 0:
        assert value is None
        assert gates.psi(counts, reference) == 0.0
        return
    expected = _independent(counts, reference, PSI_EPSILON)
    assert value == pytest.approx(expected, rel=1e-9, abs=1e-12)
    # the server's gates use the same definition
    assert gates.psi(counts, reference) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_psi_of_counts_equals_psi_of_their_proportions() -> None:
    counts = [50.0, 30.0, 20.0]
    assert psi(counts, [4, 4, 2]) == pytest.approx(psi([0.5, 0.3, 0.2], [0.4, 0.4, 0.2]))


def test_psi_known_value() -> None:
    # (0.5-0.4)ln(0.5/0.4) + (0.3-0.4)ln(0.3/0.4) + 0
    expected = 0.1 * np.log(1.25) - 0.1 * np.log(0.75)
    assert psi([50, 30, 20], [0.4, 0.4, 0.2]) == pytest.approx(expected)
