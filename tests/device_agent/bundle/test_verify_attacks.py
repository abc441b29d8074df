"""Every attack from the design brief, by name, against the real verifier.

Each case builds a real signed bundle with the simulator, attacks it at the
byte level, then checks three things: the named error class is raised, its
message tells a person what to do, and an existing install is left exactly
as it was (no partial files, no leftovers).
"""

from __future__ import annotations

import hashlib
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest

from device_agent.bundle import (
    BadSignatureError,
    BundleError,
    ExpiredBundleError,
    MemberHashMismatchError,
    MemberSizeMismatchError,
    MissingMemberError,
    OversizedMemberError,
    RevokedKeyError,
    RollbackError,
    ThresholdNotMetError,
    TruncatedBundleError,
    TrustStore,
    UnlistedMemberError,
    UnsafeMemberTypeError,
    UnsafePathError,
    UnsignedBundleError,
    UntrustedKeyError,
    VerifyLimits,
    unpack_bundle,
    verify_file,
)
from tests.bundlesim import (
    NOW,
    BundleSim,
    edit_manifest,
    member,
    read_members,
    replace_data,
    rewrite,
    tiny_onnx_model,
)
from tests.tmpfs import tmpfs

INSTALLED_VERSION = 2


@dataclass
class Attack:
    """One attack: how to build the hostile bundle and what the device must say."""

    build: Callable[[BundleSim, Path], Path]
    error: type[BundleError]
    trust: Callable[[BundleSim], TrustStore] = lambda sim: sim.trust("release")
    limits: VerifyLimits | None = None
    hint: str = ""  # a word the message must contain so the user knows what to do


def _good(sim: BundleSim, tmp: Path, version: int = 3) -> Path:
    return sim.publish(version=version, seed=version)


def unsigned_bundle(sim: BundleSim, tmp: Path) -> Path:
    return sim.publish(version=3, signers=())


def bundle_without_signature_member(sim: BundleSim, tmp: Path) -> Path:
    return rewrite(
        _good(sim, tmp),
        tmp / "nosig.efb",
        lambda ms: [m for m in ms if m[0].name != "manifest.sig"],
    )


def signature_by_untrusted_key(sim: BundleSim, tmp: Path) -> Path:
    return sim.publish(version=3, signers=("attacker",))


def signature_by_revoked_key(sim: BundleSim, tmp: Path) -> Path:
    return sim.publish(version=3, signers=("old-release",))


