"""A controllable wall clock for simulated devices.

``now()`` is real time plus an offset the test or demo moves with
:meth:`advance` (a device whose clock runs ahead, or a fleet coming back after
hours offline), optionally running ``speed`` times faster than real time.
Devices use it for window boundaries, bundle expiry, probation and report
times; the server keeps real time, as it would in the field.
"""

from __future__ import annotations

import threading
import time


class SimClock:
    def __init__(self, speed: float = 1.0, offset: float = 0.0) -> None:
        if speed <= 0:
            raise ValueError("speed must be positive")
        self.speed = speed
        self._offset = offset
        self._t0_real = time.time()
        self._t0_mono = time.monotonic()
        self._lock = threading.Lock()

    def now(self) -> float:
        elapsed = (time.monotonic() - self._t0_mono) * self.speed
        return self._t0_real + elapsed + self._offset

    __call__ = now

    def advance(self, seconds: float) -> None:
        """Jump ahead (or back, with a negative value) by ``seconds``."""
        with self._lock:
            self._offset += seconds
