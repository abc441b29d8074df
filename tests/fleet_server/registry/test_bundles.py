"""The bundle registry against a real database and bundle store: only bundles that
verify against the trust store are registered, each once; a refused upload leaves
nothing behind; server-side building without a signing key says how to configure it."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from fleet_server.db.models import Bundle
from fleet_server.errors import BundleRejectedError, ConflictError, ServiceUnavailableError
from fleet_server.registry.bundles import BuildRequest, BundleRegistry
from tests.bundlesim import BundleSim, Member, rewrite
from tests.server_fixtures import Fleet


def _flip_file_bytes(sim: BundleSim) -> object:
    """A signed bundle whose files were altered after signing (sizes kept)."""

    def flip(members: list[Member]) -> list[Member]:
        keep = ("manifest.json", "manifest.sig")
        return [
            (i, d[:-1] + bytes([d[-1] ^ 1]) if i.name not in keep and d else d) for i, d in members
        ]

    src = sim.publish(version=3)
    return rewrite(src, src.with_name("altered.efb"), flip)


def _leftovers(fleet: Fleet) -> list[str]:
    return [p.name for p in fleet.ctx.bundles.root.iterdir() if p.name.startswith(".")]


def test_a_verified_bundle_is_registered_with_its_manifest_and_stored(fleet: Fleet) -> None:
    path = fleet.sim.publish(version=3)
    ctx = fleet.ctx
    with ctx.session() as s, open(path, "rb") as f:
        b = ctx.registry.accept(s, f, uploaded_by="op", source="upload")
        s.commit()
        bid, sha, stored = b.id, b.sha256, b.file_path
    with ctx.session() as s:
        row = s.get(Bundle, bid)
        assert row is not None and row.version == 3 and row.name == "tiny"
        assert row.signed_by and row.manifest["version"] == 3
    assert Path(stored).read_bytes() == path.read_bytes()
    assert bid == f"b-{sha[:16]}"
    assert _leftovers(fleet) == []


def test_the_same_bundle_twice_is_a_conflict(fleet: Fleet) -> None:
    path = fleet.sim.publish(version=3)
    ctx = fleet.ctx
    with ctx.session() as s:
        with open(path, "rb") as f:
            ctx.registry.accept(s, f, uploaded_by="op", source="upload")
        s.commit()
        with open(path, "rb") as f, pytest.raises(ConflictError):
            ctx.registry.accept(s, f, uploaded_by="op", source="upload")
    assert _leftovers(fleet) == []


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda sim: sim.publish(version=3, signers=()), "unsigned"),
        (lambda sim: sim.publish(version=3, signers=("stranger",)), "untrusted_key"),
        (lambda sim: _flip_file_bytes(sim), "hash_mismatch"),
    ],
)
def test_a_bundle_that_does_not_verify_is_refused_and_leaves_nothing(
    fleet: Fleet, make: object, reason: str
) -> None:
    path = make(fleet.sim)  # type: ignore[operator]
    ctx = fleet.ctx
    with ctx.session() as s, open(path, "rb") as f:
        with pytest.raises(BundleRejectedError) as e:
            ctx.registry.accept(s, f, uploaded_by="op", source="upload")
        assert e.value.details["reason"] == reason
        assert s.query(Bundle).count() == 0
    assert _leftovers(fleet) == []
    assert [p for p in ctx.bundles.root.iterdir()] == []


def test_building_without_a_signing_key_says_how_to_configure_it(fleet: Fleet) -> None:
    ctx = fleet.ctx
    registry = BundleRegistry(ctx.bundles, ctx.trust_store, max_upload_bytes=1 << 20)
    req = BuildRequest(name="m", version=1, filename="m.onnx", targets=[("onnx", ("cam",))])
    with ctx.session() as s, pytest.raises(ServiceUnavailableError) as e:
        registry.build(s, io.BytesIO(b"not used"), req, uploaded_by="op")
    assert "EDGEFLEET_SERVER_SIGNING_KEY" in str(e.value)
