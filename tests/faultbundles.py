"""Signed bundles for fault tests: real smoke samples, plus an ``extra`` member of a
chosen size so a download or a staging can be made to outgrow a small disk."""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from converters.bundle import BundleFile, build_manifest, pack_bundle, sign_bundle
from device_agent.bundle.manifest import canonical_json
from device_agent.payloads import SmokeSamples
from tests.bundlesim import NOW, BundleSim, tiny_onnx_model
from tests.httpfixtures import SMOKE_INPUT, reference_outputs


def publish_padded(
    sim: BundleSim,
    *,
    version: int,
    seed: int,
    extra_bytes: int,
    created: datetime = NOW - timedelta(days=1),
    valid_for: timedelta = timedelta(days=3650),
    name: str = "tiny",
) -> Path:
    """A signed bundle of ``tiny_onnx_model(seed)`` with an ``extra`` member of
    ``extra_bytes`` random bytes (incompressible, so it really takes the space)."""
    d = sim.root / f"padded-{name}-{version}-{seed}-{extra_bytes}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "model.onnx").write_bytes(tiny_onnx_model(seed))
    smoke: dict[str, Any] = SmokeSamples(
        inputs={"x": SMOKE_INPUT},
        expected={"probs": reference_outputs(seed)},
        atol=1e-5,
        rtol=1e-4,
    ).to_json()
    (d / "smoke_samples.json").write_bytes(canonical_json(smoke))
    (d / "drift_profile.json").write_bytes(
        canonical_json({"placeholder": True, "schema_version": 1})
    )
    (d / "padding.bin").write_bytes(os.urandom(extra_bytes))
    files = [
        BundleFile(d / "model.onnx", "model.onnx", "model"),
        BundleFile(d / "drift_profile.json", "drift_profile.json", "drift_profile"),
        BundleFile(d / "smoke_samples.json", "smoke_samples.json", "smoke_samples"),
        BundleFile(d / "padding.bin", "padding.bin", "extra"),
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
    out = d / f"{name}-v{version}.efb"
    pack_bundle(out, manifest, files)
    sign_bundle(out, sim.key("release"))
    return out
