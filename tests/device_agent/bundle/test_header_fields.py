"""Every header byte of a bundle has one accepted value: field-by-field attacks.

Each attack edits one field of one member header of a real signed bundle and
recomputes the header checksum, as an attacker on the wire would. Every edit
must be refused with a :class:`BundleError` subclass (never a bare
``ValueError``), and the untouched bundle must still verify.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest

from device_agent.bundle import BundleError, HeaderFieldError, TrustStore, verify_bundle
from device_agent.bundle.container import BLOCK, ByteSource, iter_headers, padding_size
from device_agent.bundle.errors import ManifestError, UnsafeMemberTypeError, UnsafePathError
from device_agent.bundle.manifest import Manifest, canonical_json
from tests.bundlesim import NOW, BundleSim

ROOT = Path(__file__).resolve().parents[3]
BIN = Path(sys.executable).parent


def header_offsets(data: bytes) -> dict[str, int]:
    """Offset of each member's header block, by member name."""
    src = ByteSource(io.BytesIO(data))
    out: dict[str, int] = {}
    for h in iter_headers(src, 64):
        out[h.name] = h.offset - BLOCK
        src.read_exact(h.size + padding_size(h.size), h.name)
    return out


def with_field(data: bytes, member: str, start: int, value: bytes) -> bytes:
    """``data`` with bytes ``start..`` of ``member``'s header replaced, checksum recomputed."""
    off = header_offsets(data)[member]
    block = bytearray(data[off : off + BLOCK])
    block[start : start + len(value)] = value
    block[148:156] = b"        "
    block[148:156] = b"%06o\0 " % sum(block)
    return data[:off] + bytes(block) + data[off + BLOCK :]


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, TrustStore, BundleSim]:
    sim = BundleSim(Path(tmp_path_factory.mktemp("hdr")))
    # valid for years: the CLI tests judge expiry by the real clock
    bundle = sim.publish(version=3, valid_for=timedelta(days=3650))
    return bundle.read_bytes(), sim.trust("release"), sim


def _size_field(n: int) -> bytes:
    return b"%011o\0" % n


ATTACKS: dict[str, tuple[str, int, Callable[[bytes], bytes]]] = {
    # name: (member, field offset, new bytes from the old field)
    "negative_size": ("manifest.json", 124, lambda f: b"-0000000001\0"),
    "plus_sign_size": ("manifest.json", 124, lambda f: b"+" + f[1:]),
    "underscore_size": ("manifest.json", 124, lambda f: b"0_" + f[2:]),
    "space_padded_size": ("manifest.json", 124, lambda f: b" " + f[1:]),
    "space_terminated_size": ("manifest.json", 124, lambda f: f[:11] + b" "),
    "unterminated_size": ("manifest.json", 124, lambda f: b"0" + f[:11]),
    "base256_size": ("manifest.json", 124, lambda f: b"\x80" + bytes(10) + bytes([len(f)])),
    "non_octal_digit_size": ("model.onnx", 124, lambda f: b"9" + f[1:]),
    "setuid_mode": ("model.onnx", 100, lambda f: b"0004755\0"),
    "exec_mode": ("model.onnx", 100, lambda f: b"0000755\0"),
    "nonzero_uid": ("model.onnx", 108, lambda f: b"0001750\0"),
    "nonzero_gid": ("model.onnx", 116, lambda f: b"0001750\0"),
    "nonzero_mtime": ("model.onnx", 136, lambda f: b"15000000000\0"),
    "mtime_space_form": ("model.onnx", 136, lambda f: b" 0000000000\0"),
    "uname_set": ("model.onnx", 265, lambda f: b"root"),
    "gname_set": ("model.onnx", 297, lambda f: b"wheel"),
    "linkname_set": ("model.onnx", 157, lambda f: b"/etc/passwd"),
    "devmajor_set": ("model.onnx", 329, lambda f: b"0000001\0"),
    "devminor_set": ("model.onnx", 337, lambda f: b"0000003\0"),
    "prefix_set": ("model.onnx", 345, lambda f: b"x"),
    "header_padding_nonzero": ("model.onnx", 505, lambda f: b"\x01"),
    "bytes_after_name_nul": ("model.onnx", 60, lambda f: b"hidden"),
    "manifest_bytes_after_name_nul": ("manifest.json", 99, lambda f: b"!"),
    "typeflag_nul": ("model.onnx", 156, lambda f: b"\0"),
}


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_hostile_header_field_is_refused(
    name: str, signed: tuple[bytes, TrustStore, BundleSim]
) -> None:
    data, trust, _ = signed
    member, start, make = ATTACKS[name]
    off = header_offsets(data)[member]
    old = data[off + start : off + start + 12]
    hostile = with_field(data, member, start, make(old))
    assert hostile != data
    with pytest.raises(BundleError) as info:
        verify_bundle(io.BytesIO(hostile), trust, now=NOW)
    expected = {"typeflag_nul": UnsafeMemberTypeError, "prefix_set": UnsafePathError}.get(
        name, HeaderFieldError
    )
    assert isinstance(info.value, expected), (name, type(info.value), info.value)


def test_untouched_bundle_verifies(signed: tuple[bytes, TrustStore, BundleSim]) -> None:
    data, trust, _ = signed
    assert verify_bundle(io.BytesIO(data), trust, now=NOW).manifest.version == 3


