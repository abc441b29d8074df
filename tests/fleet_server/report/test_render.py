"""The telemetry review renderer: every plot present, carrying the dataset's numbers."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import pytest

from fleet_server.report.dataset import (
    DeviceRow,
    PredictionDist,
    ReviewDataset,
)
from fleet_server.report.errors import DatasetFormatError
from fleet_server.report.plots import PLOTS
from fleet_server.report.render import (
    SECTIONS,
    dataset_json,
    format_gate_value,
    render_html,
    write_report,
)
from fleet_server.report.synthetic import synthetic_dataset


@pytest.fixture(scope="module")
def ds() -> ReviewDataset:
    return synthetic_dataset(devices=60, seed=3)


@pytest.fixture(scope="module")
def html(ds: ReviewDataset) -> str:
    return render_html(ds)


def section(html: str, sid: str) -> str:
    m = re.search(rf'<section id="{sid}">(.*?)</section>', html, re.S)
    assert m, f"section {sid} missing"
    return m.group(1)


def plot_svg(html: str, name: str) -> str:
    m = re.search(rf'<svg[^>]*data-plot="{name}".*?</svg>', html, re.S)
    assert m, f"plot {name} missing"
    return m.group(0)


def svg_texts(svg: str) -> str:
    """The text content of an SVG (tspans joined), for looking up numbers and labels."""
    return " ".join(
        re.sub(r"<[^>]+>", "", t) for t in re.findall(r"<text[^>]*>.*?</text>", svg, re.S)
    )


def test_every_section_and_named_plot_is_rendered(html: str) -> None:
    for sid, _ in SECTIONS:
        section(html, sid)
    where = {
        "adoption": "adoption",
        "timeline": "rollouts",
        "latency": "latency",
        "drift": "drift",
        "predictions": "predictions",
    }
    assert set(where) == set(PLOTS)
    for name, sid in where.items():
        assert f'data-plot="{name}"' in section(html, sid)


def test_plots_have_titles_and_axis_labels_with_units(html: str) -> None:
    expect = {
        "adoption": ["Version adoption over time", "devices running the version", "time (UTC)"],
        "timeline": ["Rollout stages and gate decisions", "time (UTC)"],
        "latency": [
            "Latency p95 and error rate by version",
            "p95 latency (ms)",
            "error rate (%)",
            "time (UTC)",
        ],
        "drift": [
            "Input drift: PSI per feature and device group",
            "input feature",
            "PSI vs reference profile",
        ],
        "predictions": ["Prediction distribution: canary vs control", "share of predictions (%)"],
    }
    for name, texts in expect.items():
        found = svg_texts(plot_svg(html, name))
        for t in texts:
            assert t in found, f"{name}: {t!r} not in plot text"


def test_adoption_plot_names_every_version(ds: ReviewDataset, html: str) -> None:
    text = svg_texts(plot_svg(html, "adoption"))
    versions = {v for p in ds.adoption for v in p.counts}
    assert versions == {"kws v1", "kws v2", "kws v3", "kws v4"}
    for v in versions:
        assert v in text


def test_timeline_marks_stages_and_the_breached_gates(ds: ReviewDataset, html: str) -> None:
    text = svg_texts(plot_svg(html, "timeline"))
    for r in ds.rollouts:
        for s in r.stages:
            assert f"{s.percent:g}%" in text
    bad = next(r for r in ds.rollouts if r.status == "rolled_back")
    assert "rollback: error_rate, latency_p95_ratio, prediction_shift breached" in text
    assert [g.name for g in bad.caught_by()] == [
        "error_rate",
        "latency_p95_ratio",
        "prediction_shift",
    ]


def test_decision_table_carries_every_gate_number(ds: ReviewDataset, html: str) -> None:
    rollouts = section(html, "rollouts")
    for r in ds.rollouts:
        table = re.search(rf'<table id="decisions-{r.id}">(.*?)</table>', rollouts, re.S)
        assert table, r.id
        cells = re.findall(r"<td[^>]*>(.*?)</td>", table.group(1))
        for d in r.decisions:
            for g in d.gates:
                assert format_gate_value(g.name, g.canary) in cells
                assert f"{g.n_canary:,}" in cells
    assert rollouts.count('class="first breach"') + rollouts.count('class="breach"') == 3


def test_latency_plot_has_a_line_per_version(ds: ReviewDataset, html: str) -> None:
    svg = plot_svg(html, "latency")
    text = svg_texts(svg)
    for v in {p.version for p in ds.by_version}:
        assert v in text
    # two panels (p95 and error rate), each with one line per version
    lines = re.findall(r'<g id="latency-line2d_\d+"', svg)
    assert len(lines) >= 2 * 4


def test_drift_heat_map_prints_every_cell(ds: ReviewDataset, html: str) -> None:
    text = svg_texts(plot_svg(html, "drift"))
    for cell in ds.drift:
        assert f"{cell.psi:.2f}" in text
        assert cell.group in text and cell.feature in text


def test_prediction_bars_per_cohort(ds: ReviewDataset, html: str) -> None:
    svg = plot_svg(html, "predictions")
    text = svg_texts(svg)
    for p in ds.predictions:
        assert f"{p.cohort} (n={p.count:,})" in text
        for label in p.labels:
            assert label in text
    bars = re.findall(r'<g id="predictions-patch_\d+"', svg)
    labels = len(ds.predictions[0].labels)
    assert len(bars) >= len(ds.predictions) * labels


def test_summary_names_fleet_size_outcomes_and_the_catching_gate(
    ds: ReviewDataset, html: str
) -> None:
    summary = section(html, "summary")
    assert f'<div class="num">{len(ds.devices)}</div>' in summary
    assert "succeeded" in summary and "rolled back" in summary
    assert "caught at stage 2 (10%) by gate error_rate (canary 9.10% vs control 0.19%" in summary


def test_fleet_section_lists_every_device(ds: ReviewDataset, html: str) -> None:
    fleet = section(html, "fleet")
    for d in ds.devices:
        assert f"<td>{d.id}</td>" in fleet
    counts = re.search(r'<table id="fleet-counts">.*?</table>', fleet, re.S)
    assert counts and f'<td class="num">{len(ds.devices)}</td>' in counts.group(0)


def test_report_is_self_contained(html: str) -> None:
    assert not re.search(r'(src|href)\s*=\s*"(https?:)?//', html)
    assert "<script" not in html
    assert "@import" not in html and "url(http" not in html


def test_svg_ids_are_unique_across_plots(html: str) -> None:
    ids = re.findall(r'\sid="([^"]+)"', html)
    assert len(ids) == len(set(ids))


def test_untrusted_text_is_escaped(ds: ReviewDataset) -> None:
    evil = DeviceRow('<script>alert("x")</script>', "c", {"k": "<b>"}, "kws v1", None, "ok")
    out = render_html(replace(ds, devices=(evil,)))
    assert "<script>alert" not in out
    assert "&lt;script&gt;alert" in out


def test_empty_dataset_says_what_is_missing() -> None:
    now = datetime(2026, 11, 21, tzinfo=timezone.utc)
    empty = ReviewDataset(
        generated_at=now, since=now, until=now, notes=("telemetry tables do not exist yet",)
    )
    out = render_html(empty)
    assert "<svg" not in out
    for msg in (
        "No devices are enrolled",
        "No adoption data",
        "No rollout ran",
        "No inference summaries",
        "No drift summaries",
        "No prediction distributions",
        "telemetry tables do not exist yet",
    ):
        assert msg in out


def test_json_export_round_trips_the_same_numbers(ds: ReviewDataset, tmp_path: Path) -> None:
    out, js = tmp_path / "r" / "report.html", tmp_path / "r" / "data.json"
    write_report(ds, out, json_path=js)
    data = json.loads(js.read_text())
    assert data == json.loads(dataset_json(ds))
    again = ReviewDataset.from_json(data)
    assert again.to_json() == data
    assert len(data["fleet"]["devices"]) == len(ds.devices)
    assert {c["psi"] for c in data["drift"]} == {round(c.psi, 4) for c in ds.drift}
    vp = ds.by_version[0]
    assert data["by_version"][0]["error_rate"] == round(vp.errors / vp.count, 6)
    gate = data["rollouts"][1]["decisions"][-1]["gates"][1]
    assert gate == {
        "name": "error_rate",
        "canary": 0.091,
        "control": 0.0019,
        "threshold": 0.01,
        "verdict": "breach",
        "n_canary": 5300,
        "n_control": 47700,
    }


def test_write_report_is_durable_and_readable(ds: ReviewDataset, tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    write_report(ds, out)
    assert out.read_text().startswith("<!DOCTYPE html>")
    assert oct(out.stat().st_mode & 0o777) == "0o644"
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]


def test_dataset_of_another_format_is_refused(ds: ReviewDataset) -> None:
    data = ds.to_json()
    data["format"] = "edgefleet-review/99"
    with pytest.raises(DatasetFormatError, match="re-export"):
        ReviewDataset.from_json(data)


def test_malformed_dataset_is_refused(ds: ReviewDataset) -> None:
    data = ds.to_json()
    del data["until"]
    with pytest.raises(DatasetFormatError, match="until"):
        ReviewDataset.from_json(data)
    data = ds.to_json()
    data["since"] = "last tuesday"
    with pytest.raises(DatasetFormatError, match="ISO 8601"):
        ReviewDataset.from_json(data)
    with pytest.raises(DatasetFormatError):
        ReviewDataset.from_json([1, 2])


def test_prediction_labels_and_proportions_must_match() -> None:
    with pytest.raises(DatasetFormatError, match="2 labels but 3 proportions"):
        PredictionDist("r", "canary", ("a", "b"), (0.2, 0.3, 0.5))


def test_rendering_is_deterministic_and_thread_safe(ds: ReviewDataset, html: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    small = replace(ds, devices=ds.devices[:5])
    alone = render_html(small)
    with ThreadPoolExecutor(4) as pool:
        pages = list(pool.map(lambda _: render_html(small), range(4)))
    assert all(p == alone for p in pages)
    assert render_html(ds) == html


def test_sparse_and_odd_datasets_render_without_warnings() -> None:
    import warnings

    from fleet_server.report.dataset import (
        AdoptionPoint,
        Decision,
        DriftCell,
        GateRow,
        RolloutRow,
        StageSpan,
        VersionPoint,
    )

    t = datetime(2026, 11, 21, 8, 0, tzinfo=timezone.utc)
    breach = GateRow("drift_psi", 0.6, None, 0.25, "breach", 900, 0)
    ds = ReviewDataset(
        generated_at=t,
        since=t,
        until=t,
        devices=(DeviceRow("d1", "cam", {}, "(none)", None, "unknown"),),
        adoption=(AdoptionPoint(t, {"(none)": 1}),),
        rollouts=(
            RolloutRow(
                "r-new",
                "m v2",
                "staged_canary",
                "pending",
                "pause",
                decisions=(Decision(t, "create", None, "", (), "operator:ann"),),
            ),
            RolloutRow(
                "r-held",
                "m v3",
                "shadow",
                "paused",
                "pause",
                (StageSpan(0, 5, t, None),),
                (Decision(t, "pause", 0, "gate breached", (breach,)),),
            ),
        ),
        by_version=(VersionPoint("m v1", t, 0, 0, None, None),),
        drift=(DriftCell("cam", "f0", 0.6),),
        predictions=(PredictionDist("r-held", "canary", ("a",), (1.0,), 10),),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = render_html(ds)
    for plot in PLOTS:
        assert f'data-plot="{plot}"' in out
    assert "caught at stage 1 (5%) by gate drift_psi (canary 0.600, threshold 0.25)" in out
