"""Named behaviours of the [converters-reach] lowerings (the conformance suite checks
every case of these operators; these pin what a reader would ask about)."""

from __future__ import annotations

import numpy as np
import pytest
import tflite
from onnx import helper

from converters.tflite import onnx_to_tflite
from converters.tflite.errors import UnsupportedAttributeError, UnsupportedShapeError
from tests.tflite_models import FLOAT32_ABS, make_model, run_onnx, run_tflite

Op = tflite.BuiltinOperator


def _codes(data: bytes) -> list[int]:
    m = tflite.Model.GetRootAsModel(data, 0)
    sg = m.Subgraphs(0)
    return [
        max(
            m.OperatorCodes(sg.Operators(i).OpcodeIndex()).BuiltinCode(),
            m.OperatorCodes(sg.Operators(i).OpcodeIndex()).DeprecatedBuiltinCode(),
        )
        for i in range(sg.OperatorsLength())
    ]


def _gelu_erf_model():
    inits = {
        "sqrt2": np.asarray(np.sqrt(2.0), np.float32),
        "one": np.asarray(1.0, np.float32),
        "half": np.asarray(0.5, np.float32),
    }
    nodes = [
        helper.make_node("Div", ["x", "sqrt2"], ["d"]),
        helper.make_node("Erf", ["d"], ["e"]),
        helper.make_node("Add", ["e", "one"], ["a"]),
        helper.make_node("Mul", ["x", "a"], ["m"]),
        helper.make_node("Mul", ["m", "half"], ["y"]),
    ]
    return make_model(nodes, (4, 16), inits, opset=18)


def test_torch_opset18_gelu_erf_form_becomes_one_gelu_op() -> None:
    model = _gelu_erf_model()
    x = np.random.default_rng(0).normal(0, 3, size=(4, 16)).astype(np.float32)
    data = onnx_to_tflite(model)
    assert _codes(data) == [Op.GELU]
    assert np.abs(run_tflite(data, x) - run_onnx(model, x)).max() <= FLOAT32_ABS


def test_standalone_erf_is_within_float32_rounding() -> None:
    model = make_model([helper.make_node("Erf", ["x"], ["y"])], (2, 1000))
    x = np.linspace(-6, 6, 2000, dtype=np.float32).reshape(2, 1000)
    assert np.abs(run_tflite(onnx_to_tflite(model), x) - run_onnx(model, x)).max() <= 5e-7


def test_conv1d_followed_by_batchnorm_folds_with_1d_weights() -> None:
    """BN folding used to multiply 3-D weights by a 4-D scale (silently broadcasting)."""
    rng = np.random.default_rng(1)
    inits = {
        "w": rng.normal(0, 0.5, size=(6, 4, 3)).astype(np.float32),
        "g": rng.uniform(0.5, 1.5, size=6).astype(np.float32),
        "b": rng.normal(0, 0.1, size=6).astype(np.float32),
        "m": rng.normal(0, 0.1, size=6).astype(np.float32),
        "v": rng.uniform(0.5, 1.5, size=6).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3], pads=[1, 1]),
        helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"]),
    ]
    model = make_model(nodes, (2, 4, 20), inits)
    x = rng.normal(size=(2, 4, 20)).astype(np.float32)
    data = onnx_to_tflite(model)
    assert Op.MUL not in _codes(data)  # folded into the convolution
    assert np.abs(run_tflite(data, x) - run_onnx(model, x)).max() <= FLOAT32_ABS


def _resize(scales=None, sizes=None, **attrs):
    inits = {"roi": np.zeros(0, np.float32)}
    ins = ["x", "roi"]
    if scales is not None:
        inits["scales"] = np.asarray(scales, np.float32)
        ins.append("scales")
    else:
        inits["sizes"] = np.asarray(sizes, np.int64)
        ins += ["", "sizes"]
    return make_model([helper.make_node("Resize", ins, ["y"], **attrs)], (1, 2, 4, 5), inits)


def test_resize_scale_other_than_the_size_ratio_is_refused_by_name() -> None:
    model = _resize(scales=[1, 1, 2.3, 2.3], mode="linear")
    with pytest.raises(UnsupportedAttributeError, match="size ratio"):
        onnx_to_tflite(model)


def test_resize_sizes_that_fix_the_batch_are_refused() -> None:
    """ONNX resizes the batch axis to sizes[0]: at batch 2 the output has batch 1."""
    model = _resize(
        sizes=[1, 2, 8, 10],
        mode="nearest",
        coordinate_transformation_mode="asymmetric",
        nearest_mode="floor",
    )
    with pytest.raises(UnsupportedAttributeError, match="batch"):
        onnx_to_tflite(model)


def test_torch_nearest_upsample_matches() -> None:
    model = _resize(scales=[1, 1, 2, 2], mode="nearest",
                    coordinate_transformation_mode="asymmetric", nearest_mode="floor")  # fmt: skip
    x = np.random.default_rng(2).normal(size=(3, 2, 4, 5)).astype(np.float32)
    data = onnx_to_tflite(model)
    assert _codes(data)[-2:][
        0
    ] == Op.RESIZE_NEAREST_NEIGHBOR or Op.RESIZE_NEAREST_NEIGHBOR in _codes(data)
    assert np.abs(run_tflite(data, x) - run_onnx(model, x)).max() <= FLOAT32_ABS


def test_layer_norm_over_the_batch_axis_is_refused() -> None:
    model = make_model(
        [helper.make_node("LayerNormalization", ["x", "g"], ["y"], axis=0)],
        (2, 3),
        {"g": np.ones((2, 3), np.float32)},
        opset=17,
    )
    with pytest.raises(UnsupportedShapeError, match="batch axis"):
        onnx_to_tflite(model)
