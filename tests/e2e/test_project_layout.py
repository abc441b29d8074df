"""The layout rules the architecture states, checked on the source tree: the fleet server
keeps its top level small, and the runtimes' private attributes are reached only inside
device_agent/runtime/ (where each backend's fast runner lives and is pinned by tests)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_fleet_server_has_at_most_twelve_top_level_modules() -> None:
    modules = sorted(p.name for p in (ROOT / "fleet_server").glob("*.py"))
    assert len(modules) <= 12, modules


def test_runtime_private_attributes_stay_in_the_runtime_package() -> None:
    private = re.compile(r"""\._sess\b|\._interpreter\b|['"]_sess['"]|['"]_interpreter['"]""")
    offenders = []
    for package in ("device_agent", "converters", "fleet_server"):
        for path in (ROOT / package).rglob("*.py"):
            if (ROOT / "device_agent" / "runtime") in path.parents:
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if private.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert offenders == []
