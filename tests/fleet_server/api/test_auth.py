"""Auth: every admin route refuses a missing, wrong or insufficient token.

The routes are found by walking the admin router itself (cross-checked against
the OpenAPI schema), so a route added without an auth dependency fails here.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest
from fastapi.routing import APIRoute

from fleet_server.api import api_router
from fleet_server.api.deps import RoleRequirement
from fleet_server.app import API_PREFIX
from fleet_server.security import Role

if TYPE_CHECKING:
    from tests.server_fixtures import Fleet


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def iter_routes(router: Any, prefix: str = "") -> Iterator[tuple[str, APIRoute]]:
    """Every APIRoute below ``router`` with its full path (nested routers included)."""
    for r in router.routes:
        if isinstance(r, APIRoute):
            yield prefix + r.path, r
            continue
        sub = getattr(r, "original_router", None)
        if sub is not None:
            ctx = getattr(r, "include_context", None)
            yield from iter_routes(sub, prefix + (getattr(ctx, "prefix", "") or ""))


def required_role(route: APIRoute) -> Role | None:
    stack = list(route.dependant.dependencies)
    while stack:
        dep = stack.pop()
        if isinstance(dep.call, RoleRequirement):
            return dep.call.role
        stack.extend(dep.dependencies)
    return None


ROUTES = [
    (API_PREFIX + path, method, route)
    for path, route in iter_routes(api_router)
    for method in sorted(route.methods)
]


def _url(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "x-1", path)


def _call(fleet: Fleet, method: str, path: str, headers: dict[str, str]) -> Any:
    kwargs: dict[str, Any] = {"headers": headers}
    if method in ("POST", "PUT", "PATCH"):
        kwargs["json"] = {}
    return fleet.client.request(method, _url(path), **kwargs)


def test_route_walk_covers_every_documented_admin_operation(fleet: Fleet) -> None:
    schema = fleet.client.get("/openapi.json").json()
    documented = {
        (p, m.upper())
        for p, ops in schema["paths"].items()
        for m in ops
        if p.startswith(API_PREFIX)
    }
    walked = {(p, m) for p, m, _ in ROUTES}
    assert walked == documented
    assert len(walked) > 30


@pytest.mark.parametrize(
    ("path", "method"), [(p, m) for p, m, _ in ROUTES], ids=[f"{m} {p}" for p, m, _ in ROUTES]
)
def test_every_admin_route_declares_a_role(path: str, method: str) -> None:
    route = next(r for p, m, r in ROUTES if p == path and m == method)
    assert required_role(route) is not None, f"{method} {path} has no RoleRequirement"


def test_every_admin_route_refuses_missing_wrong_and_insufficient_tokens(fleet: Fleet) -> None:
    tokens = {
        Role.viewer: fleet.operator_token("viewer"),
        Role.operator: fleet.operator_token("operator"),
    }
    checked = 0
    refused: set[tuple[str, str, str]] = set()
    for path, method, route in ROUTES:
        role = required_role(route)
        assert role is not None
        missing = _call(fleet, method, path, {})
        assert missing.status_code == 401, (method, path, missing.text)
        assert missing.json()["error"]["code"] == "not_authenticated"
        wrong = _call(fleet, method, path, auth("eft_wrong-token"))
        assert wrong.status_code == 401, (method, path, wrong.text)
        assert wrong.json()["error"]["code"] == "invalid_token"
        basic = _call(fleet, method, path, {"Authorization": "Basic YWRtaW46YWRtaW4="})
        assert basic.status_code == 401, (method, path)
        for lower in (r for r in Role if r < role):
            weak = _call(fleet, method, path, auth(tokens[lower]))
            assert weak.status_code == 403, (method, path, lower, weak.text)
            assert weak.json()["error"]["code"] == "permission_denied"
            assert "recorded in the audit log" in weak.json()["error"]["message"]
            refused.add((lower.name, method, path))
            checked += 1
        strong = _call(fleet, method, path, fleet.admin)
        assert strong.status_code not in (401, 403), (method, path, strong.text)
    assert checked > 20
    # every refusal is in the audit log, naming the route or the permission it needed
    from fleet_server.db.models import AuditEntry

    with fleet.ctx.sessions() as session:
        denied = session.query(AuditEntry).filter(AuditEntry.action == "permission.denied").all()
    assert len(denied) == checked, (len(denied), checked)
    routes = {d.target_id for d in denied if d.target_type == "route"}
    assert any(r.endswith("/rollouts/{rollout_id}/pause") for r in routes), routes


def test_revoked_and_expired_operator_tokens_are_refused(fleet: Fleet) -> None:
    r = fleet.client.post(
        "/api/v1/operators", headers=fleet.admin, json={"name": "ann", "role": "operator"}
    )
    op = r.json()["id"]
    t = fleet.client.post(f"/api/v1/operators/{op}/tokens", headers=fleet.admin, json={}).json()
    assert fleet.client.get("/api/v1/whoami", headers=auth(t["token"])).json()["name"] == "ann"
    d = fleet.client.delete(f"/api/v1/operators/{op}/tokens/{t['id']}", headers=fleet.admin)
    assert d.status_code == 204
    assert fleet.client.get("/api/v1/whoami", headers=auth(t["token"])).status_code == 401


def test_tokens_are_stored_hashed(fleet: Fleet) -> None:
    token = fleet.operator_token("viewer")
    enroll = fleet.enrollment_token()
    dev = fleet.enroll("cam-1")["Authorization"].split()[1]
    from sqlalchemy import text

    with fleet.ctx.engine.connect() as conn:
        dump = " ".join(
            str(row)
            for table in ("operator_tokens", "enrollment_tokens", "devices")
            for row in conn.execute(text(f"SELECT * FROM {table}"))
        )
    for secret in (token, enroll, dev):
        assert secret not in dump


def test_device_routes_refuse_missing_credentials(fleet: Fleet) -> None:
    for method, path in (
        ("GET", "/device/v1/assignment"),
        ("GET", "/device/v1/bundles/b-1"),
        ("POST", "/device/v1/reports"),
    ):
        r = fleet.client.request(method, path, json={"reports": []} if method == "POST" else None)
        assert r.status_code == 401, (method, path)


def test_mutating_admin_actions_are_audited(fleet: Fleet) -> None:
    fleet.enroll("cam-1")
    fleet.client.patch(
        "/api/v1/devices/cam-1/labels", headers=fleet.admin, json={"set": {"site": "x"}}
    )
    fleet.client.post(
        "/api/v1/groups", headers=fleet.admin, json={"name": "g", "selector": {"site": "x"}}
    )
    log = fleet.client.get("/api/v1/audit", headers=fleet.admin).json()["items"]
    actions = [e["action"] for e in log]
    assert actions[:3] == ["group.create", "device.labels", "device.enroll"]
    labels = next(e for e in log if e["action"] == "device.labels")
    assert labels["actor"] == "operator:bootstrap-admin"
    assert labels["details"] == {"before": {}, "after": {"site": "x"}}
