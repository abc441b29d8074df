"""``edgefleet samples export`` and ``edgefleet alerts`` against a real server process
(SQLite and PostgreSQL): the Parquet file read back with pyarrow, the rules made from the
CLI, and their Prometheus file checked and unit-tested by Debian's ``promtool``."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np
import pyarrow.parquet as pq
from click.testing import CliRunner, Result

from device_agent.payloads import encode_array
from device_agent.protocol import LATENCY_BUCKETS_MS, telemetry_topic
from fleet_server.cli import main
from fleet_server.db.session import make_engine
from fleet_server.ingest import TelemetryWriter, parse_message
from tests.server_fixtures import ADMIN_TOKEN, auth

if TYPE_CHECKING:
    from tests.bundlesim import BundleSim
    from tests.server_fixtures import LiveServer


def run(server: LiveServer, *args: str) -> Result:
    env = {"EDGEFLEET_URL": server.url, "EDGEFLEET_TOKEN": ADMIN_TOKEN}
    result = CliRunner().invoke(main, list(args), env=env)
    assert result.exit_code == 0, result.output
    return result


def enroll(server: LiveServer, device_id: str, labels: dict[str, str]) -> None:
    token = run(server, "enroll-token", "create", "--class", "cam").output.splitlines()[0]
    r = httpx.post(
        f"{server.url}/device/v1/enroll",
        json={
            "enrollment_token": token,
            "device_id": device_id,
            "device_class": "cam",
            "labels": labels,
        },
    )
    assert r.status_code == 201, r.text


class Store:
    """Telemetry written the way ingestion writes it, into the server's database."""

    def __init__(self, db_url: str) -> None:
        self.engine = make_engine(db_url)
        self.writer = TelemetryWriter(self.engine)
        self.seq: dict[str, int] = {}

    def put(self, device: str, kind: str, bodies: list[dict[str, Any]], at: float) -> None:
        recs = []
        for body in bodies:
            self.seq[device] = self.seq.get(device, 0) + 1
            recs.append({"seq": self.seq[device], "kind": kind, "ts": at - 1, "body": body})
        payload = json.dumps({"device_id": device, "records": recs}).encode()
        msg = parse_message(telemetry_topic(device, kind), payload, at)
        assert not msg.rejected, msg.rejected
        self.writer.write([msg])


def sample(model: str, value: float, label: int | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": model,
        "version": 2,
        "predicted": int(value) % 2,
        "inputs": {"x": encode_array(np.arange(4, dtype=np.float32).reshape(1, 4) + value)},
        "outputs": {"y": encode_array(np.array([[value, 1 - value]], dtype=np.float32))},
    }
    if label is not None:
        body["label"] = label
    return body