def one_model_byte_changed(sim: BundleSim, tmp: Path) -> Path:
    def flip(ms):
        out = []
        for info, data in ms:
            if info.name == "model.onnx":
                data = bytearray(data)
                data[len(data) // 2] ^= 0x01
                data = bytes(data)
            out.append((info, data))
        return out

    return rewrite(_good(sim, tmp), tmp / "flip.efb", flip)


def manifest_edited_after_signing(sim: BundleSim, tmp: Path) -> Path:
    return rewrite(
        _good(sim, tmp),
        tmp / "edited.efb",
        lambda ms: edit_manifest(ms, lambda m: m.update(version=99)),
    )


def mix_and_match_file_from_other_bundle(sim: BundleSim, tmp: Path) -> Path:
    # two validly signed bundles of the same model; the second's model (same size,
    # other weights) is swapped into the first
    first = sim.publish(version=3, seed=3)
    other = sim.publish(version=4, seed=4)
    other_model = dict((i.name, d) for i, d in read_members(other))["model.onnx"]
    return rewrite(first, tmp / "mix.efb", lambda ms: replace_data(ms, "model.onnx", other_model))


def rollback_to_older_version(sim: BundleSim, tmp: Path) -> Path:
    return sim.publish(version=INSTALLED_VERSION - 1, seed=1)


def freeze_with_expired_bundle(sim: BundleSim, tmp: Path) -> Path:
    return sim.publish(version=3, created=NOW - timedelta(days=40), valid_for=timedelta(days=30))


def endless_data_member_larger_than_manifest(sim: BundleSim, tmp: Path) -> Path:
    def grow(ms):
        return [(i, d + b"\0" * 4096 if i.name == "model.onnx" else d) for i, d in ms]

    return rewrite(_good(sim, tmp), tmp / "endless.efb", grow)


def endless_data_member_over_cap(sim: BundleSim, tmp: Path) -> Path:
    return sim.publish(version=3, model_bytes=b"\x01" * (256 * 1024))


def member_shorter_than_manifest(sim: BundleSim, tmp: Path) -> Path:
    return rewrite(
        _good(sim, tmp),
        tmp / "short.efb",
        lambda ms: [(i, d[:-10] if i.name == "model.onnx" else d) for i, d in ms],
    )


def _append(name: str, extra):
    def build(sim: BundleSim, tmp: Path) -> Path:
        return rewrite(_good(sim, tmp), tmp / f"{name}.efb", lambda ms: ms + [extra])

    return build


def _replace_model_with(kind: bytes, linkname: str = ""):
    def build(sim: BundleSim, tmp: Path) -> Path:
        return rewrite(
            _good(sim, tmp),
            tmp / "typed.efb",
            lambda ms: [
                member("model.onnx", kind=kind, linkname=linkname)
                if i.name == "model.onnx"
                else (i, d)
                for i, d in ms
            ],
        )

    return build


def missing_listed_file(sim: BundleSim, tmp: Path) -> Path:
    return rewrite(
        _good(sim, tmp),
        tmp / "missing.efb",
        lambda ms: [m for m in ms if m[0].name != "drift_profile.json"],
    )


def truncated_download(sim: BundleSim, tmp: Path) -> Path:
    data = _good(sim, tmp).read_bytes()
    out = tmp / "truncated.efb"
    out.write_bytes(data[: len(data) // 2])
    return out


ATTACKS: dict[str, Attack] = {
    "unsigned_bundle": Attack(unsigned_bundle, UnsignedBundleError, hint="sign"),
    "bundle_without_signature_member": Attack(
        bundle_without_signature_member, UnsignedBundleError, hint="sign"
    ),
    "signature_by_untrusted_key": Attack(
        signature_by_untrusted_key, UntrustedKeyError, hint="trust"
    ),
    "signature_by_revoked_key": Attack(
        signature_by_revoked_key,
        RevokedKeyError,
        trust=lambda sim: sim.trust("release", revoked=("old-release",)),
        hint="re-sign",
    ),
    "one_model_byte_changed": Attack(one_model_byte_changed, MemberHashMismatchError, hint="fetch"),
    "manifest_edited_after_signing": Attack(
        manifest_edited_after_signing, BadSignatureError, hint="re-sign"
    ),
    "mix_and_match_file_from_other_bundle": Attack(
        mix_and_match_file_from_other_bundle, MemberHashMismatchError, hint="swapped"
    ),
    "rollback_to_older_version": Attack(
        rollback_to_older_version, RollbackError, hint="higher version"
    ),
    "freeze_with_expired_bundle": Attack(
        freeze_with_expired_bundle, ExpiredBundleError, hint="freshly signed"
    ),
    "endless_data_member_larger_than_manifest": Attack(
        endless_data_member_larger_than_manifest, OversizedMemberError, hint="signed size"
    ),
    "endless_data_member_over_cap": Attack(
        endless_data_member_over_cap,
        OversizedMemberError,
        limits=VerifyLimits(max_member_bytes=64 * 1024),
        hint="cap",
    ),
    "member_shorter_than_manifest": Attack(
        member_shorter_than_manifest, MemberSizeMismatchError, hint="cut short"
    ),
    "path_traversal_dotdot_member": Attack(
        _append("dotdot", member("../x", b"pwned")), UnsafePathError, hint="outside"
    ),
    "path_traversal_absolute_member": Attack(
        _append("abs", member("/etc/x", b"pwned")), UnsafePathError, hint="outside"
    ),
    "symlink_member": Attack(
        _replace_model_with(tarfile.SYMTYPE, "/etc/passwd"),
        UnsafeMemberTypeError,
        hint="regular files",
    ),
    "hardlink_member": Attack(
        _replace_model_with(tarfile.LNKTYPE, "manifest.json"),
        UnsafeMemberTypeError,
        hint="regular files",
    ),
    "device_node_member": Attack(
        _replace_model_with(tarfile.CHRTYPE), UnsafeMemberTypeError, hint="regular files"
    ),
    "fifo_member": Attack(
        _replace_model_with(tarfile.FIFOTYPE), UnsafeMemberTypeError, hint="regular files"
    ),
    "extra_member_not_in_manifest": Attack(
        _append("extra", member("payload.sh", b"rm -rf /")),
        UnlistedMemberError,
        hint="after signing",
    ),
    "missing_listed_file": Attack(missing_listed_file, MissingMemberError, hint="rebuild"),
    "truncated_download": Attack(truncated_download, TruncatedBundleError, hint="again"),
    "threshold_not_met": Attack(
        lambda sim, tmp: sim.publish(version=3, signers=("release",)),
        ThresholdNotMetError,
        trust=lambda sim: sim.trust("release", "release-2", threshold=2),
        hint="signatures",
    ),
}


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def installed(sim: BundleSim, tmp_path: Path) -> Path:
    """A device install location already holding a verified v2 bundle."""
    dest = tmp_path / "device" / "slot-a"
    unpack_bundle(
        sim.publish(version=INSTALLED_VERSION, seed=INSTALLED_VERSION),
        dest,
        sim.trust("release"),
        now=NOW,
    )
    return dest


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attack_is_refused_with_named_error_and_install_untouched(
    name: str, sim: BundleSim, tmp_path: Path, installed: Path
) -> None:
    attack = ATTACKS[name]
    hostile = attack.build(sim, tmp_path)
    before = _tree_digest(installed.parent)

    with pytest.raises(attack.error) as info:
        unpack_bundle(
            hostile,
            installed,
            attack.trust(sim),
            now=NOW,
            installed_version=INSTALLED_VERSION,
            limits=attack.limits,
        )

    assert type(info.value) is attack.error, f"{name}: got {type(info.value).__name__}"
    assert attack.hint.lower() in str(info.value).lower(), str(info.value)
    assert _tree_digest(installed.parent) == before
    assert sorted(p.name for p in installed.parent.iterdir()) == ["slot-a"]


def test_good_bundle_verifies_and_replaces_install(sim: BundleSim, installed: Path) -> None:
    bundle = sim.publish(version=3, seed=3)
    verified = unpack_bundle(
        bundle, installed, sim.trust("release"), now=NOW, installed_version=INSTALLED_VERSION
    )
    assert verified.manifest.version == 3
    assert (installed / "model.onnx").read_bytes() == tiny_onnx_model(3)
    assert sorted(p.name for p in installed.iterdir()) == [
        "drift_profile.json",
        "manifest.json",
        "manifest.sig",
        "model.onnx",
        "smoke_samples.json",
    ]
    assert sorted(p.name for p in installed.parent.iterdir()) == ["slot-a"]


def test_reinstall_of_same_version_is_not_a_rollback(sim: BundleSim) -> None:
    bundle = sim.publish(version=INSTALLED_VERSION)
    v = verify_file(bundle, sim.trust("release"), now=NOW, installed_version=INSTALLED_VERSION)
    assert v.manifest.version == INSTALLED_VERSION


def test_key_rotation_accepts_new_key_and_old_key_until_revoked(sim: BundleSim) -> None:
    trust = sim.trust("release", "release-2026")
    assert verify_file(sim.publish(version=3, signers=("release-2026",)), trust, now=NOW)
    old = sim.publish(version=4, signers=("release",))
    assert verify_file(old, trust, now=NOW)
    trust.revoke(next(k for k, v in trust.keys.items() if v.comment == "release"))
    with pytest.raises(RevokedKeyError):
        verify_file(old, trust, now=NOW)


def test_threshold_two_of_three_accepts_two_distinct_signers(sim: BundleSim) -> None:
    trust = sim.trust("a", "b", "c", threshold=2)
    v = verify_file(sim.publish(version=3, signers=("a", "c")), trust, now=NOW)
    assert len(v.signed_by) == 2


def test_threshold_counts_a_key_signing_twice_once(sim: BundleSim, tmp_path: Path) -> None:
    from device_agent.bundle.trust import decode_signatures, encode_signatures

    bundle = sim.publish(version=3, signers=("a",))
    members = read_members(bundle)
    sigs = decode_signatures(members[1][1])
    doubled = rewrite(
        bundle,
        tmp_path / "doubled.efb",
        lambda ms: replace_data(ms, "manifest.sig", encode_signatures(sigs * 2)),
    )
    with pytest.raises(ThresholdNotMetError):
        verify_file(doubled, sim.trust("a", "b", threshold=2), now=NOW)


def test_trust_store_round_trips_through_its_file(sim: BundleSim, tmp_path: Path) -> None:
    trust = sim.trust("a", "b", threshold=2, revoked=("c",))
    trust.save(tmp_path / "trust.json")
    loaded = TrustStore.load(tmp_path / "trust.json")
    assert loaded.to_json() == trust.to_json()


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 192 KiB tmpfs, mounted for the test and unmounted after it."""
    with tmpfs(tmp_path / "tiny-disk", "192k") as mnt:
        yield mnt


def test_full_disk_refuses_staging_and_keeps_old_install(sim: BundleSim, tiny_disk: Path) -> None:
    """A disk too small for the new bundle: StagingError, old install intact, no leftovers."""
    from device_agent.bundle import StagingError

    installed = tiny_disk / "slot-a"
    unpack_bundle(sim.publish(version=2), installed, sim.trust("release"), now=NOW)
    before = _tree_digest(tiny_disk)
    big = sim.publish(version=3, model_bytes=bytes(range(256)) * 1024)  # 256 KiB model
    with pytest.raises(StagingError, match="free some space"):
        unpack_bundle(big, installed, sim.trust("release"), now=NOW)
    assert _tree_digest(tiny_disk) == before
    assert sorted(p.name for p in tiny_disk.iterdir()) == ["slot-a"]


def test_disk_filling_up_mid_write_leaves_no_partial_files(sim: BundleSim, tiny_disk: Path) -> None:
    """The space check passes but another writer fills the disk: ENOSPC is a StagingError."""
    from device_agent.bundle import StagingError

    installed = tiny_disk / "slot-a"
    unpack_bundle(sim.publish(version=2), installed, sim.trust("release"), now=NOW)
    bundle = sim.publish(version=3, model_bytes=bytes(range(256)) * 200)  # 50 KiB model
    # leave roughly 40 KiB free: enough for the pre-check's estimate to fail or the write to fail
    filler = tiny_disk / "filler"
    import shutil

    free = shutil.disk_usage(tiny_disk).free
    filler.write_bytes(b"\0" * max(0, free - 40 * 1024))
    before = _tree_digest(tiny_disk)
    with pytest.raises(StagingError):
        unpack_bundle(bundle, installed, sim.trust("release"), now=NOW)
    assert _tree_digest(tiny_disk) == before
    assert sorted(p.name for p in tiny_disk.iterdir()) == ["filler", "slot-a"]
