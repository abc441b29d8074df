"""A bundle "repository simulator" for tests: publishes, signs, rotates keys
and tampers with bundles at the byte level, like an attacker would."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from converters.bundle import BundleFile, build_manifest, pack_bundle, sign_bundle
from device_agent.bundle import Manifest, TrustStore
from device_agent.bundle.manifest import canonical_json

NOW = datetime(2026, 11, 22, 12, 0, 0, tzinfo=timezone.utc)


def tiny_onnx_model(seed: int = 0, n_in: int = 4, n_out: int = 3) -> bytes:
    """A real ONNX model (Gemm + Softmax) whose weights depend on ``seed``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.normal(size=(n_in, n_out)).astype(np.float32), "W")
    b = numpy_helper.from_array(rng.normal(size=(n_out,)).astype(np.float32), "B")
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["x", "W", "B"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
        ],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", n_in])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", n_out])],
        [w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


@dataclass
class BundleSim:
    """Makes real signed bundles in ``root`` and tampers with them."""

    root: Path
    keys: dict[str, Ed25519PrivateKey] = field(default_factory=dict)

    def key(self, name: str) -> Ed25519PrivateKey:
        if name not in self.keys:
            self.keys[name] = Ed25519PrivateKey.generate()
        return self.keys[name]

    def trust(self, *names: str, threshold: int = 1, revoked: tuple[str, ...] = ()) -> TrustStore:
        store = TrustStore(threshold=threshold)
        for n in names:
            store.add(self.key(n).public_key(), comment=n)
        for n in revoked:
            kid = store.add(self.key(n).public_key(), comment=n)
            store.revoke(kid)
        return store

    def publish(
        self,
        *,
        version: int = 2,
        seed: int = 0,
        signers: tuple[str, ...] = ("release",),
        created: datetime = NOW - timedelta(days=1),
        valid_for: timedelta = timedelta(days=30),
        name: str = "tiny",
        model_bytes: bytes | None = None,
    ) -> Path:
        d = self.root / f"src-{name}-{version}-{seed}-{len(signers)}"
        d.mkdir(parents=True, exist_ok=True)
        model = d / "model.onnx"
        model.write_bytes(model_bytes if model_bytes is not None else tiny_onnx_model(seed))
        profile = d / "drift_profile.json"
        profile.write_bytes(canonical_json({"placeholder": True, "schema_version": 1}))
        smoke = d / "smoke_samples.json"
        smoke.write_bytes(canonical_json({"placeholder": True, "schema_version": 1}))
        files = [
            BundleFile(model, "model.onnx", "model"),
            BundleFile(profile, "drift_profile.json", "drift_profile"),
            BundleFile(smoke, "smoke_samples.json", "smoke_samples"),
        ]
        manifest = build_manifest(
            name=name,
            version=version,
            fmt="onnx",
            files=files,
            created_at=created,
            valid_for=valid_for,
            runtime={"engine": "onnxruntime", "onnx_ir_version": 8},
        )
        out = self.root / f"{name}-v{version}-s{seed}-{'-'.join(signers) or 'unsigned'}.efb"
        pack_bundle(out, manifest, files)
        for s in signers:
            sign_bundle(out, self.key(s))
        return out


# -- byte-level tampering ---------------------------------------------------

Member = tuple[tarfile.TarInfo, bytes]


def read_members(path: Path) -> list[Member]:
    out = []
    with tarfile.open(path, "r:") as tar:
        for info in tar.getmembers():
            fh = tar.extractfile(info) if info.isreg() else None
            out.append((info, fh.read() if fh else b""))
    return out


def write_members(path: Path, members: list[Member]) -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for info, data in members:
            info = _copy(info)
            if info.isreg():
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    path.write_bytes(buf.getvalue())
    return path


def _copy(info: tarfile.TarInfo) -> tarfile.TarInfo:
    new = tarfile.TarInfo(info.name)
    for attr in (
        "size",
        "mode",
        "mtime",
        "type",
        "linkname",
        "uid",
        "gid",
        "uname",
        "gname",
        "devmajor",
        "devminor",
    ):
        setattr(new, attr, getattr(info, attr))
    return new


def rewrite(src: Path, dst: Path, fn: Callable[[list[Member]], list[Member]]) -> Path:
    return write_members(dst, fn(read_members(src)))


def member(
    name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, linkname: str = ""
) -> Member:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.mode = 0o644
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = 1, 3
    return info, data


def replace_data(members: list[Member], name: str, data: bytes) -> list[Member]:
    return [(i, data if i.name == name else d) for i, d in members]


def edit_manifest(members: list[Member], fn: Callable[[dict], None]) -> list[Member]:
    """Edit the manifest JSON and re-encode it canonically, keeping the old signature."""
    out = []
    for info, data in members:
        if info.name == "manifest.json":
            obj = Manifest.from_bytes(data).to_json()
            fn(obj)
            data = canonical_json(obj)
        out.append((info, data))
    return out
