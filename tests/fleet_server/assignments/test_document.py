"""The assignment document (pure): its ETag is the sha256 of its canonical JSON, so two
replicas computing the same assignment agree, and any change of what the device must run
changes it."""

from __future__ import annotations

import hashlib
import json
from types import SimpleNamespace
from typing import Any

import pytest

from fleet_server.assignments.document import (
    TelemetryPolicy,
    assigned_bundle_ids,
    build_assignment,
    canonical,
)


def bundle(bid: str, version: int = 1, sha: str = "a" * 64) -> Any:
    return SimpleNamespace(id=bid, name="m", version=version, sha256=sha, size=10)


def test_assignment_id_is_sha256_of_the_canonical_document_without_it() -> None:
    doc = build_assignment("dev-1", desired=bundle("b-1"), rollout_id="r-1", stage=0)
    body = {k: v for k, v in doc.items() if k != "assignment_id"}
    assert doc["assignment_id"] == hashlib.sha256(canonical(body)).hexdigest()
    # canonical: sorted keys, compact, no whitespace
    assert canonical(body) == json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def test_two_replicas_compute_the_same_etag() -> None:
    a = build_assignment("dev-1", desired=bundle("b-1"), shadow=bundle("b-2", 2))
    b = build_assignment("dev-1", desired=bundle("b-1"), shadow=bundle("b-2", 2))
    assert a == b and a["assignment_id"] == b["assignment_id"]


@pytest.mark.parametrize(
    "change",
    [
        {"device_id": "dev-2"},
        {"desired": bundle("b-9")},
        {"desired": bundle("b-1", sha="b" * 64)},
        {"shadow": bundle("b-2")},
        {"rollout_id": "r-2"},
        {"stage": 1},
        {"telemetry": TelemetryPolicy(sample_rate=0.5)},
    ],
)
def test_every_field_changes_the_etag(change: dict[str, Any]) -> None:
    base: dict[str, Any] = {"device_id": "dev-1", "desired": bundle("b-1")}
    before = build_assignment(**base)
    after = build_assignment(**{**base, **change})
    assert before["assignment_id"] != after["assignment_id"]


def test_bundle_reference_points_at_the_device_api() -> None:
    doc = build_assignment("dev-1", desired=bundle("b-1"))
    assert doc["desired"]["url"] == "/device/v1/bundles/b-1"
    assert doc["desired"]["sha256"] == "a" * 64 and doc["desired"]["size"] == 10


def test_assigned_bundle_ids_are_desired_and_shadow_only() -> None:
    doc = build_assignment("dev-1", desired=bundle("b-1"), shadow=bundle("b-2"))
    assert assigned_bundle_ids(doc) == {"b-1", "b-2"}
    assert assigned_bundle_ids(build_assignment("dev-1", desired=None)) == set()
    assert assigned_bundle_ids({"desired": {"bundle_id": 5}, "shadow": "b-3"}) == set()


def test_canonical_json_refuses_nan() -> None:
    with pytest.raises(ValueError):
        canonical({"x": float("nan")})
