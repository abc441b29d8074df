"""Extra conformance cases for the operators of [converters-reach] (expected from onnxruntime).

ONNX's node tests cover these operators, but not in the forms exporters write:

* ``Resize``: torch's ``nn.Upsample`` / ``F.interpolate`` exports (nearest with
  ``asymmetric`` + ``floor``, bilinear with ``half_pixel``, ``pytorch_half_pixel`` and
  ``align_corners``), the opset-11 default nearest at integer factors, downsampling;
* ``Conv`` / ``MaxPool`` / ``AveragePool``: 1-D (keyword spotters), with pads, strides,
  dilations, depthwise and grouped;
* ``ConvTranspose``: torch's ``ConvTranspose2d(k=3, s=2, p=1, output_padding=1)`` and
  ``k=4, s=2, p=1``;
* ``Erf``: the exact GELU torch writes at opset 18 (both multiplication orders), which
  the writer fuses into ``GELU``;
* ``LayerNormalization``: opset-17 on a ``[N, T, D]`` input, and the decomposed form
  (``ReduceMean``, ``Sub``, ``Pow``, ``Add``, ``Sqrt``, ``Div``, ``Mul``, ``Add``);
* ``MatMul``: batched activation x activation (attention scores) and activation x
  rank-3 constant;
* ``LSTM`` / ``GRU``: a batch of 3, forward and bidirectional, GRU with torch's
  ``linear_before_reset=1``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .cases import NodeCase

_RNG_SEED = 14


def _model(
    op: str,
    name: str,
    nodes: list[Any],
    x: np.ndarray,
    inits: dict[str, np.ndarray],
    opset: int,
) -> NodeCase:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from .judge import _ort_runner

    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    model.graph.output[0].CopyFrom(inferred.graph.output[0])
    expected = _ort_runner(model)({"x": x})
    return NodeCase(op, name, model, [x], expected, origin="edgefleet")


def _x(*shape: int) -> np.ndarray:
    rng = np.random.default_rng(_RNG_SEED + len(shape) + sum(shape))
    return rng.normal(0, 1, size=shape).astype(np.float32)


def resize_cases() -> list[NodeCase]:
    from onnx import helper

    cases = []
    combos = [
        ("nearest", "asymmetric", "floor", [1, 1, 2, 2], None),
        ("nearest", "half_pixel", "round_prefer_floor", [1, 1, 2, 2], None),
        ("nearest", "half_pixel", "round_prefer_floor", [1, 1, 3, 3], None),
        ("nearest", "half_pixel", "round_prefer_ceil", None, [1, 3, 7, 9]),
        ("nearest", "align_corners", "round_prefer_ceil", None, [1, 3, 7, 9]),
        ("linear", "half_pixel", "round_prefer_floor", [1, 1, 2, 2], None),
        ("linear", "pytorch_half_pixel", "round_prefer_floor", [1, 1, 2, 2], None),
        ("linear", "align_corners", "round_prefer_floor", None, [1, 3, 9, 11]),
        ("linear", "asymmetric", "round_prefer_floor", [1, 1, 2, 2], None),
        ("linear", "half_pixel", "round_prefer_floor", None, [1, 3, 2, 3]),
        ("nearest", "asymmetric", "floor", None, [1, 3, 2, 3]),
    ]
    x = _x(1, 3, 4, 5)
    for i, (mode, ctm, nearest, scales, sizes) in enumerate(combos):
        inits = {"roi": np.zeros(0, np.float32)}
        ins = ["x", "roi"]
        if scales is not None:
            inits["scales"] = np.asarray(scales, np.float32)
            ins.append("scales")
        else:
            inits["sizes"] = np.asarray(sizes, np.int64)
            ins += ["", "sizes"]
        node = helper.make_node(
            "Resize",
            ins,
            ["y"],
            mode=mode,
            coordinate_transformation_mode=ctm,
            nearest_mode=nearest,
        )
        cases.append(
            _model("Resize", f"edgefleet_resize_{i}_{mode}_{ctm}_{nearest}", [node], x, inits, 13)
        )
    return cases


def conv1d_cases() -> list[NodeCase]:
    from onnx import helper

    rng = np.random.default_rng(_RNG_SEED)
    x = _x(1, 4, 16)
    out = []
    specs: list[tuple[str, int, int, int, dict[str, Any]]] = [
        ("plain", 8, 4, 3, {"pads": [1, 1]}),
        ("stride_dilation", 6, 4, 3, {"strides": [2], "dilations": [2], "pads": [2, 1]}),
        ("depthwise", 4, 1, 5, {"group": 4, "pads": [2, 2]}),
        ("grouped", 6, 2, 3, {"group": 2}),
        ("same_upper", 5, 4, 4, {"auto_pad": "SAME_UPPER", "strides": [2]}),
    ]
    for tag, m, cg, k, kw in specs:
        w = rng.normal(0, 0.3, size=(m, cg, k)).astype(np.float32)
        b = rng.normal(0, 0.1, size=(m,)).astype(np.float32)
        node = helper.make_node("Conv", ["x", "w", "b"], ["y"], kernel_shape=[k], **kw)
        out.append(_model("Conv", f"edgefleet_conv1d_{tag}", [node], x, {"w": w, "b": b}, 13))
    return out


def pool1d_cases(op: str) -> Callable[[], list[NodeCase]]:
    def make() -> list[NodeCase]:
        from onnx import helper

        x = _x(1, 4, 15)
        specs: list[tuple[str, dict[str, Any]]] = [
            ("k3s2", {"kernel_shape": [3], "strides": [2]}),
            ("k2pad", {"kernel_shape": [2], "strides": [2], "pads": [0, 1]}),
        ]
        out = []
        for tag, kw in specs:
            if op == "AveragePool" and "pads" in kw:
                kw = {**kw, "count_include_pad": 1}
            node = helper.make_node(op, ["x"], ["y"], **kw)
            out.append(_model(op, f"edgefleet_{op.lower()}1d_{tag}", [node], x, {}, 13))
        return out

    return make


def conv_transpose_cases() -> list[NodeCase]:
    from onnx import helper

    rng = np.random.default_rng(_RNG_SEED + 1)
    x = _x(1, 4, 5, 6)
    out = []
    specs: list[tuple[str, int, dict[str, Any]]] = [
        ("k3s2p1op1", 3, {"strides": [2, 2], "pads": [1, 1, 1, 1], "output_padding": [1, 1]}),
        ("k4s2p1", 4, {"strides": [2, 2], "pads": [1, 1, 1, 1]}),
        ("k2s2", 2, {"strides": [2, 2]}),
    ]
    for tag, k, kw in specs:
        w = rng.normal(0, 0.3, size=(4, 3, k, k)).astype(np.float32)
        b = rng.normal(0, 0.1, size=(3,)).astype(np.float32)
        node = helper.make_node("ConvTranspose", ["x", "w", "b"], ["y"], kernel_shape=[k, k], **kw)
        out.append(
            _model(
                "ConvTranspose", f"edgefleet_convtranspose_{tag}", [node], x, {"w": w, "b": b}, 13
            )
        )
    return out


def gelu_erf_cases() -> list[NodeCase]:
    from onnx import helper

    x = _x(2, 8, 6) * 3
    sqrt2 = np.asarray(np.sqrt(2.0), np.float32)
    one, half = np.asarray(1.0, np.float32), np.asarray(0.5, np.float32)
    inits = {"sqrt2": sqrt2, "one": one, "half": half}
    torch_form = [
        helper.make_node("Div", ["x", "sqrt2"], ["d"]),
        helper.make_node("Erf", ["d"], ["e"]),
        helper.make_node("Add", ["e", "one"], ["a"]),
        helper.make_node("Mul", ["x", "a"], ["m"]),
        helper.make_node("Mul", ["m", "half"], ["y"]),
    ]
    half_first = [
        helper.make_node("Div", ["x", "sqrt2"], ["d"]),
        helper.make_node("Erf", ["d"], ["e"]),
        helper.make_node("Add", ["e", "one"], ["a"]),
        helper.make_node("Mul", ["x", "half"], ["h"]),
        helper.make_node("Mul", ["h", "a"], ["y"]),
    ]
    x4 = _x(1, 3, 4, 5) * 3
    return [
        _model("Erf", "edgefleet_gelu_erf_torch_form", torch_form, x, inits, 18),
        _model("Erf", "edgefleet_gelu_erf_half_first", half_first, x, inits, 18),
        _model("Erf", "edgefleet_gelu_erf_rank4", torch_form, x4, inits, 18),
    ]


def layer_norm_cases() -> list[NodeCase]:
    from onnx import helper

    rng = np.random.default_rng(_RNG_SEED + 2)
    x = _x(1, 5, 8) * 2 + 1
    gamma = rng.normal(1, 0.2, size=(8,)).astype(np.float32)
    beta = rng.normal(0, 0.2, size=(8,)).astype(np.float32)
    fused = helper.make_node("LayerNormalization", ["x", "g", "b"], ["y"], axis=-1, epsilon=1e-5)
    decomposed = [
        helper.make_node("ReduceMean", ["x", "axes"], ["mu"], keepdims=1),
        helper.make_node("Sub", ["x", "mu"], ["d"]),
        helper.make_node("Pow", ["d", "two"], ["sq"]),
        helper.make_node("ReduceMean", ["sq", "axes"], ["var"], keepdims=1),
        helper.make_node("Add", ["var", "eps"], ["ve"]),
        helper.make_node("Sqrt", ["ve"], ["sd"]),
        helper.make_node("Div", ["d", "sd"], ["n"]),
        helper.make_node("Mul", ["n", "g"], ["s"]),
        helper.make_node("Add", ["s", "b"], ["y"]),
    ]
    inits: dict[str, np.ndarray] = {
        "axes": np.asarray([-1], np.int64),
        "two": np.asarray(2.0, np.float32),
        "eps": np.asarray(1e-5, np.float32),
        "g": gamma,
        "b": beta,
    }
    return [
        _model(
            "LayerNormalization", "edgefleet_layernorm_ntd", [fused], x, {"g": gamma, "b": beta}, 17
        ),
        _model("LayerNormalization", "edgefleet_layernorm_decomposed", decomposed, x, inits, 18),
    ]


def matmul_cases() -> list[NodeCase]:
    from onnx import helper

    rng = np.random.default_rng(_RNG_SEED + 3)
    x = _x(1, 2, 5, 4)
    w3 = rng.normal(0, 0.5, size=(2, 4, 3)).astype(np.float32)
    scores = [
        helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["x", "xt"], ["y"]),
    ]
    return [
        _model("MatMul", "edgefleet_matmul_attention_scores", scores, x, {}, 13),
        _model(
            "MatMul",
            "edgefleet_matmul_rank3_constant",
            [helper.make_node("MatMul", ["x", "w"], ["y"])],
            x,
            {"w": w3},
            13,
        ),
    ]


def recurrent_cases(op: str) -> Callable[[], list[NodeCase]]:
    """torch's forms: GRU with ``linear_before_reset=1``; both cells over a batch of 3."""

    def make() -> list[NodeCase]:
        from onnx import helper

        rng = np.random.default_rng(_RNG_SEED + 4)
        gates = 4 if op == "LSTM" else 3
        x = _x(6, 3, 5)
        out = []
        for direction in ("forward", "bidirectional"):
            dirs = 2 if direction == "bidirectional" else 1
            inits = {
                "w": rng.normal(0, 0.4, size=(dirs, gates * 4, 5)).astype(np.float32),
                "r": rng.normal(0, 0.4, size=(dirs, gates * 4, 4)).astype(np.float32),
                "b": rng.normal(0, 0.2, size=(dirs, 2 * gates * 4)).astype(np.float32),
            }
            extra: dict[str, Any] = {"linear_before_reset": 1} if op == "GRU" else {}
            node = helper.make_node(
                op, ["x", "w", "r", "b"], ["y"], hidden_size=4, direction=direction, **extra
            )
            out.append(
                _model(op, f"edgefleet_{op.lower()}_{direction}_batch3", [node], x, inits, 14)
            )
        return out

    return make


#: Operator -> extra cases of its row (merged into ``EXTRA_CASES``).
REACH_CASES: dict[str, Callable[[], list[NodeCase]]] = {
    "Resize": resize_cases,
    "Conv": conv1d_cases,
    "MaxPool": pool1d_cases("MaxPool"),
    "AveragePool": pool1d_cases("AveragePool"),
    "ConvTranspose": conv_transpose_cases,
    "Erf": gelu_erf_cases,
    "LayerNormalization": layer_norm_cases,
    "MatMul": matmul_cases,
    "LSTM": recurrent_cases("LSTM"),
    "GRU": recurrent_cases("GRU"),
}