def test_writer_emits_only_the_accepted_field_forms(
    signed: tuple[bytes, TrustStore, BundleSim],
) -> None:
    data, _, _ = signed
    for off in header_offsets(data).values():
        block = data[off : off + BLOCK]
        assert block[100:108] == b"0000644\0"
        assert block[136:148] == b"00000000000\0"
        assert block[124:135].isdigit() and block[135:136] == b"\0"


def _resign(sim: BundleSim, data: bytes, edit: Callable[[str], str]) -> bytes:
    """Replace manifest.json with edited bytes and sign them with the trusted key."""
    from device_agent.bundle.trust import Signature, encode_signatures

    offs = header_offsets(data)
    src = ByteSource(io.BytesIO(data))
    members: list[tuple[str, bytes]] = []
    for h in iter_headers(src, 64):
        members.append((h.name, src.read_exact(h.size, h.name)))
        src.read_exact(padding_size(h.size), h.name)
    assert offs
    mtext = edit(members[0][1].decode())
    mbytes = mtext.encode()
    key = sim.key("release")
    from device_agent.bundle.trust import key_id

    sig = encode_signatures([Signature(keyid=key_id(key.public_key()), sig=key.sign(mbytes))])
    members[0] = ("manifest.json", mbytes)
    members[1] = ("manifest.sig", sig)
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for n, d in members:
            info = tarfile.TarInfo(n)
            info.size, info.mode, info.mtime = len(d), 0o644, 0
            tar.addfile(info, io.BytesIO(d))
    return buf.getvalue()


@pytest.mark.parametrize(
    "name,edit",
    [
        ("huge_float_version", lambda t: t.replace('"version":3', '"version":1e400')),
        (
            "five_thousand_digit_version",
            lambda t: t.replace('"version":3', '"version":' + "9" * 5000),
        ),
        (
            "huge_float_in_provenance",
            lambda t: t.replace('"provenance":{', '"provenance":{"x":1e400,'),
        ),
        ("nan_in_labels", lambda t: t.replace('"labels":{}', '"labels":NaN')),
        (
            "deeply_nested_provenance",
            lambda t: t.replace(
                '"provenance":{', '"provenance":{"x":' + "[" * 50000 + "]" * 50000 + ","
            ),
        ),
    ],
)
def test_trusted_manifest_with_hostile_number_is_refused_as_bundle_error(
    name: str, edit: Callable[[str], str], signed: tuple[bytes, TrustStore, BundleSim]
) -> None:
    data, trust, sim = signed
    hostile = _resign(sim, data, edit)
    with pytest.raises(ManifestError):
        verify_bundle(io.BytesIO(hostile), trust, now=NOW)


def test_manifest_parser_accepts_ordinary_numbers() -> None:
    obj = json.loads(canonical_json({"a": 1.5, "b": -7, "c": 10**18}))
    assert obj["c"] == 10**18
    with pytest.raises(ManifestError):
        Manifest.from_bytes(b'{"version":' + b"1" * 30 + b"}")


def test_cli_bundle_verify_refuses_negative_size_with_exit_1(
    signed: tuple[bytes, TrustStore, BundleSim], tmp_path: Path
) -> None:
    data, trust, _ = signed
    bad = tmp_path / "negative.efb"
    bad.write_bytes(with_field(data, "manifest.json", 124, b"-0000000001\0"))
    trust_file = tmp_path / "trust.json"
    trust.save(trust_file)
    for cmd in (
        [str(BIN / "edgefleet"), "bundle", "verify", str(bad), "--trust-store", str(trust_file)],
        [str(BIN / "edgefleet-agent"), "verify", str(bad), "--trust-store", str(trust_file)],
    ):
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1, (cmd, proc.stdout, proc.stderr)
        assert "bad_header_field" in proc.stderr or "HeaderFieldError" in proc.stderr, proc.stderr


def test_agent_install_refuses_negative_size_then_installs_good_bundle(
    signed: tuple[bytes, TrustStore, BundleSim], tmp_path: Path
) -> None:
    from click.testing import CliRunner

    from device_agent.cli import main as agent_cli

    data, trust, sim = signed
    trust_file = tmp_path / "trust.json"
    trust.save(trust_file)
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[device]\nstate_dir = "{tmp_path / "state"}"\ntrust_store = "{trust_file}"\n')
    bad = tmp_path / "negative.efb"
    bad.write_bytes(with_field(data, "manifest.json", 124, b"-0000000001\0"))
    good = tmp_path / "good.efb"
    good.write_bytes(data)
    runner = CliRunner()
    refused = runner.invoke(agent_cli, ["--config", str(cfg), "install", str(bad)], env={})
    assert refused.exit_code == 1 and "[bad_header_field]" in refused.output, refused.output
    state = json.loads((tmp_path / "state" / "update.json").read_text())
    assert state["state"] == "idle", "nothing is left half-done for the next start"
    installed = runner.invoke(agent_cli, ["--config", str(cfg), "install", str(good)], env={})
    assert installed.exit_code == 0, installed.output
    status = runner.invoke(agent_cli, ["--config", str(cfg), "status", "--json"], env={})
    assert status.exit_code == 0 and json.loads(status.output)["active"]["version"] == 3
