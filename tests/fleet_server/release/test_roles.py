"""Finding 4 (first part): who may build, release and roll out is an explicit table,
enforced on the routes and audited, refusals included.

An operator-role token posted an ONNX model to ``/models/{name}/sources`` and got back a
bundle that verified against the devices' trust store. Building on the server (which signs
with the server's key) now needs the admin role, and a refused attempt is in the audit log.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select

from fleet_server.db.models import AuditEntry
from fleet_server.security import PERMISSIONS, Role
from tests.bundlesim import tiny_onnx_model
from tests.server_fixtures import Fleet, auth


def post_source(fleet: Fleet, token: str, tmp_path: Path) -> object:
    src = tmp_path / "model.onnx"
    src.write_bytes(tiny_onnx_model(seed=3))
    with open(src, "rb") as f:
        return fleet.client.post(
            "/api/v1/models/tiny/sources",
            headers=auth(token),
            files={"file": ("model.onnx", f, "application/octet-stream")},
            data={"version": "5", "target": ["onnx:float32=cam"]},
        )


def audit_actions(fleet: Fleet) -> list[tuple[str, str, dict]]:
    with fleet.ctx.sessions() as s:
        return [
            (e.action, e.actor, dict(e.details or {}))
            for e in s.scalars(select(AuditEntry).order_by(AuditEntry.id))
        ]


def test_operator_token_cannot_build_a_signed_bundle_and_the_attempt_is_audited(
    fleet: Fleet, tmp_path: Path
) -> None:
    token = fleet.operator_token("operator", name="mallory")
    r = post_source(fleet, token, tmp_path)
    assert r.status_code == 403, r.text  # type: ignore[attr-defined]
    r2 = fleet.client.get("/api/v1/bundles", headers=fleet.admin)
    assert r2.json()["items"] == []
    denied = [a for a in audit_actions(fleet) if a[0] == "permission.denied"]
    assert denied and denied[-1][1] == "operator:mallory"
    assert denied[-1][2]["permission"] == "model.build"


def test_admin_builds_and_the_build_is_audited(fleet: Fleet, tmp_path: Path) -> None:
    r = post_source(fleet, fleet.admin["Authorization"].split()[1], tmp_path)
    assert r.status_code == 201, r.text  # type: ignore[attr-defined]
    assert any(a[0] == "model.build" for a in audit_actions(fleet))


def test_the_permission_table_names_every_release_step() -> None:
    assert PERMISSIONS["model.build"] is Role.admin
    assert PERMISSIONS["bundle.upload"] is Role.operator  # release-signed offline: devices check
    assert PERMISSIONS["rollout.create"] is Role.operator
    assert PERMISSIONS["device.assign"] is Role.operator
    assert "bundle.sign" not in PERMISSIONS  # nobody signs releases on the server