def test_samples_export_writes_a_groups_window_of_one_model_as_parquet(
    live_server: LiveServer, db_url: str, bundle_sim: BundleSim, tmp_path: Path
) -> None:
    s = live_server
    run(s, "group", "create", "gateways", "--selector", "site=north")
    for d, site in (("cam-1", "north"), ("cam-2", "north"), ("cam-9", "south")):
        enroll(s, d, {"site": site})
    with open(bundle_sim.publish(version=2, name="tiny"), "rb") as f:
        r = httpx.post(
            f"{s.url}/api/v1/bundles", headers=auth(ADMIN_TOKEN), files={"file": ("t.efb", f)}
        )
    assert r.status_code == 201, r.text
    store = Store(db_url)
    now = time.time()
    try:
        store.put(
            "cam-1", "samples", [sample("tiny", 0.0), sample("tiny", 1.0, label=1)], now - 100
        )
        store.put("cam-2", "samples", [sample("tiny", 2.0)], now - 50)
        store.put("cam-1", "samples", [sample("other", 3.0)], now - 40)  # another model
        store.put("cam-9", "samples", [sample("tiny", 4.0)], now - 30)  # another group
        store.put("cam-2", "samples", [sample("tiny", 5.0)], now - 7200)  # before the window
    finally:
        store.engine.dispose()
    out = tmp_path / "exports" / "tiny.parquet"
    result = run(
        s, "samples", "export", "--model", "tiny", "--group", "gateways", "--since", "1h",
        "--out", str(out),
    )  # fmt: skip
    assert "wrote 3 samples" in result.output
    table = pq.read_table(out)
    rows = table.to_pylist()
    assert [(r["device_id"], r["seq"], r["model"], r["version"]) for r in rows] == [
        ("cam-1", 1, "tiny", 2),
        ("cam-1", 2, "tiny", 2),
        ("cam-2", 1, "tiny", 2),
    ]
    assert [r["input_x"] for r in rows] == [[0, 1, 2, 3], [1, 2, 3, 4], [2, 3, 4, 5]]
    assert rows[0]["input_x_shape"] == [1, 4] and rows[2]["output_y"] == [2.0, -1.0]
    assert [r["label"] for r in rows] == [None, "1", None]
    assert [r["predicted"] for r in rows] == ["0", "1", "0"]
    assert json.loads(rows[0]["inputs_json"])["x"]["shape"] == [1, 4]
    assert abs(rows[2]["received_at"].timestamp() - (now - 50)) < 1e-3
    assert not list(out.parent.glob(".tiny.parquet.*"))  # no temporary file left behind
    # every device and model of the last day, through the API
    r = httpx.get(f"{s.url}/api/v1/samples/export", headers=auth(ADMIN_TOKEN))
    assert r.status_code == 200 and r.headers["x-edgefleet-rows"] == "6"
    audit = httpx.get(
        f"{s.url}/api/v1/audit", headers=auth(ADMIN_TOKEN), params={"action": "samples.export"}
    ).json()["items"]
    assert [e["details"]["rows"] for e in audit] == [6, 3]


def promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool is missing: install Debian's prometheus package (scripts/_env.sh)"
    return path


def summary(count: int, errors: int, psi: float, correct: int) -> dict[str, Any]:
    hist = [0] * (len(LATENCY_BUCKETS_MS) + 1)
    hist[10] = count - errors
    return {
        "window_start": 0,
        "window_end": 60,
        "name": "tiny",
        "version": 2,
        "count": count,
        "errors": errors,
        "latency_ms": {"p50": 15, "p95": 15, "p99": 15, "mean": 15},
        "latency_hist": hist,
        "drift": {"features": [{"name": "f0", "psi": psi, "counts": [1, 1]}], "psi_max": psi},
        "shadow": None,
        "dropped": {},
        "labels": {
            "count": 10,
            "correct": correct,
            "labelled": [5, 5],
            "correct_by_class": [correct - 5, 5],
            "confusion": [[correct - 5, 10 - correct], [0, 5]],
        },
    }


RULES = [
    ("drift", "--kind", "drift", "--model", "tiny", "--threshold", "0.2", "--min-samples", "1"),
    (
        "errors",
        "--kind",
        "error_rate",
        "--model",
        "tiny",
        "--threshold",
        "0.05",
        "--min-samples",
        "1",
    ),
    ("slow", "--kind", "latency_p99", "--model", "tiny", "--threshold", "50", "--min-samples", "1"),
    (
        "accuracy",
        "--kind",
        "accuracy",
        "--model",
        "tiny",
        "--threshold",
        "0.9",
        "--min-samples",
        "1",
    ),
    ("quiet", "--kind", "silent", "--threshold", "0"),
    ("behind", "--kind", "stale", "--threshold", "0"),
    ("lost", "--kind", "records_lost", "--threshold", "10"),
]


