"""Alert rules in a real server app (SQLite and PostgreSQL): hysteresis with webhooks,
who may change rules, delivery retries with backoff, and the group figures (silent
devices, lost records). Telemetry is stored by the ingestion's own parser and writer
with chosen receive times; rounds are driven with ``run_once(now)``."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from device_agent.protocol import LATENCY_BUCKETS_MS, telemetry_topic
from fleet_server.alerts.webhook import DeliveryConfig, WebhookDeliverer
from fleet_server.app import create_app
from fleet_server.db.alerts import AlertEvent
from fleet_server.ingest import TelemetryWriter, parse_message
from tests.fleet_server.alerts.receiver import WebhookReceiver
from tests.server_fixtures import Fleet, auth, make_settings, server_keys

if TYPE_CHECKING:
    from tests.bundlesim import BundleSim


@pytest.fixture
def fleet(tmp_path: Path, db_url: str, bundle_sim: BundleSim) -> Iterator[Fleet]:
    """A server whose alert loops do not run by themselves (tests drive the rounds)."""
    keys_dir, kid, trust_path = server_keys(tmp_path, bundle_sim)
    settings = make_settings(
        tmp_path,
        db_url,
        trust_store=trust_path,
        signing_key_dir=keys_dir,
        signing_key=kid,
        run_scheduler=False,
        run_alerts=False,
    )
    with TestClient(create_app(settings)) as client:
        yield Fleet(client=client, sim=bundle_sim, tmp=tmp_path)


class Store:
    """Writes telemetry the way ingestion does, with the receive time the test picks."""

    def __init__(self, fleet: Fleet) -> None:
        self.writer = TelemetryWriter(fleet.ctx.engine)
        self.seq: dict[str, int] = {}

    def records(
        self, device: str, kind: str, bodies: list[dict[str, Any]], at: float, skip: int = 0
    ) -> None:
        recs = []
        for body in bodies:
            self.seq[device] = self.seq.get(device, 0) + 1 + skip
            recs.append({"seq": self.seq[device], "kind": kind, "ts": at, "body": body})
        payload = json.dumps({"device_id": device, "records": recs}).encode()
        msg = parse_message(telemetry_topic(device, kind), payload, at)
        assert not msg.rejected, msg.rejected
        self.writer.write([msg])

    def window(
        self, device: str, at: float, count: int, errors: int, correct: int | None = None
    ) -> None:
        hist = [0] * (len(LATENCY_BUCKETS_MS) + 1)
        hist[8] = count - errors
        body = {
            "window_start": at - 60,
            "window_end": at,
            "name": "tiny",
            "version": 3,
            "count": count,
            "errors": errors,
            "latency_ms": {"p50": 4, "p95": 4, "p99": 4, "mean": 4},
            "latency_hist": hist,
            "drift": None,
            "shadow": None,
            "dropped": {},
        }
        if correct is not None:  # 10 labelled predictions, 5 of each class; class 1 all right
            body["labels"] = {
                "count": 10,
                "correct": correct,
                "labelled": [5, 5],
                "correct_by_class": [correct - 5, 5],
                "confusion": [[correct - 5, 10 - correct], [0, 5]],
            }
        self.records(device, "summary", [body], at)


def group(fleet: Fleet, name: str, devices: list[str]) -> None:
    r = fleet.client.post(
        "/api/v1/groups", headers=fleet.admin, json={"name": name, "selector": {"g": name}}
    )
    assert r.status_code == 201, r.text
    for d in devices:
        fleet.enroll(d, labels={"g": name})


def rule(fleet: Fleet, headers: dict[str, str] | None = None, **body: Any) -> Any:
    return fleet.client.post("/api/v1/alerts/rules", headers=headers or fleet.admin, json=body)


def audit(fleet: Fleet, action: str) -> list[dict[str, Any]]:
    r = fleet.client.get("/api/v1/audit", headers=fleet.admin, params={"action": action})
    return list(r.json()["items"])


def test_an_alert_fires_once_and_resolves_only_past_the_clear_threshold(fleet: Fleet) -> None:
    group(fleet, "gateways", ["cam-1", "cam-2"])
    store = Store(fleet)
    loops = fleet.client.app.state.alerts  # type: ignore[attr-defined]
    t0 = time.time() - 3000  # in the past, so deliveries are due at once
    with WebhookReceiver() as hook:
        r = rule(
            fleet,
            name="errors",
            kind="error_rate",
            group="gateways",
            model="tiny",
            threshold=0.1,
            clear_threshold=0.05,
            window_seconds=300,
            webhooks=[hook.url],
        )
        assert r.status_code == 201, r.text

        def round_at(t: float) -> list[str]:
            raised = loops.evaluator.run_once(now=t)
            loops.deliverer.deliver_due()
            return [a["status"] for a in raised]

        for d in ("cam-1", "cam-2"):
            store.window(d, t0 - 10, count=100, errors=20)
        assert round_at(t0) == ["firing"]
        assert round_at(t0 + 30) == []  # still 0.2: no repeat
        for d in ("cam-1", "cam-2"):
            store.window(d, t0 + 350, count=100, errors=8)
        assert round_at(t0 + 400) == []  # 0.08: below the threshold, above the clear one
        assert (
            fleet.client.get("/api/v1/alerts/rules/errors", headers=fleet.admin).json()["status"]
            == "firing"
        )
        for d in ("cam-1", "cam-2"):
            store.window(d, t0 + 750, count=100, errors=2)
        assert round_at(t0 + 800) == ["resolved"]
        assert round_at(t0 + 830) == []
        got = hook.wait_for(2)
    assert [(a["status"], a["value"]) for a in got] == [("firing", 0.2), ("resolved", 0.02)]
    assert got[1]["window"]["seconds"] == 300 and got[1]["figures"]["inferences"] == 200
    assert len(audit(fleet, "alert.firing")) == 1 and len(audit(fleet, "alert.resolved")) == 1
    listed = fleet.client.get("/api/v1/alerts", headers=fleet.admin).json()["items"]
    assert [(a["status"], a["delivery"]) for a in listed] == [
        ("resolved", "delivered"),
        ("firing", "delivered"),
    ]


def test_a_viewer_is_refused_rule_changes_and_the_refusal_is_audited(fleet: Fleet) -> None:
    group(fleet, "gateways", ["cam-1"])
    viewer = auth(fleet.operator_token("viewer", "vera"))
    operator = auth(fleet.operator_token("operator", "otto"))
    body = {"name": "drift", "kind": "drift", "group": "gateways", "model": "m", "threshold": 0.2}
    r = rule(fleet, viewer, **body)
    assert r.status_code == 403 and r.json()["error"]["code"] == "permission_denied"
    assert rule(fleet, operator, **body).status_code == 201
    assert (
        fleet.client.patch(
            "/api/v1/alerts/rules/drift", headers=viewer, json={"threshold": 0.5}
        ).status_code
        == 403
    )
    assert fleet.client.delete("/api/v1/alerts/rules/drift", headers=viewer).status_code == 403
    assert fleet.client.post("/api/v1/alerts/evaluate", headers=viewer).status_code == 403
    # a viewer reads them; the rule is unchanged
    got = fleet.client.get("/api/v1/alerts/rules/drift", headers=viewer)
    assert got.status_code == 200 and got.json()["threshold"] == 0.2
    assert fleet.client.get("/api/v1/alerts", headers=viewer).status_code == 200
    denied = audit(fleet, "permission.denied")
    assert [e["actor"] for e in denied] == ["operator:vera"] * 4
    assert {e["target_id"] for e in denied} == {"alert.manage"}
    assert [e["actor"] for e in audit(fleet, "alert_rule.create")] == ["operator:otto"]


def test_rules_the_server_could_not_judge_are_refused(fleet: Fleet) -> None:
    group(fleet, "gateways", [])
    r = rule(fleet, name="a", kind="drift", group="gateways", threshold=0.2)
    assert r.status_code == 400 and "model" in r.json()["error"]["message"]
    r = rule(fleet, name="b", kind="drift", group="gateways", model="m", threshold=0.2,
             clear_threshold=0.3)  # fmt: skip
    assert r.status_code == 400 and "clear threshold" in r.json()["error"]["message"]
    assert rule(fleet, name="c", kind="silent", group="nowhere", threshold=0).status_code == 404
    r = rule(fleet, name="d", kind="drift", group="gateways", model="m", threshold=0.2,
             webhooks=["file:///etc/passwd"])  # fmt: skip
    assert r.status_code == 422


def test_a_failing_webhook_is_retried_with_backoff_then_given_up(fleet: Fleet) -> None:
    group(fleet, "gateways", ["cam-1"])
    loops = fleet.client.app.state.alerts  # type: ignore[attr-defined]
    with WebhookReceiver(answers=[500, 503]) as hook:
        dead = "http://127.0.0.1:9/nobody-listens"
        for name, url in (("flaky", hook.url), ("dead", dead)):
            r = rule(
                fleet,
                name=name,
                kind="silent",
                group="gateways",
                threshold=0,
                window_seconds=10,
                webhooks=[url],
            )
            assert r.status_code == 201, r.text
        raised = loops.evaluator.run_once(now=time.time() + 60)  # nobody seen for a minute
        assert sorted(a["alert"] for a in raised) == ["dead", "flaky"]
        deliverer = WebhookDeliverer(
            fleet.ctx.sessions, DeliveryConfig(base_delay=1.0, max_attempts=3, timeout=2)
        )
        try:
            assert deliverer.deliver_due() == 2  # first attempts
            assert deliverer.deliver_due() == 0  # the next ones are not due yet: backoff
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                deliverer.deliver_due()
                with fleet.ctx.sessions() as s:
                    states = {e.rule_name: e for e in s.scalars(select(AlertEvent))}
                if all(e.delivery != "pending" for e in states.values()):
                    break
                time.sleep(0.05)
        finally:
            deliverer.stop()
        [got] = hook.wait_for(1)
    assert hook.requests == 3 and got["alert"] == "flaky"
    flaky, gone = states["flaky"], states["dead"]
    assert (flaky.delivery, flaky.attempts, flaky.last_error) == ("delivered", 3, None)
    assert (gone.delivery, gone.attempts) == ("failed", 3) and "ConnectError" in (
        gone.last_error or ""
    )
    [failed] = audit(fleet, "alert.delivery_failed")
    assert failed["details"]["rule"] == "dead" and failed["details"]["attempts"] == 3


def test_silent_devices_fire_and_seen_devices_resolve(fleet: Fleet) -> None:
    group(fleet, "gateways", ["cam-1", "cam-2"])
    loops = fleet.client.app.state.alerts  # type: ignore[attr-defined]
    r = rule(fleet, name="quiet", kind="silent", group="gateways", threshold=0, window_seconds=30)
    assert r.status_code == 201
    assert loops.evaluator.run_once() == []  # just enrolled: not silent yet
    [alert] = loops.evaluator.run_once(now=time.time() + 60)
    assert alert["value"] == 2 and alert["figures"]["silent"] == ["cam-1", "cam-2"]
    for d in ("cam-1", "cam-2"):  # the devices check in
        seen = fleet.client.get("/device/v1/assignment", headers=fleet.enroll_headers[d])
        assert seen.status_code in (200, 304)
    fleet.ctx.last_seen.flush()
    [resolved] = loops.evaluator.run_once()
    assert resolved["status"] == "resolved" and resolved["value"] == 0


def test_records_lost_in_the_window_fire_once_and_resolve_when_none_are_new(
    fleet: Fleet,
) -> None:
    group(fleet, "gateways", ["cam-1"])
    store = Store(fleet)
    loops = fleet.client.app.state.alerts  # type: ignore[attr-defined]
    t0 = time.time() - 1000
    store.window("cam-1", t0, 10, 0)
    store.window("cam-1", t0 + 1, 10, 0)
    store.records("cam-1", "summary", [], t0)
    store.seq["cam-1"] += 3  # three records never arrive
    store.window("cam-1", t0 + 2, 10, 0)
    r = rule(
        fleet, name="lost", kind="records_lost", group="gateways", threshold=0, window_seconds=300
    )
    assert r.status_code == 201
    [alert] = loops.evaluator.run_once(now=time.time())
    assert alert["status"] == "firing" and alert["value"] == 3
    assert loops.evaluator.run_once(now=time.time() + 100) == []  # the same 3: still firing
    [resolved] = loops.evaluator.run_once(now=time.time() + 400)  # none new in the window
    assert resolved["status"] == "resolved" and resolved["value"] == 0


def test_the_report_lists_the_alerts_of_its_period(fleet: Fleet) -> None:
    from datetime import datetime, timedelta, timezone

    from fleet_server.report.dataset import ReviewDataset
    from fleet_server.report.load import load_dataset
    from fleet_server.report.render import render_html

    group(fleet, "gateways", ["cam-1"])
    store = Store(fleet)
    loops = fleet.client.app.state.alerts  # type: ignore[attr-defined]
    r = rule(fleet, name="errors", kind="error_rate", group="gateways", model="tiny",
             threshold=0.1, window_seconds=300)  # fmt: skip
    assert r.status_code == 201
    t0 = time.time() - 3000
    store.window("cam-1", t0 - 10, count=100, errors=30)
    [fired] = loops.evaluator.run_once(now=t0)
    store.window("cam-1", t0 + 750, count=100, errors=1)
    [resolved] = loops.evaluator.run_once(now=t0 + 800)
    until = datetime.now(timezone.utc)
    with fleet.ctx.sessions() as s:
        ds = load_dataset(s, until - timedelta(hours=2), until)
    assert [(a.status, a.rule, a.group, a.model, a.value) for a in ds.alerts] == [
        ("firing", "errors", "gateways", "tiny", 0.3),
        ("resolved", "errors", "gateways", "tiny", 0.01),
    ]
    assert ReviewDataset.from_json(ds.to_json()).alerts == ds.alerts
    html = render_html(ds)
    table = html[html.index('id="alert-list"') :]
    assert table.index("firing") < table.index("resolved") and "error_rate" in table


def test_a_deleted_rule_leaves_metrics_at_the_next_round(fleet: Fleet) -> None:
    group(fleet, "gateways", ["cam-1"])
    loops = fleet.client.app.state.alerts  # type: ignore[attr-defined]
    for name in ("a", "b"):
        r = rule(fleet, name=name, kind="silent", group="gateways", threshold=0)
        assert r.status_code == 201
    loops.evaluator.run_once()
    metrics = fleet.client.get("/metrics").text
    assert 'rule="a"' in metrics and 'rule="b"' in metrics
    assert 'edgefleet_alert_figure{figure="devices_silent",group="gateways"' in metrics
    assert fleet.client.delete("/api/v1/alerts/rules/a", headers=fleet.admin).status_code == 204
    loops.evaluator.run_once()
    metrics = fleet.client.get("/metrics").text
    assert 'rule="a"' not in metrics and 'rule="b"' in metrics
    assert 'edgefleet_alert_figure{figure="devices_silent",group="gateways"' in metrics  # b's
    r = fleet.client.patch("/api/v1/alerts/rules/b", headers=fleet.admin, json={"enabled": False})
    assert r.status_code == 200 and r.json()["enabled"] is False
    loops.evaluator.run_once()
    metrics = fleet.client.get("/metrics").text
    assert "edgefleet_alert_figure{" not in metrics and 'rule="b"' not in metrics
    assert [e["action"] for e in audit(fleet, "alert_rule.update")] == ["alert_rule.update"]


def test_devices_stale_on_an_old_bundle_fire_and_resolve_when_they_install(
    fleet: Fleet,
) -> None:
    group(fleet, "gateways", ["cam-1", "cam-2"])
    bundle = fleet.upload_bundle(version=4)
    for d in ("cam-1", "cam-2"):
        fleet.assign(d, bundle["id"])
    loops = fleet.client.app.state.alerts  # type: ignore[attr-defined]
    r = rule(fleet, name="behind", kind="stale", group="gateways", threshold=0, window_seconds=60)
    assert r.status_code == 201
    assert loops.evaluator.run_once() == []  # just assigned: not stale yet
    [fired] = loops.evaluator.run_once(now=time.time() + 120)
    assert fired["value"] == 2 and fired["figures"]["stale"] == ["cam-1", "cam-2"]
    for d in ("cam-1", "cam-2"):
        r = fleet.client.post(
            "/device/v1/reports",
            headers=fleet.enroll_headers[d],
            json={
                "reports": [
                    {
                        "type": "install",
                        "outcome": "installed",
                        "name": "tiny",
                        "version": 4,
                        "error_code": None,
                        "message": "",
                        "state": "idle",
                        "ts": time.time(),
                    }
                ]
            },
        )
        assert r.status_code == 200, r.text
    [resolved] = loops.evaluator.run_once(now=time.time() + 180)
    assert resolved["status"] == "resolved" and resolved["value"] == 0


def test_accuracy_from_posted_labels_fires_below_and_needs_labels(fleet: Fleet) -> None:
    group(fleet, "gateways", ["cam-1", "cam-2"])
    store = Store(fleet)
    loops = fleet.client.app.state.alerts  # type: ignore[attr-defined]
    r = rule(fleet, name="acc", kind="accuracy", group="gateways", model="tiny",
             threshold=0.9, min_samples=20, window_seconds=300)  # fmt: skip
    assert r.status_code == 201 and r.json()["clear_threshold"] == 0.92
    t0 = time.time() - 3000
    store.window("cam-1", t0 - 10, count=100, errors=0)  # no labels posted
    assert loops.evaluator.run_once(now=t0) == []
    acc = fleet.client.get("/api/v1/alerts/rules/acc", headers=fleet.admin).json()
    assert acc["value"] is None and "no labelled predictions" in acc["no_data"]
    store.window("cam-1", t0 + 10, count=100, errors=0, correct=9)
    store.window("cam-2", t0 + 10, count=100, errors=0, correct=7)
    [fired] = loops.evaluator.run_once(now=t0 + 20)
    assert fired["value"] == 0.8 and fired["figures"]["labelled"] == 20
    assert fired["comparison"] == "below"
    store.window("cam-1", t0 + 400, count=100, errors=0, correct=10)
    store.window("cam-2", t0 + 400, count=100, errors=0, correct=9)
    [resolved] = loops.evaluator.run_once(now=t0 + 420)
    assert resolved["status"] == "resolved" and resolved["value"] == 0.95


def test_a_hanging_webhook_times_out_without_holding_up_the_server(fleet: Fleet) -> None:
    group(fleet, "gateways", ["cam-1"])
    loops = fleet.client.app.state.alerts  # type: ignore[attr-defined]
    with WebhookReceiver(delay=5.0) as hook:
        r = rule(fleet, name="quiet", kind="silent", group="gateways", threshold=0,
                 window_seconds=10, webhooks=[hook.url])  # fmt: skip
        assert r.status_code == 201
        assert len(loops.evaluator.run_once(now=time.time() + 60)) == 1
        deliverer = WebhookDeliverer(fleet.ctx.sessions, DeliveryConfig(timeout=0.5))
        deliverer.start()
        try:
            time.sleep(0.2)  # the attempt is under way, waiting for the webhook
            t = time.monotonic()
            assert fleet.client.get("/healthz").status_code == 200
            assert loops.evaluator.run_once(now=time.time() + 61) == []
            assert time.monotonic() - t < 2.0  # neither waited for the 5 s webhook
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                with fleet.ctx.sessions() as s:
                    [event] = s.scalars(select(AlertEvent)).all()
                if event.last_error:
                    break
                time.sleep(0.1)
        finally:
            deliverer.stop()
    assert event.delivery == "pending" and event.attempts == 1
    assert "ReadTimeout" in (event.last_error or "")
    assert (event.next_attempt_at or 0) > time.time()  # retried later, with backoff
