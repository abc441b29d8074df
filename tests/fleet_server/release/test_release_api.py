"""The release routes: the server accepts image targets only under the release keys'
threshold and a new root only when the current root signed it; who may do it is the
permission table's; every attempt is audited."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from tuf.api.metadata import Metadata, Root, Targets

from converters.keys import KeyStore
from fleet_server.app import create_app
from fleet_server.db.models import AuditEntry
from fleet_server.registry.tufrepo import public_key, release_target, signer_for
from fleet_server.registry.uptane import init_uptane
from tests.server_fixtures import ADMIN_TOKEN, auth, make_settings


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    init_uptane(operator_keys=tmp_path / "offline", uptane_dir=tmp_path / "uptane")
    app = create_app(
        make_settings(
            tmp_path,
            f"sqlite:///{tmp_path / 'server.db'}",
            uptane_dir=tmp_path / "uptane",
            run_scheduler=False,
        )
    )
    with TestClient(app) as c:
        yield c


def token(client: TestClient, role: str) -> dict[str, str]:
    r = client.post(
        "/api/v1/operators", headers=auth(ADMIN_TOKEN), json={"name": role, "role": role}
    )
    t = client.post(
        f"/api/v1/operators/{r.json()['id']}/tokens", headers=auth(ADMIN_TOKEN), json={}
    )
    return auth(t.json()["token"])


def targets_signed_by(client: TestClient, tmp_path: Path, *keys: str) -> bytes:
    md: Metadata[Targets] = Metadata.from_bytes(
        client.get("/api/v1/release/targets", headers=auth(ADMIN_TOKEN)).content
    )
    t = release_target(
        name="tiny", version=1, sha256="a" * 64, length=10, release_counter=1, device_classes=[]
    )
    md.signed.targets[t.path] = t
    md.signed.version += 1
    md.signatures.clear()
    ks = KeyStore(tmp_path / "offline")
    for k in keys:
        md.sign(signer_for(ks.private_key(k)), append=True)
    return md.to_bytes()


def actions(client: TestClient) -> list[str]:
    ctx = client.app.state.ctx  # type: ignore[attr-defined]
    with ctx.sessions() as s:
        return [e.action for e in s.scalars(select(AuditEntry).order_by(AuditEntry.id))]


def test_targets_below_the_release_threshold_are_refused_and_audited(
    client: TestClient, tmp_path: Path
) -> None:
    op = token(client, "operator")
    r = client.put(
        "/api/v1/release/targets",
        headers=op,
        content=targets_signed_by(client, tmp_path, "release1"),
    )
    assert r.status_code == 400, r.text
    assert "release.refused" in actions(client)


def test_targets_signed_by_the_online_key_are_refused(client: TestClient, tmp_path: Path) -> None:
    md: Metadata[Targets] = Metadata.from_bytes(targets_signed_by(client, tmp_path))
    md.sign(signer_for(KeyStore(tmp_path / "uptane" / "keys").private_key("image-online")))
    r = client.put("/api/v1/release/targets", headers=auth(ADMIN_TOKEN), content=md.to_bytes())
    assert r.status_code == 400, r.text


def test_threshold_signed_targets_are_published_by_an_operator(
    client: TestClient, tmp_path: Path
) -> None:
    op = token(client, "operator")
    body = targets_signed_by(client, tmp_path, "release1", "release2")
    r = client.put("/api/v1/release/targets", headers=op, content=body)
    assert r.status_code == 200, r.text
    assert "release.upload" in actions(client)


def test_a_viewer_cannot_publish(client: TestClient, tmp_path: Path) -> None:
    body = targets_signed_by(client, tmp_path, "release1", "release2")
    r = client.put("/api/v1/release/targets", headers=token(client, "viewer"), content=body)
    assert r.status_code == 403
    assert "permission.denied" in actions(client)


def test_root_rotation_needs_admin_and_the_current_root_signature(
    client: TestClient, tmp_path: Path
) -> None:
    ks = KeyStore(tmp_path / "offline")
    md: Metadata[Root] = Metadata.from_bytes(
        (tmp_path / "uptane" / "image" / "root.json").read_bytes()
    )
    md.signed.revoke_key(public_key(ks.private_key("release1")).keyid, "targets")
    md.signed.version += 1
    md.signatures.clear()
    md.sign(signer_for(KeyStore(tmp_path / "uptane" / "keys").private_key("image-online")))
    r = client.put("/api/v1/release/root", headers=auth(ADMIN_TOKEN), content=md.to_bytes())
    assert r.status_code == 400, r.text  # not signed by the root key
    md.signatures.clear()
    md.sign(signer_for(ks.private_key("image-root")))
    op = token(client, "operator")
    assert client.put("/api/v1/release/root", headers=op, content=md.to_bytes()).status_code == 403
    r = client.put("/api/v1/release/root", headers=auth(ADMIN_TOKEN), content=md.to_bytes())
    assert r.status_code == 200, r.text
    assert (tmp_path / "uptane" / "image" / "2.root.json").exists()


def test_device_metadata_needs_a_device_credential(client: TestClient) -> None:
    assert client.get("/device/v1/uptane/image/timestamp.json").status_code == 401
    assert client.get("/device/v1/uptane/director/timestamp.json").status_code == 401


def test_a_server_without_the_chain_answers_not_configured_saying_which_setting(
    tmp_path: Path,
) -> None:
    app = create_app(make_settings(tmp_path, f"sqlite:///{tmp_path / 'plain.db'}"))
    with TestClient(app) as plain:
        for method, path in (("GET", "/api/v1/release/targets"), ("PUT", "/api/v1/release/root")):
            r = plain.request(method, path, headers=auth(ADMIN_TOKEN), content=b"{}")
            assert r.status_code == 409, r.text
            err = r.json()["error"]
            assert err["code"] == "not_configured" and "UPTANE_DIR" in err["message"]
