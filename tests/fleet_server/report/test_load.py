"""Loading the review dataset from a real server database (SQLite file and PostgreSQL)."""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import Engine

from device_agent.protocol import LATENCY_BUCKETS_MS
from fleet_server.db.base import Base
from fleet_server.db.session import import_all_tables, make_engine
from fleet_server.report.aggregate import (
    FeatureWindow,
    Seen,
    WindowFigures,
    adoption_series,
    drift_cells,
    time_edges,
    version_series,
)
from fleet_server.report.dataset import ReviewDataset
from fleet_server.report.load import load_dataset
from fleet_server.rollouts.gates import hist_quantile, psi
from tests.fleet_server.report.test_fixtures import (
    FEATURES,
    REFERENCE,
    Scenario,
    populate,
    session_for,
)
from tests.pg import fresh_database


@dataclass
class Loaded:
    engine: Engine
    sc: Scenario
    ds: ReviewDataset
    tmp: Path


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def loaded(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Loaded]:
    """The fixture fleet's history in a fresh database, and the dataset loaded from it."""
    tmp = tmp_path_factory.mktemp(f"load-{request.param}")
    with contextlib.ExitStack() as stack:
        url = (
            f"sqlite:///{tmp / 'server.db'}"
            if request.param == "sqlite"
            else stack.enter_context(fresh_database("edgefleet_report"))
        )
        engine = make_engine(url)
        stack.callback(engine.dispose)
        sc = populate(engine, tmp)
        with session_for(engine) as s:
            ds = load_dataset(s, sc.end - timedelta(hours=24), sc.end, now=sc.end)
        yield Loaded(engine, sc, ds, tmp)


def test_fleet_lists_every_device_with_its_running_bundle(loaded: Loaded) -> None:
    rows = {d.id: d for d in loaded.ds.devices}
    assert sorted(rows) == sorted(d.id for d in loaded.sc.devices)
    assert {d.bundle for d in rows.values()} == {"kws v4"}
    assert all(d.last_seen and d.last_seen <= loaded.sc.end for d in rows.values())
    assert {d.device_class for d in rows.values()} == {"gateway-x86", "board-arm64", "board-legacy"}


def test_rollouts_carry_stages_and_the_engine_decisions(loaded: Loaded) -> None:
    by_id = {r.id: r for r in loaded.ds.rollouts}
    good, bad = by_id["r-good"], by_id["r-bad"]
    assert (good.status, bad.status) == ("succeeded", "rolled_back")
    assert (good.bundle, good.previous, bad.bundle, bad.previous) == (
        "kws v2",
        "kws v1",
        "kws v3",
        "kws v2",
    )
    assert [(s.index, s.percent) for s in good.stages] == [(0, 10), (1, 50), (2, 100)]
    assert all(s.started_at and s.ended_at for s in good.stages)
    assert [(s.index, s.percent) for s in bad.stages] == [(0, 10)]
    assert [d.action for d in good.decisions] == ["start", "advance", "advance", "complete"]
    assert [d.action for d in bad.decisions] == ["start", "rollback"]
    assert good.group == "all-devices" and good.policy == "rollback"


def test_decision_gates_are_the_numbers_the_engine_decided_on(loaded: Loaded) -> None:
    engine_decisions = [d for d in loaded.sc.decisions]
    loaded_decisions = [d for r in loaded.ds.rollouts for d in r.decisions if d.gates]
    assert len(engine_decisions) == len(loaded_decisions) == 4
    for want, got in zip(engine_decisions, loaded_decisions, strict=True):
        assert got.stage == want["stage"]
        for g_want, g_got in zip(want["gates"], got.gates, strict=True):
            assert g_got.name == g_want["name"] and g_got.verdict == g_want["verdict"]
            assert g_got.canary == g_want["canary_value"]
            assert g_got.control == g_want["control_value"]
            assert (g_got.n_canary, g_got.n_control) == (
                g_want["canary_samples"],
                g_want["control_samples"],
            )
    bad = next(r for r in loaded.ds.rollouts if r.id == "r-bad")
    breached = {g["name"] for g in engine_decisions[-1]["gates"] if g["verdict"] == "breach"}
    assert {g.name for g in bad.caught_by()} == breached
    assert "error_rate" in breached


def test_adoption_follows_the_rollouts(loaded: Loaded) -> None:
    points = loaded.ds.adoption
    n = len(loaded.sc.devices)
    assert all(sum(p.counts.values()) == n for p in points)
    assert points[0].counts == {"kws v1": n}
    assert points[-1].counts == {"kws v4": n}
    assert max(p.counts.get("kws v2", 0) for p in points) == n  # the good rollout completed
    assert 0 < max(p.counts.get("kws v3", 0) for p in points) < n  # only the canary got v3
    times = [p.ts for p in points]
    assert times == sorted(times) and len(times) <= 49


