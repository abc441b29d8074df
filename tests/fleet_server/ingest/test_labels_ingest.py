"""Label and replaced-model figures of window summaries: parsed, stored (SQLite and
PostgreSQL) and aggregated per cohort for the accuracy and agreement gates."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import Engine, select

from device_agent.protocol import telemetry_topic
from fleet_server.db.telemetry import TelemetrySummary
from fleet_server.ingest import TelemetryWriter, parse_message
from fleet_server.rollouts import BundleRef, RolloutSpec
from fleet_server.rollouts.figures import telemetry_figures
from tests.fleet_server.ingest.test_parse import payload, summary_body
from tests.fleet_server.ingest.test_store import engine as engine  # noqa: F401 - fixture

LABELS = {
    "count": 10,
    "correct": 7,
    "labelled": [6, 4],
    "correct_by_class": [5, 2],
    "confusion": [[5, 1], [2, 2]],
}
PREVIOUS = {"name": "m", "version": 6, "count": 40, "errors": 0, "agreement": 0.25}


def body(version: int, labels: dict[str, Any] | None, previous: dict[str, Any] | None) -> Any:
    b = summary_body(version=version)
    if labels is not None:
        b["labels"] = labels
    b["previous"] = previous
    return b


def store(engine: Engine, device: str, seq: int, b: dict[str, Any]) -> None:  # noqa: F811
    m = parse_message(telemetry_topic(device, "summary"), payload(device, [(seq, "summary", b)]), 5)
    assert m.bad_records == 0, m.rejected
    TelemetryWriter(engine).write([m])


def test_label_summary_and_previous_section_are_stored(engine: Engine) -> None:  # noqa: F811
    store(engine, "dev-a", 1, body(7, LABELS, PREVIOUS))
    with engine.connect() as c:
        row = c.execute(select(TelemetrySummary)).one()
    assert (row.labels_count, row.labels_correct) == (10, 7)
    labels = row.labels if isinstance(row.labels, dict) else json.loads(row.labels)
    assert labels["confusion"] == [[5, 1], [2, 2]] and labels["labelled"] == [6, 4]
    assert (row.previous_version, row.previous_count, row.previous_errors) == (6, 40, 0)
    assert row.previous_agreement == 0.25


def test_a_summary_without_labels_stores_none(engine: Engine) -> None:  # noqa: F811
    store(engine, "dev-a", 1, body(7, None, None))
    with engine.connect() as c:
        row = c.execute(select(TelemetrySummary)).one()
    assert row.labels_count is None and row.labels is None and row.previous_count is None


def test_labels_that_do_not_add_up_are_rejected() -> None:
    bad = dict(LABELS, correct=9)  # correct_by_class sums to 7
    b = body(7, bad, None)
    m = parse_message(telemetry_topic("d", "summary"), payload("d", [(1, "summary", b)]), 5)
    assert m.bad_records == 1 and not m.rows["summary"]


def test_cohort_figures_carry_labels_and_the_canary_agreement(engine: Engine) -> None:  # noqa: F811
    store(engine, "dev-a", 1, body(7, LABELS, PREVIOUS))  # canary
    store(engine, "dev-a", 2, body(7, LABELS, dict(PREVIOUS, count=60, agreement=0.5)))
    control_labels = dict(LABELS, correct=9, correct_by_class=[6, 3], confusion=[[6, 0], [1, 3]])
    store(engine, "dev-b", 1, body(6, control_labels, None))  # control
    spec = RolloutSpec("r-1", BundleRef("b7", "m", 7), BundleRef("b6", "m", 6), {})
    m = telemetry_figures(engine, spec, since=0)
    assert (m.canary.labels, m.canary.labels_correct) == (20, 14)
    assert (m.control.labels, m.control.labels_correct) == (10, 9)
    assert m.canary.accuracy == 0.7 and m.control.accuracy == 0.9
    assert (m.canary.labelled_by_class, m.canary.correct_by_class) == ((12, 8), (10, 4))
    assert (m.control.labelled_by_class, m.control.correct_by_class) == ((6, 4), (6, 3))
    # agreement with the replaced model, pooled over windows: 10 + 30 of 100
    assert (m.canary.shadow_runs, m.canary.shadow_agreements) == (100, 40)
    assert m.control.shadow_runs == 0