def test_rules_from_the_cli_export_a_prometheus_file_over_the_real_metrics(
    live_server: LiveServer, db_url: str, tmp_path: Path
) -> None:
    s = live_server
    run(s, "group", "create", "gateways", "--selector", "site=north")
    enroll(s, "cam-1", {"site": "north"})
    for name, *args in RULES:
        run(s, "alerts", "rules", "create", f"gw-{name}", "--group", "gateways", "--window",
            "10m", *args)  # fmt: skip
    listed = run(s, "alerts", "rules", "list").output
    assert all(f"gw-{name}" in listed for name, *_ in RULES)
    store = Store(db_url)
    try:  # a window below every threshold: accuracy 9/10 is not below 0.9
        store.put("cam-1", "summary", [summary(200, 2, psi=0.1, correct=9)], time.time() - 5)
    finally:
        store.engine.dispose()
    assert "no rule changed status" in run(s, "alerts", "evaluate").output
    shown = run(s, "alerts", "rules", "show", "gw-accuracy").output
    assert "0.9" in shown and "status: ok" in shown.replace("  ", " ").replace("  ", " ")

    store = Store(db_url)
    store.seq["cam-1"] = 1  # the device's next record
    try:  # errors break out: one alert, listed with where its samples are
        store.put("cam-1", "summary", [summary(200, 100, psi=0.1, correct=9)], time.time() - 1)
    finally:
        store.engine.dispose()
    assert "firing: gw-errors (error_rate = " in run(s, "alerts", "evaluate").output
    listed = run(s, "alerts", "list", "--status", "firing").output
    assert "gw-errors" in listed and "gateways" in listed
    assert "edgefleet samples export --model tiny --group gateways --since " in listed

    rules_yml = tmp_path / "rules.yml"
    rules_yml.write_text(run(s, "alerts", "prometheus-rules").output)
    check = subprocess.run(
        [promtool(), "check", "rules", str(rules_yml)], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"SUCCESS: {len(RULES)} rules found" in check.stdout

    # every rule's expression reads a series the server really exposes
    from fleet_server.alerts.prometheus import selector
    from fleet_server.alerts.service import load_rules
    from fleet_server.db.session import make_sessionmaker

    engine = make_engine(db_url)
    try:
        with make_sessionmaker(engine)() as session:
            rules = load_rules(session)
    finally:
        engine.dispose()
    metrics = httpx.get(f"{s.url}/metrics").text
    exposed = {line.split(" ")[0] for line in metrics.splitlines() if not line.startswith("#")}
    assert len(rules) == len(RULES)
    for rule in rules:
        assert selector(rule) in exposed, (selector(rule), sorted(exposed))
        assert selector(rule) in rules_yml.read_text().replace('\\"', '"')

    # Prometheus applies the same hysteresis: fires above 0.2, clears only at 0.16
    drift = next(r for r in rules if r.name == "gw-drift")
    series = selector(drift)
    tests_yml = tmp_path / "rules_test.yml"
    tests_yml.write_text(
        f"""rule_files: [{rules_yml.name}]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: '{series}'
        values: '0.1 0.3 0.18 0.18 0.1 0.18'
    alert_rule_test:
"""
        + "".join(
            f"""      - eval_time: {m}m
        alertname: edgefleet_gw_drift
        exp_alerts: {exp}
"""
            for m, exp in (
                (0, "[]"),
                (1, firing(0.3)),
                (2, firing(0.18)),  # 0.18: below the threshold, above the clear threshold
                (3, firing(0.18)),
                (4, "[]"),  # 0.1: cleared
                (5, "[]"),  # 0.18 again: not past the threshold, stays resolved
            )
        )
    )
    unit = subprocess.run(
        [promtool(), "test", "rules", str(tests_yml)], capture_output=True, text=True
    )
    assert unit.returncode == 0, unit.stdout + unit.stderr


def firing(value: float) -> str:
    """The expected alert of the gw-drift rule at ``value`` (labels and annotations)."""
    what = "drift_psi of tiny in group gateways"
    export = (
        "edgefleet samples export --model tiny --group gateways --since 600s --until now "
        "--out samples.parquet"
    )
    return f"""
          - exp_labels:
              figure: drift_psi
              group: gateways
              model: tiny
              window: 600s
              edgefleet_rule: gw-drift
              kind: drift
              severity: warning
            exp_annotations:
              summary: "{what} is above 0.2"
              description: "{what} over the last 600s is {value} (above 0.2; clears at 0.16)"
              samples: "{export}"
              samples_url: "/api/v1/samples/export?model=tiny&group=gateways&since=600s&until=now"
"""
