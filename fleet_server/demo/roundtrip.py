"""The README's main job: a guided round-trip through a signed model bundle.

Makes a release key and a device trust store, builds a tiny real ONNX model,
packs and signs it into a bundle, verifies and installs it as a device would,
runs the installed model, then tampers with the bundle in several ways and
shows each refusal. Everything goes into ``--workdir`` (default
``./demo-output``).
"""

from __future__ import annotations

import shutil
import sys
import tarfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

import click
import numpy as np

from converters.bundle import BundleFile, build_manifest, pack_bundle, sign_bundle
from converters.introspect import model_signature
from converters.keys import KeyStore
from device_agent.bundle import BundleError, TrustStore, unpack_bundle, verify_file
from device_agent.bundle.manifest import canonical_json
from device_agent.model import load_model


def _tiny_model(path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(7)
    w1 = numpy_helper.from_array(rng.normal(size=(4, 8)).astype(np.float32), "W1")
    w2 = numpy_helper.from_array(rng.normal(size=(8, 3)).astype(np.float32), "W2")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W1"], ["h"]),
            helper.make_node("Relu", ["h"], ["hr"]),
            helper.make_node("MatMul", ["hr", "W2"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
        ],
        "demo-mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", 3])],
        [w1, w2],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _step(n: int, text: str) -> None:
    click.secho(f"\n[{n}] {text}", bold=True)


def _tamper(src: Path, dst: Path, how: str) -> Path:
    data = bytearray(src.read_bytes())
    if how == "flip":
        with tarfile.open(src) as tar:
            model = tar.getmember("model.onnx")
            data[model.offset_data + model.size // 2] ^= 0xFF
        dst.write_bytes(bytes(data))
    elif how == "truncate":
        dst.write_bytes(bytes(data[: len(data) // 2]))
    return dst


def run_roundtrip(workdir: Path) -> None:
    """Guided bundle round-trip: keys, pack, sign, verify, install, predict, tamper."""
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    keys = KeyStore(workdir / "keys")

    _step(1, "Operator: generate a release signing key and a device trust store")
    key = keys.generate("release-2026")
    trust = TrustStore()
    trust.add(keys.public_key(key.keyid), comment="release-2026")
    trust.save(workdir / "trust.json")
    click.echo(f"    key {key.keyid} (private key mode 0600), trust store {workdir / 'trust.json'}")

    _step(2, "Operator: build a tiny ONNX model and pack it into a bundle")
    model_path = workdir / "demo-mlp.onnx"
    _tiny_model(model_path)
    inputs, outputs, runtime = model_signature(model_path, "onnx")
    profile = workdir / "drift_profile.json"
    profile.write_bytes(canonical_json({"placeholder": True, "schema_version": 1}))
    smoke = workdir / "smoke_samples.json"
    smoke.write_bytes(canonical_json({"placeholder": True, "schema_version": 1}))
    files = [
        BundleFile(model_path, "model.onnx", "model"),
        BundleFile(profile, "drift_profile.json", "drift_profile"),
        BundleFile(smoke, "smoke_samples.json", "smoke_samples"),
    ]
    manifest = build_manifest(
        name="demo-mlp",
        version=1,
        fmt="onnx",
        files=files,
        inputs=inputs,
        outputs=outputs,
        runtime=runtime,
        target_device_classes=["x86_64-gateway"],
    )
    bundle = pack_bundle(workdir / "demo-mlp-v1.efb", manifest, files)
    click.echo(f"    {bundle} ({bundle.stat().st_size} bytes, unsigned)")

    _step(3, "Operator: sign the bundle")
    sig = sign_bundle(bundle, keys.private_key(key.keyid))
    click.echo(f"    signed by {sig.keyid}")

    _step(4, "Device: verify and install into slot A, then predict")
    v = unpack_bundle(bundle, workdir / "device" / "slots" / "a", trust)
    click.echo(f"    verified {v.manifest.name} v{v.manifest.version}, signed by {v.signed_by[0]}")
    loaded = load_model(workdir / "device" / "slots" / "a", "a")
    x = np.array([[0.5, -1.0, 2.0, 0.1]], dtype=np.float32)
    probs = loaded.run({"x": x})[0]
    shown = ", ".join(f"{p:.4f}" for p in probs[0])
    click.echo(f"    predict([0.5, -1.0, 2.0, 0.1]) -> class probabilities [{shown}]")

    _step(5, "Attacker: tamper with the bundle; the device refuses each one")
    attacker = KeyStore(workdir / "attacker-keys")
    attacker_key = attacker.generate("attacker")
    forged = workdir / "forged.efb"
    pack_bundle(forged, manifest, files)  # same content, signed only by the attacker
    sign_bundle(forged, attacker.private_key(attacker_key.keyid))
    cases = [
        ("one model byte flipped", _tamper(bundle, workdir / "flipped.efb", "flip"), None),
        (
            "cut off half-way (interrupted download)",
            _tamper(bundle, workdir / "truncated.efb", "truncate"),
            None,
        ),
        ("signed only by an untrusted key", forged, None),
        (
            "replayed after expiry (freeze)",
            bundle,
            datetime.now(timezone.utc) + timedelta(days=365),
        ),
    ]
    refused = 0
    for label, path, at in cases:
        try:
            verify_file(path, trust, now=at)
            click.secho(f"    {label}: ACCEPTED (unexpected)", fg="red")
        except BundleError as e:
            refused += 1
            click.echo(f"    {label}: refused, {type(e).__name__} [{e.code}]")
            click.echo(f"        {e}")
    click.echo(f"    slot A still serves v{load_model(workdir / 'device' / 'slots' / 'a').version}")

    click.secho(
        f"\nround-trip complete: {refused}/{len(cases)} attacks refused; "
        f"files in {workdir.resolve()}",
        fg="green" if refused == len(cases) else "red",
    )
    if refused != len(cases):
        sys.exit(1)
