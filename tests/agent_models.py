"""Real models and signed, installed bundles for the agent's tests and benchmark.

* :func:`mlp_onnx` - the benchmark's tiny MLP, 16 -> 64 -> 64 -> 4 with softmax,
  input ``x`` ``[batch, 16]``, output ``probs``; weights depend on ``seed``.
* :func:`cnn_onnx` - a small CNN, input ``x`` ``[batch, 3, 32, 32]``, two
  3x3 convolutions with ReLU, global average pool, dense to 10 ``probs``.
* :func:`make_profile` - a drift reference profile from reference data.
* :func:`install` - pack, sign, verify and unpack a bundle into a slot directory,
  then :func:`device_agent.model.load_model` it: the path a real device takes.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np

from converters.bundle import BundleFile, build_manifest, pack_bundle, sign_bundle
from device_agent.bundle import TrustStore, unpack_bundle
from device_agent.bundle.manifest import canonical_json
from device_agent.model import LoadedModel, load_model
from device_agent.payloads import DriftProfile, FeatureProfile, OutputProfile, SmokeSamples


def _finish(graph: object) -> bytes:
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])  # type: ignore[arg-type]
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()  # type: ignore[no-any-return]


def mlp_onnx(seed: int = 0, n_in: int = 16, hidden: int = 64, n_out: int = 4) -> bytes:
    """Tiny MLP 16 -> 64 -> 64 -> 4 (Gemm/Relu, softmax); dynamic batch."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)

    def w(name: str, *shape: int) -> object:
        scale = 1.0 / np.sqrt(shape[0]) if len(shape) == 2 else 0.1
        return numpy_helper.from_array((rng.normal(size=shape) * scale).astype(np.float32), name)

    inits = [
        w("W1", n_in, hidden),
        w("B1", hidden),
        w("W2", hidden, hidden),
        w("B2", hidden),
        w("W3", hidden, n_out),
        w("B3", n_out),
    ]
    nodes = [
        helper.make_node("Gemm", ["x", "W1", "B1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["a1"]),
        helper.make_node("Gemm", ["a1", "W2", "B2"], ["h2"]),
        helper.make_node("Relu", ["h2"], ["a2"]),
        helper.make_node("Gemm", ["a2", "W3", "B3"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", n_in])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", n_out])],
        inits,  # type: ignore[arg-type]
    )
    return _finish(graph)


def cnn_onnx(seed: int = 0, channels: int = 16, classes: int = 10) -> bytes:
    """Small CNN on ``[batch, 3, 32, 32]``: conv3x3-relu, conv3x3(stride 2)-relu, GAP, dense."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)

    def arr(name: str, shape: tuple[int, ...], fan_in: int) -> object:
        a = rng.normal(size=shape) / np.sqrt(fan_in)
        return numpy_helper.from_array(a.astype(np.float32), name)

    c = channels
    inits = [
        arr("K1", (c, 3, 3, 3), 27),
        arr("C1", (c,), 27),
        arr("K2", (c, c, 3, 3), 9 * c),
        arr("C2", (c,), 9 * c),
        arr("W", (c, classes), c),
        arr("B", (classes,), c),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "K1", "C1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "K2", "C2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "W", "B"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 32, 32])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", classes])],
        inits,  # type: ignore[arg-type]
    )
    return _finish(graph)


def make_profile(
    x: np.ndarray,
    preds: np.ndarray | None,
    *,
    input_name: str = "x",
    output_name: str = "probs",
    bins: int = 10,
    reduction: str = "none",
) -> DriftProfile:
    """Quantile-binned reference profile of ``x`` ``[n, ...]`` and class predictions."""
    from device_agent.telemetry.stats import binned_counts, reduce_features

    feats = reduce_features(x, reduction)
    out = []
    for i in range(feats.shape[1]):
        edges = np.unique(np.quantile(feats[:, i], np.linspace(0, 1, bins + 1)[1:-1]))
        counts = binned_counts(feats[:, i], edges)
        out.append(
            FeatureProfile(
                f"f{i}", i, tuple(map(float, edges)), tuple(map(float, counts / counts.sum()))
            )
        )
    output = None
    if preds is not None:
        classes = preds.shape[-1]
        c = np.bincount(preds.argmax(-1), minlength=classes)
        output = OutputProfile(
            output_name, "classification", tuple(map(float, c / c.sum())), classes=classes
        )
    return DriftProfile(
        input=input_name,
        features=tuple(out),
        output=output,
        reduction=reduction,
        sample_count=len(x),
    )


def make_bundle(
    root: Path,
    key: object,
    *,
    model_bytes: bytes,
    fmt: str = "onnx",
    name: str = "m",
    version: int = 1,
    profile: DriftProfile | None = None,
    smoke: SmokeSamples | None = None,
) -> Path:
    """Pack and sign a real bundle file."""
    src = root / f"src-{name}-{version}-{fmt}"
    src.mkdir(parents=True, exist_ok=True)
    model_name = f"model.{fmt}"
    (src / model_name).write_bytes(model_bytes)
    placeholder = {"placeholder": True, "schema_version": 1}
    (src / "drift_profile.json").write_bytes(
        canonical_json(profile.to_json() if profile else placeholder)
    )
    (src / "smoke_samples.json").write_bytes(
        canonical_json(smoke.to_json() if smoke else placeholder)
    )
    files = [
        BundleFile(src / model_name, model_name, "model"),
        BundleFile(src / "drift_profile.json", "drift_profile.json", "drift_profile"),
        BundleFile(src / "smoke_samples.json", "smoke_samples.json", "smoke_samples"),
    ]
    created = datetime.now(timezone.utc) - timedelta(hours=1)
    manifest = build_manifest(
        name=name,
        version=version,
        fmt=fmt,
        files=files,
        created_at=created,
        valid_for=timedelta(days=30),
        runtime={"engine": "onnxruntime" if fmt == "onnx" else "tflite"},
    )
    out = root / f"{name}-v{version}.{fmt}.efb"
    pack_bundle(out, manifest, files)
    sign_bundle(out, key)  # type: ignore[arg-type]
    return out


def install(bundle: Path, slot_dir: Path, trust: TrustStore, slot: str = "a") -> LoadedModel:
    """Verify and unpack ``bundle`` into ``slot_dir`` and load it."""
    unpack_bundle(bundle, slot_dir, trust)
    return load_model(slot_dir, slot)


def smoke_for(model_bytes: bytes, x: np.ndarray) -> SmokeSamples:
    """Smoke samples: ``x`` and what onnxruntime computes for it."""
    import onnxruntime as ort

    sess = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    y = sess.run(None, {"x": x})[0]
    return SmokeSamples(inputs={"x": x}, expected={"probs": y})


def softmax_onnx(n: int = 4) -> bytes:
    """``probs = softmax(x)`` over ``[batch, n]``: the predicted class is ``argmax(x)``."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Softmax", ["x"], ["probs"], axis=1)],
        "softmax",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", n])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", n])],
    )
    return _finish(graph)


def add_onnx(n: int = 4) -> bytes:
    """Two inputs: ``y = a + b`` over ``[batch, n]``."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["y"])],
        "add",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", n]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, ["batch", n]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])],
    )
    return _finish(graph)