def test_inferences_and_errors_by_version_add_up(loaded: Loaded) -> None:
    want: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for r in loaded.sc.summaries:
        want[f"kws v{r.version}"][0] += r.count
        want[f"kws v{r.version}"][1] += r.errors
    got: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for p in loaded.ds.by_version:
        got[p.version][0] += p.count
        got[p.version][1] += p.errors
    assert got == want
    bad = [p for p in loaded.ds.by_version if p.version == "kws v3"]
    good = [p for p in loaded.ds.by_version if p.version == "kws v2"]
    assert min(p.latency_p95_ms or 0 for p in bad) > 2 * max(p.latency_p95_ms or 0 for p in good)


def test_drift_compares_each_group_with_the_reference_profile(loaded: Loaded) -> None:
    cells = {(c.group, c.feature): c.psi for c in loaded.ds.drift}
    assert set(cells) == {
        (g, f) for g in ("gateway-x86", "board-arm64", "board-legacy") for f in FEATURES
    }
    # board-legacy devices sit at site east, whose f0 and f2 inputs drift
    for f in FEATURES:
        drifted = cells[("board-legacy", f)]
        assert (drifted > 0.25) == (f in ("f0", "f2")), (f, drifted)
        assert cells[("gateway-x86", f)] < 0.05
    assert not any("reference profile" in n for n in loaded.ds.notes)


def test_prediction_distributions_of_canary_and_control(loaded: Loaded) -> None:
    dists = {(p.rollout, p.cohort): p for p in loaded.ds.predictions}
    assert set(dists) == {
        ("r-good", "canary"),
        ("r-good", "control"),
        ("r-bad", "canary"),
        ("r-bad", "control"),
    }
    canary = dists[("r-bad", "canary")]
    # while it ran, the bad rollout had one stage: the report shows what its gates judged
    total = loaded.sc.decisions[-1]["metrics"]["canary"]["prediction_counts"]
    assert canary.count == sum(total)
    assert canary.proportions == pytest.approx([t / sum(total) for t in total])
    assert canary.labels == ("class 0", "class 1", "class 2", "class 3")
    assert psi(canary.proportions, dists[("r-bad", "control")].proportions) > 0.25


def test_a_period_before_any_activity_is_empty_but_lists_the_fleet(loaded: Loaded) -> None:
    end = loaded.sc.start - timedelta(days=2)
    with session_for(loaded.engine) as s:
        ds = load_dataset(s, end - timedelta(hours=1), end, now=loaded.sc.end)
    assert len(ds.devices) == len(loaded.sc.devices)
    assert ds.rollouts == () and ds.by_version == () and ds.drift == () and ds.predictions == ()


def test_label_grouping_of_the_drift_heat_map(loaded: Loaded) -> None:
    with session_for(loaded.engine) as s:
        ds = load_dataset(
            s,
            loaded.sc.end - timedelta(hours=24),
            loaded.sc.end,
            drift_by="label:site",
            now=loaded.sc.end,
        )
    groups = {c.group for c in ds.drift}
    assert groups == {"site=north", "site=south", "site=east"}
    east = {c.feature: c.psi for c in ds.drift if c.group == "site=east"}
    assert east["f0"] > 0.25 and east["f1"] < 0.05


def test_missing_reference_profile_falls_back_and_says_so(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'server.db'}")
    sc = populate(engine, tmp_path, devices=9)
    for f in tmp_path.glob("kws-*.efb"):
        f.unlink()
    with session_for(engine) as s:
        ds = load_dataset(s, sc.end - timedelta(hours=1), sc.end, now=sc.end)
    engine.dispose()
    assert any("No reference profile for kws v1, kws v2, kws v3, kws v4" in n for n in ds.notes)
    assert ds.drift  # still there: each group against the fleet's inputs of the same version


def test_database_without_telemetry_tables_says_so(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'server.db'}")
    import_all_tables()
    Base.metadata.create_all(
        engine,
        tables=[t for n, t in Base.metadata.tables.items() if not n.startswith("telemetry_")],
    )
    now = datetime.now(timezone.utc)
    with session_for(engine) as s:
        ds = load_dataset(s, now - timedelta(hours=1), now)
    engine.dispose()
    assert ds.by_version == () and ds.drift == ()
    assert any("telemetry_summaries table does not exist" in n for n in ds.notes)


# -- the pure aggregation ---------------------------------------------------------------

T0 = datetime(2026, 11, 21, 8, 0, tzinfo=timezone.utc)


