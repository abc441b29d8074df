"""ONNX -> TFLite writer: every operator of the subset against onnxruntime, the
file's structure, and each refusal by name."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import tflite
from onnx import TensorProto, helper

from converters.tflite import (
    SUPPORTED_OPS,
    UnsupportedAttributeError,
    UnsupportedOperatorError,
    UnsupportedQuantizationError,
    UnsupportedShapeError,
    UnsupportedTypeError,
    onnx_to_tflite,
)
from converters.tflite.builder import ModelSpec, operator_code_fields, serialize
from tests.tflite_models import (
    FLOAT32_ABS,
    OP_CASES,
    TOLERANCE,
    make_model,
    run_onnx,
    run_tflite,
)

Op = tflite.BuiltinOperator

# Tolerances of the weight modes: float32 absolute; float16 and int8 relative to
# the output's scale (max(1, max |reference|)). int8 (dynamic range) also
# quantizes activations on the fly, so its error grows with depth.
FLOAT16_REL = TOLERANCE["float16"][0]
INT8_REL = TOLERANCE["int8"][0]


def _scale(ref: np.ndarray) -> float:
    return max(1.0, float(np.abs(ref).max()))


def _model(data: bytes) -> tflite.Model:
    return tflite.Model.GetRootAs(data, 0)


def _op_codes(data: bytes) -> list[int]:
    m = _model(data)
    sg = m.Subgraphs(0)
    return [m.OperatorCodes(sg.Operators(i).OpcodeIndex()).BuiltinCode()
            for i in range(sg.OperatorsLength())]  # fmt: skip


@pytest.mark.parametrize("case", sorted(OP_CASES))
def test_operator_float32_matches_onnxruntime(case: str) -> None:
    model, x = OP_CASES[case]()
    ref = run_onnx(model, x)
    got = run_tflite(onnx_to_tflite(model), x)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= FLOAT32_ABS


@pytest.mark.parametrize("case", sorted(OP_CASES))
def test_operator_float16_weights_within_tolerance(case: str) -> None:
    model, x = OP_CASES[case]()
    ref = run_onnx(model, x)
    got = run_tflite(onnx_to_tflite(model, weights="float16"), x)
    assert np.abs(got - ref).max() <= FLOAT16_REL * _scale(ref)


@pytest.mark.parametrize("case", sorted(OP_CASES))
def test_operator_int8_weights_within_tolerance(case: str) -> None:
    model, x = OP_CASES[case]()
    ref = run_onnx(model, x)
    got = run_tflite(onnx_to_tflite(model, weights="int8"), x)
    assert np.abs(got - ref).max() <= INT8_REL * _scale(ref)


def test_every_supported_operator_has_a_parity_case() -> None:
    covered = set()
    for build in OP_CASES.values():
        covered |= {n.op_type for n in build()[0].graph.node}
    assert SUPPORTED_OPS - covered <= {"Identity", "Dropout"}


# --- layout ---------------------------------------------------------------------


def test_flatten_after_conv_uses_onnx_channel_major_order() -> None:
    model, x = OP_CASES["flatten_after_conv"]()
    ref = run_onnx(model, x)
    # Flattening the NHWC tensor instead would give clearly different outputs,
    # so the parity check below can tell the two orders apart.
    wrong = onnx.ModelProto()
    wrong.CopyFrom(model)
    flatten = next(n for n in wrong.graph.node if n.op_type == "Flatten")
    flatten.input[0] = "h_nhwc"
    wrong.graph.node.insert(1, helper.make_node("Transpose", ["h"], ["h_nhwc"], perm=[0, 2, 3, 1]))
    assert np.abs(run_onnx(wrong, x) - ref).max() > 0.1

    data = onnx_to_tflite(model)
    assert np.abs(run_tflite(data, x) - ref).max() <= FLOAT32_ABS
    codes = _op_codes(data)
    assert codes.index(Op.TRANSPOSE, codes.index(Op.CONV_2D)) < codes.index(Op.RESHAPE)


def test_input_and_output_keep_onnx_layout_with_dynamic_batch() -> None:
    from ai_edge_litert.interpreter import Interpreter

    model, x = OP_CASES["flatten_after_conv"]()
    interp = Interpreter(model_content=onnx_to_tflite(model))
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    assert inp["name"] == "x" and out["name"] == "y"
    assert list(inp["shape"]) == [1, 3, 5, 5]
    assert list(inp["shape_signature"]) == [-1, 3, 5, 5]
    assert list(out["shape_signature"]) == [-1, 5]
    codes = _op_codes(onnx_to_tflite(model))
    assert codes[0] == Op.TRANSPOSE  # NCHW input -> NHWC, inside the model


def test_batch_sizes_one_and_seven_agree_with_onnxruntime() -> None:
    model, _ = OP_CASES["conv_grouped"]()
    data = onnx_to_tflite(model)
    for n in (1, 7):
        x = np.random.default_rng(n).normal(size=(n, 4, 9, 9)).astype(np.float32)
        assert np.abs(run_tflite(data, x) - run_onnx(model, x)).max() <= FLOAT32_ABS


def test_signature_runner_uses_onnx_names() -> None:
    from ai_edge_litert.interpreter import Interpreter

    model, x = OP_CASES["gemm_transB_alpha_beta"]()
    interp = Interpreter(model_content=onnx_to_tflite(model))
    assert interp.get_signature_list() == {"serving_default": {"inputs": ["x"], "outputs": ["y"]}}
    out = interp.get_signature_runner()(x=x)["y"]
    assert np.abs(out - run_onnx(model, x)).max() <= FLOAT32_ABS


# --- graph rewrites ---------------------------------------------------------------


def test_batchnorm_after_conv_is_folded_into_its_weights() -> None:
    model, _ = OP_CASES["batchnorm_folded_into_conv"]()
    assert any(n.op_type == "BatchNormalization" for n in model.graph.node)
    codes = _op_codes(onnx_to_tflite(model))
    assert Op.MUL not in codes and Op.ADD not in codes
    assert codes.count(Op.CONV_2D) == 1


def test_relu_after_conv_becomes_a_fused_activation() -> None:
    model, _ = OP_CASES["relu_nhwc"]()
    data = onnx_to_tflite(model)
    assert Op.RELU not in _op_codes(data)
    sg = _model(data).Subgraphs(0)
    conv = next(sg.Operators(i) for i in range(sg.OperatorsLength())
                if _op_codes(data)[i] == Op.CONV_2D)  # fmt: skip
    opts = tflite.Conv2DOptions()
    table = conv.BuiltinOptions()
    opts.Init(table.Bytes, table.Pos)
    assert opts.FusedActivationFunction() == tflite.ActivationFunctionType.RELU


def test_shape_gather_concat_chain_is_folded_into_a_reshape() -> None:
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "axes"], ["n1"]),
        helper.make_node("Concat", ["n1", "minus1"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["y"], name="flatten"),
    ]
    inits = {
        "zero": np.asarray(0, np.int64),
        "axes": np.asarray([0], np.int64),
        "minus1": np.asarray([-1], np.int64),
    }
    model = make_model(nodes, (2, 3, 4), inits)
    x = np.random.default_rng(0).normal(size=(5, 3, 4)).astype(np.float32)
    data = onnx_to_tflite(model)
    assert _op_codes(data) == [Op.RESHAPE]
    assert np.array_equal(run_tflite(data, x), run_onnx(model, x))


# --- file structure ---------------------------------------------------------------


def test_file_is_schema_3_with_empty_buffer_zero_and_serving_signature() -> None:
    model, _ = OP_CASES["conv_depthwise"]()
    data = onnx_to_tflite(model)
    assert data[4:8] == b"TFL3"
    m = _model(data)
    assert m.Version() == 3
    assert m.Buffers(0).DataLength() == 0
    assert m.SignatureDefsLength() == 1
    assert m.SignatureDefs(0).SignatureKey() == b"serving_default"
    sg = m.Subgraphs(0)
    for i in range(sg.TensorsLength()):
        t = sg.Tensors(i)
        if t.Buffer():
            assert m.Buffers(t.Buffer()).DataLength() > 0


def test_operator_codes_store_deprecated_code_consistently() -> None:
    assert operator_code_fields(3) == (3, 3)
    assert operator_code_fields(126) == (126, 126)
    assert operator_code_fields(150) == (127, 150)
    seen = set()
    for case in ("matmul_two_activations", "gelu_tanh_nhwc"):
        m = _model(onnx_to_tflite(OP_CASES[case]()[0]))
        for i in range(m.OperatorCodesLength()):
            code = m.OperatorCodes(i)
            assert code.DeprecatedBuiltinCode() == min(code.BuiltinCode(), 127)
            seen.add(code.BuiltinCode())
    assert {Op.BATCH_MATMUL, Op.GELU} <= seen  # codes 126 and 150 on either side of 127


def test_operator_above_127_runs_through_the_placeholder_code() -> None:
    """GELU (code 150) only resolves if builtin_code carries it past the int8 field."""
    import math

    from ai_edge_litert.interpreter import Interpreter

    assert Op.GELU > 127
    spec = ModelSpec()
    x = spec.add_tensor("x", (4,))
    y = spec.add_tensor("y", (4,))
    spec.add_operator(Op.GELU, [x], [y], ("GeluOptions", {"Approximate": False}))
    spec.inputs, spec.outputs = [x], [y]
    interp = Interpreter(model_content=serialize(spec))
    interp.allocate_tensors()
    values = np.asarray([-2.0, -0.5, 0.5, 2.0], np.float32)
    interp.set_tensor(interp.get_input_details()[0]["index"], values)
    interp.invoke()
    got = interp.get_tensor(interp.get_output_details()[0]["index"])
    expected = [v * 0.5 * (1 + math.erf(v / math.sqrt(2))) for v in values]
    assert np.abs(got - expected).max() < 1e-5


# --- refusals -----------------------------------------------------------------------


def _rnn_model() -> onnx.ModelProto:
    """A plain ONNX RNN (LSTM and GRU are unrolled by the writer; RNN is not)."""
    rng = np.random.default_rng(0)
    inits = {
        "W": rng.normal(size=(1, 2, 3)).astype(np.float32),
        "R": rng.normal(size=(1, 2, 2)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="pre"),
        helper.make_node("RNN", ["r", "W", "R"], ["y"], name="encoder_rnn", hidden_size=2),
    ]
    return make_model(nodes, (4, 1, 3), inits)


def test_rnn_is_refused_naming_operator_node_and_supported_set() -> None:
    with pytest.raises(UnsupportedOperatorError) as err:
        onnx_to_tflite(_rnn_model())
    message = str(err.value)
    assert "'RNN'" in message and "'encoder_rnn'" in message
    assert all(op in message for op in ("Conv", "Gemm", "Softmax", "BatchNormalization"))
    assert err.value.op_type == "RNN" and err.value.node_name == "encoder_rnn"


def test_grid_sample_is_refused_by_name() -> None:
    nodes = [helper.make_node("GridSample", ["x", "grid"], ["y"], name="warp")]
    grid = np.zeros((1, 4, 4, 2), np.float32)
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 4, 4])],
        initializer=[onnx.numpy_helper.from_array(grid, "grid")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(UnsupportedOperatorError, match="'GridSample' \\(node 'warp'\\)"):
        onnx_to_tflite(model)


def test_operator_from_another_domain_is_refused() -> None:
    model, _ = OP_CASES["relu"]()
    model.graph.node[0].domain = "com.microsoft"
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    with pytest.raises(UnsupportedOperatorError, match="com.microsoft.Relu"):
        onnx_to_tflite(model)


def test_unknown_weights_mode_is_refused() -> None:
    model, _ = OP_CASES["relu"]()
    with pytest.raises(UnsupportedQuantizationError, match="float16"):
        onnx_to_tflite(model, weights="int4")


def test_dynamic_spatial_dimension_is_refused() -> None:
    model, _ = OP_CASES["conv_3x3_pad1"]()
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "H"
    with pytest.raises(UnsupportedShapeError, match="axis 2"):
        onnx_to_tflite(model)


def test_integer_input_is_refused() -> None:
    node = helper.make_node("Relu", ["x"], ["y"])
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info("x", TensorProto.INT32, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, ["N", 3])],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(UnsupportedTypeError, match="INT32"):
        onnx_to_tflite(model)


def test_ceil_mode_pool_tflite_cannot_express_is_refused() -> None:
    model, _ = OP_CASES["maxpool_2x2"]()
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 7
    model.graph.input[0].type.tensor_type.shape.dim[3].dim_value = 7
    model.graph.output[0].type.tensor_type.ClearField("shape")
    pool = model.graph.node[1]
    pool.attribute.append(helper.make_attribute("ceil_mode", 1))
    with pytest.raises(UnsupportedAttributeError, match="node_MaxPool"):
        onnx_to_tflite(model)


def test_batch_size_used_as_data_is_refused() -> None:
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
        helper.make_node("Cast", ["n"], ["nf"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["x", "nf"], ["y"], name="add_batch"),
    ]
    model = make_model(nodes, (2, 3), {"zero": np.asarray(0, np.int64)})
    with pytest.raises(UnsupportedShapeError, match="add_batch"):
        onnx_to_tflite(model)


def test_identity_outputs_keep_their_onnx_names() -> None:
    from ai_edge_litert.interpreter import Interpreter

    nodes = [
        helper.make_node("Relu", ["x"], ["h"]),
        helper.make_node("Identity", ["h"], ["y"]),
    ]
    interp = Interpreter(model_content=onnx_to_tflite(make_model(nodes, (2, 3))))
    assert interp.get_signature_list()["serving_default"]["outputs"] == ["y"]
    passthrough = make_model([helper.make_node("Identity", ["x"], ["y"])], (2, 3))
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    assert np.array_equal(run_tflite(onnx_to_tflite(passthrough), x), x)


def test_layout_change_of_a_1x1_feature_map_moves_no_data() -> None:
    model, x = OP_CASES["global_average_pool_squeeze"]()
    codes = _op_codes(onnx_to_tflite(model))
    assert codes.count(Op.TRANSPOSE) == 1  # only the input's NCHW -> NHWC
    assert np.abs(run_tflite(onnx_to_tflite(model), x) - run_onnx(model, x)).max() <= FLOAT32_ABS


def test_several_inputs_and_outputs_keep_their_names_and_order() -> None:
    from ai_edge_litert.interpreter import Interpreter

    nodes = [
        helper.make_node("Mul", ["a", "b"], ["prod"]),
        helper.make_node("Relu", ["prod"], ["relu"]),
        helper.make_node("Sub", ["a", "b"], ["diff"]),
    ]
    graph = helper.make_graph(
        nodes, "two",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 3]) for n in ("a", "b")],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 3]) for n in ("relu", "diff")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    interp = Interpreter(model_content=onnx_to_tflite(model))
    assert interp.get_signature_list()["serving_default"] == {
        "inputs": ["a", "b"],
        "outputs": ["diff", "relu"],  # the runner lists names sorted
    }
    assert [d["name"] for d in interp.get_input_details()] == ["a", "b"]
    assert [d["name"] for d in interp.get_output_details()] == ["relu", "diff"]
    rng = np.random.default_rng(0)
    a, b = (rng.normal(size=(4, 3)).astype(np.float32) for _ in range(2))
    out = interp.get_signature_runner()(a=a, b=b)
    assert np.allclose(out["relu"], np.maximum(a * b, 0)) and np.allclose(out["diff"], a - b)
