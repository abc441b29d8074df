"""The fleet: provision devices from images, enroll them, run them, inject faults."""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleet_server.simulator.device import SimDevice, provision_files
from fleet_server.simulator.streams import InputStream, drifting_stream


@dataclass(frozen=True)
class ClassPlan:
    """How many devices of one class, from which image, and how many drift."""

    device_class: str
    count: int
    image_dir: Path
    drifting: int = 0
    labels: dict[str, str] | None = None


class Fleet:
    """Many :class:`SimDevice` s, driven together."""

    def __init__(
        self,
        root: Path,
        *,
        server_url: str,
        mqtt_host: str,
        mqtt_port: int,
        window_seconds: float = 2.0,
        poll_seconds: float = 2.0,
        sample_rate: float = 0.02,
        seed: int = 0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``clock`` is every device's wall clock (a :class:`SimClock` to control it)."""
        self.root = Path(root)
        self.overrides: dict[str, dict[str, Any]] = {
            "server": {"url": server_url, "poll_seconds": poll_seconds, "timeout_seconds": 15.0},
            "mqtt": {"host": mqtt_host, "port": mqtt_port, "keepalive": 30},
            "telemetry": {
                "window_seconds": window_seconds,
                "sample_rate": sample_rate,
                "flush_interval_seconds": 0.5,
            },
            "update": {"probation_seconds": 2.0, "probation_min_predictions": 5},
        }
        self.devices: list[SimDevice] = []
        self.clock = clock
        self.rng = random.Random(seed)
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="fleet")

    def provision(self, plans: Iterable[ClassPlan]) -> list[SimDevice]:
        """Lay out every device's files from its class image (no enrollment yet)."""
        made = []
        for plan in plans:
            for i in range(plan.count):
                device_id = f"{plan.device_class}-{i:04d}"
                root = self.root / device_id
                overrides = {k: dict(v) for k, v in self.overrides.items()}
                overrides["device"] = {
                    "labels": dict(plan.labels or {}),
                    "device_class": plan.device_class,
                }
                cfg = provision_files(plan.image_dir, root, overrides)
                seed = self.rng.randrange(2**31)
                stream = drifting_stream(seed) if i < plan.drifting else InputStream(seed)
                made.append(
                    SimDevice(device_id, plan.device_class, root, stream, cfg, clock=self.clock)
                )
        self.devices += made
        return made

    def each(
        self, fn: Callable[[SimDevice], Any], devices: Iterable[SimDevice] | None = None
    ) -> list[Any]:
        return list(self._pool.map(fn, list(devices if devices is not None else self.devices)))

    def enroll(self, token_for: Callable[[SimDevice], str]) -> None:
        self.each(lambda d: d.enroll(token_for(d)))

    def start(self, devices: Iterable[SimDevice] | None = None) -> None:
        self.each(lambda d: d.start(), devices)

    def stop(self) -> None:
        self.each(lambda d: d.stop())
        self._pool.shutdown(wait=True)

    def drive(
        self,
        seconds: float,
        calls_per_second: float = 20.0,
        on_tick: Callable[[float], bool] | None = None,
    ) -> None:
        """Make every online device predict at about ``calls_per_second`` for ``seconds``.

        ``on_tick(elapsed)`` is called about once a second; returning True stops early.
        """
        start = time.monotonic()
        last_tick = start
        step = 0.25
        per_step = max(1, int(calls_per_second * step))
        while (now := time.monotonic()) - start < seconds:
            online = [d for d in self.devices if d.online]
            self.each(lambda d: d.predict_many(per_step), online)
            if on_tick is not None and now - last_tick >= 1.0:
                last_tick = now
                if on_tick(now - start):
                    return
            spare = step - (time.monotonic() - now)
            if spare > 0:
                time.sleep(spare)

    def versions(self, device_class: str | None = None) -> Counter[int | None]:
        return Counter(
            d.version()
            for d in self.devices
            if device_class is None or d.device_class == device_class
        )