def test_time_edges_never_finer_than_a_window_and_at_most_48_bins() -> None:
    edges = time_edges(T0, T0 + timedelta(hours=24))
    assert len(edges) == 49 and edges[0] == T0 and edges[-1] == T0 + timedelta(hours=24)
    short = time_edges(T0, T0 + timedelta(minutes=3), min_width=timedelta(seconds=60))
    assert len(short) == 4
    assert time_edges(T0, T0)[0] == T0


def test_adoption_counts_the_version_last_seen_starting() -> None:
    seen = [
        Seen("a", "m v1", T0),
        Seen("a", "m v2", T0 + timedelta(minutes=10)),
        Seen("b", "m v1", T0 + timedelta(minutes=5)),
    ]
    registry = {"a": ("m v2", T0), "b": ("m v1", T0), "c": ("m v1", T0 + timedelta(minutes=7))}
    pts = adoption_series(
        seen, registry, [T0, T0 + timedelta(minutes=6), T0 + timedelta(minutes=12)]
    )
    assert [dict(p.counts) for p in pts] == [
        {"m v1": 1},  # only a has been seen; c not yet enrolled
        {"m v1": 2},  # a and b on v1; c still not enrolled
        {"m v2": 1, "m v1": 2},  # a moved to v2; c (never seen) counts from enrolment
    ]


def test_version_series_reads_p95_off_the_merged_histogram() -> None:
    h1 = [0] * (len(LATENCY_BUCKETS_MS) + 1)
    h2 = list(h1)
    h1[8], h2[10] = 90, 10
    rows = [
        WindowFigures(T0, "m v1", 90, 1, h1, None),
        WindowFigures(T0 + timedelta(seconds=5), "m v1", 10, 2, h2, None),
        WindowFigures(T0 + timedelta(seconds=5), "m v2", 50, 0, None, 7.0),
    ]
    pts = version_series(rows, [T0, T0 + timedelta(minutes=1)])
    v1 = next(p for p in pts if p.version == "m v1")
    merged = [a + b for a, b in zip(h1, h2, strict=True)]
    assert (v1.count, v1.errors) == (100, 3)
    assert v1.latency_p95_ms == pytest.approx(hist_quantile(merged, 0.95))
    v2 = next(p for p in pts if p.version == "m v2")
    assert v2.latency_p95_ms == 7.0 and v2.latency_p50_ms is None


def test_drift_cells_weigh_versions_by_inferences() -> None:
    same, shifted = [20, 20, 20, 20, 20], [5, 5, 15, 30, 45]
    rows = [
        FeatureWindow("g", "m v1", 300, {"f0": same}),
        FeatureWindow("g", "m v2", 100, {"f0": shifted}),
    ]
    cells, missing = drift_cells(rows, {"m v1": {"f0": REFERENCE}, "m v2": {"f0": REFERENCE}})
    assert missing == []
    want = (0.0 * 300 + psi(shifted, REFERENCE) * 100) / 400
    assert cells[0].psi == pytest.approx(want)


def test_sums_in_the_database_equal_the_row_by_row_pass(loaded: Loaded) -> None:
    for drift_by in ("class", "group", "label:site"):
        with session_for(loaded.engine) as s:
            args = (s, loaded.sc.end - timedelta(hours=24), loaded.sc.end)
            in_db = load_dataset(*args, drift_by=drift_by, now=loaded.sc.end, in_database=True)
            by_rows = load_dataset(*args, drift_by=drift_by, now=loaded.sc.end, in_database=False)
        assert in_db.to_json() == by_rows.to_json(), drift_by
        assert in_db.by_version and in_db.drift and in_db.predictions


def test_devices_on_stale_update_metadata_are_named_in_the_report(tmp_path: Path) -> None:
    """A device that cannot get fresh Uptane metadata (a freeze, or the server out of
    reach) reports ``stale_metadata``; the review counts and names it."""
    from fleet_server.db.models import Device
    from fleet_server.report.render import render_html

    engine = make_engine(f"sqlite:///{tmp_path / 'server.db'}")
    sc = populate(engine, tmp_path, devices=9)
    with session_for(engine) as s:
        d = s.get(Device, "dev-004")
        assert d is not None
        d.health = "degraded"
        d.health_details = {"type": "health", "error_code": "stale_metadata"}
        s.commit()
        ds = load_dataset(s, sc.end - timedelta(hours=1), sc.end, now=sc.end)
    engine.dispose()
    assert {r.id: r.health_code for r in ds.devices if r.health_code} == {
        "dev-004": "stale_metadata"
    }
    html = render_html(ds)
    assert '<div class="num">1</div><div class="lbl">devices on stale update metadata' in html
    assert "degraded (stale_metadata)" in html
