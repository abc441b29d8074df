"""Device reports are bounded: a flood of install reports, unbounded fields and numbers
that are not finite are refused before anything is stored."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select

from device_agent.protocol import MAX_REPORT_BATCH_BYTES
from fleet_server.db.models import DeviceReport

if TYPE_CHECKING:
    from tests.server_fixtures import Fleet


def install(**extra: Any) -> dict[str, Any]:
    return {"type": "install", "outcome": "installed", "name": "tiny", "version": 4, **extra}


def stored_reports(fleet: Fleet) -> int:
    with fleet.ctx.session() as s:
        return int(s.scalar(select(func.count()).select_from(DeviceReport)) or 0)


def test_twenty_megabytes_of_install_reports_are_refused(fleet: Fleet) -> None:
    dev = fleet.enroll("cam-1")
    padding = "x" * 3000
    reports = [install(message=padding) for _ in range(7000)]  # about 20 MB
    body = json.dumps({"reports": reports}).encode()
    assert len(body) > 20 * 1024 * 1024
    r = fleet.client.post(
        "/device/v1/reports", headers={**dev, "content-type": "application/json"}, content=body
    )
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
    assert stored_reports(fleet) == 0


def test_body_without_length_is_cut_at_the_limit(fleet: Fleet) -> None:
    dev = fleet.enroll("cam-1")

    def chunks() -> Any:
        yield b'{"reports": ['
        for _ in range(MAX_REPORT_BATCH_BYTES // 500):
            yield json.dumps(install(message="y" * 900)).encode() + b","
        yield json.dumps(install()).encode() + b"]}"

    r = fleet.client.post(
        "/device/v1/reports", headers={**dev, "content-type": "application/json"}, content=chunks()
    )
    assert r.status_code == 413
    assert stored_reports(fleet) == 0


def test_report_with_unbounded_extra_fields_is_refused(fleet: Fleet) -> None:
    dev = fleet.enroll("cam-1")
    many = install(**{f"f{i}": i for i in range(100)})
    big = install(blob="z" * 100_000)
    for report in (many, big):
        r = fleet.client.post("/device/v1/reports", headers=dev, json={"reports": [report]})
        assert r.status_code == 422, r.text
        assert r.json()["error"]["code"] == "validation_error"
    assert stored_reports(fleet) == 0


def test_number_that_is_not_finite_is_refused(fleet: Fleet) -> None:
    dev = fleet.enroll("cam-1")
    for field, literal in (("ts", "1e999999"), ("extra", "1e999999"), ("extra", "NaN")):
        report = f'{{"type": "install", "outcome": "installed", "{field}": {literal}}}'
        body = f'{{"reports": [{report}]}}'
        r = fleet.client.post(
            "/device/v1/reports",
            headers={**dev, "content-type": "application/json"},
            content=body.encode(),
        )
        assert r.status_code == 422, (field, literal, r.text)
    assert stored_reports(fleet) == 0


def test_bounded_report_with_a_few_extra_fields_is_still_accepted(fleet: Fleet) -> None:
    dev = fleet.enroll("cam-1")
    report = install(rolled_back_from={"name": "tiny", "version": 3}, note="ok")
    r = fleet.client.post("/device/v1/reports", headers=dev, json={"reports": [report]})
    assert r.status_code == 200 and r.json() == {"accepted": 1}
    assert stored_reports(fleet) == 1
