"""Rollback bundles: the previous model under a new version that devices accept."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from device_agent.bundle import RollbackError, key_id, verify_file
from fleet_server.rollouts import BundleRef, RepublishError, RolloutSpec
from fleet_server.rollouts.republish import republish_bundle
from tests.bundlesim import NOW, BundleSim, read_members, replace_data, rewrite


def model_bytes(path: Path) -> bytes:
    return dict((i.name, d) for i, d in read_members(path))["model.onnx"]


def test_rollback_bundle_is_accepted_where_the_old_bundle_is_refused(
    sim: BundleSim, tmp_path: Path
) -> None:
    old = sim.publish(version=3, seed=0)
    candidate = sim.publish(version=4, seed=1)
    server_key = sim.key("server")
    device_trust = sim.trust("release", "server")
    spec = RolloutSpec("r-1", BundleRef("b-new", "tiny", 4), BundleRef("b-old", "tiny", 3), {})
    out = tmp_path / "rb.efb"

    manifest = republish_bundle(
        old,
        version=spec.rollback_version(),
        out=out,
        signing_key=server_key,
        trust=sim.trust("release"),
        now=NOW,
    )

    # a device that installed the candidate (v4) refuses the old bundle ...
    assert verify_file(candidate, device_trust, now=NOW).manifest.version == 4
    with pytest.raises(RollbackError):
        verify_file(old, device_trust, now=NOW, installed_version=4)
    # ... and accepts the re-published one, which carries the old model byte for byte
    verified = verify_file(out, device_trust, now=NOW, installed_version=4)
    assert verified.manifest.version == 5 == manifest.version
    assert model_bytes(out) == model_bytes(old) != model_bytes(candidate)
    assert verified.manifest.provenance["republished_from"]["version"] == 3
    assert verified.signed_by == (key_id(server_key.public_key()),)


def test_expired_previous_bundle_can_still_be_republished(sim: BundleSim, tmp_path: Path) -> None:
    old = sim.publish(version=3, created=NOW - timedelta(days=400), valid_for=timedelta(days=30))
    out = tmp_path / "rb.efb"
    republish_bundle(
        old, version=5, out=out, signing_key=sim.key("server"), trust=sim.trust("release"), now=NOW
    )
    assert verify_file(out, sim.trust("server"), now=NOW, installed_version=4).manifest.version == 5


def test_tampered_previous_bundle_is_not_resigned(sim: BundleSim, tmp_path: Path) -> None:
    old = sim.publish(version=3)
    bad = rewrite(
        old,
        tmp_path / "bad.efb",
        lambda m: replace_data(m, "model.onnx", b"\0" * len(model_bytes(old))),
    )
    out = tmp_path / "rb.efb"
    with pytest.raises(RepublishError, match="does not verify"):
        republish_bundle(
            bad,
            version=5,
            out=out,
            signing_key=sim.key("server"),
            trust=sim.trust("release"),
            now=NOW,
        )
    assert not out.exists()


def test_previous_bundle_from_untrusted_key_is_not_resigned(sim: BundleSim, tmp_path: Path) -> None:
    old = sim.publish(version=3, signers=("mallory",))
    with pytest.raises(RepublishError, match="untrusted_key"):
        republish_bundle(
            old,
            version=5,
            out=tmp_path / "rb.efb",
            signing_key=sim.key("server"),
            trust=sim.trust("release"),
            now=NOW,
        )


def test_republish_refuses_a_version_not_above_the_previous(sim: BundleSim, tmp_path: Path) -> None:
    old = sim.publish(version=3)
    with pytest.raises(RepublishError, match="must be above"):
        republish_bundle(
            old,
            version=3,
            out=tmp_path / "rb.efb",
            signing_key=sim.key("server"),
            trust=sim.trust("release"),
            now=NOW,
        )


def test_republish_of_missing_file_says_so(sim: BundleSim, tmp_path: Path) -> None:
    with pytest.raises(RepublishError, match="cannot read previous bundle"):
        republish_bundle(
            tmp_path / "nope.efb",
            version=3,
            out=tmp_path / "rb.efb",
            signing_key=sim.key("server"),
            trust=sim.trust("release"),
            now=NOW,
        )
