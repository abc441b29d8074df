"""Input streams for simulated devices, and the task the demo model learns.

The task: machine-condition classification from 8 sensor features (vibration
RMS and peak, temperature, current, acoustic bands...), three classes
(normal, worn, fault). Each class is a Gaussian blob; a *drifting* stream moves
the feature means over time, as a sensor that degrades or a site that changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

N_FEATURES = 8
CLASSES = ("normal", "worn", "fault")
#: class prior seen in the field
PRIOR = np.array([0.7, 0.2, 0.1])


def _centers(seed: int = 1234) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(0.0, 1.6, size=(len(CLASSES), N_FEATURES)).astype(np.float32)


CENTERS = _centers()


def sample(
    n: int, rng: np.random.Generator, shift: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` labelled examples; ``shift`` (per feature) moves every class mean."""
    y = rng.choice(len(CLASSES), size=n, p=PRIOR)
    x = CENTERS[y] + rng.normal(0.0, 1.0, size=(n, N_FEATURES)).astype(np.float32)
    if shift is not None:
        x = x + shift.astype(np.float32)
    return x.astype(np.float32), y.astype(np.int64)


@dataclass
class InputStream:
    """Inputs for one device. ``drift_per_step`` is added to the feature shift each batch."""

    seed: int
    drift_per_step: np.ndarray | None = None
    _rng: np.random.Generator = field(init=False)
    _shift: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self._rng = np.random.default_rng(self.seed)
        self._shift = np.zeros(N_FEATURES, dtype=np.float32)

    @property
    def drifting(self) -> bool:
        return self.drift_per_step is not None

    def next_batch(self, n: int) -> np.ndarray:
        if self.drift_per_step is not None:
            self._shift = self._shift + self.drift_per_step
        x, _ = sample(n, self._rng, self._shift)
        return x


def drifting_stream(seed: int, strength: float = 0.15) -> InputStream:
    """A stream whose first three features drift upwards by ``strength`` per batch."""
    step = np.zeros(N_FEATURES, dtype=np.float32)
    step[:3] = strength
    return InputStream(seed, drift_per_step=step)
