"""Intake of real models and float32 parity against each source's own runtime."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from converters.errors import IntakeError, TargetError
from converters.pipeline import convert
from converters.source import from_onnx, from_sklearn, from_tflite, from_torch, load_source
from converters.targets import Target
from converters.tflite import UnsupportedOperatorError
from tests import models

ONNX_F32 = Target("onnx", "float32")
TFLITE_F32 = Target("tflite", "float32")


@pytest.mark.parametrize("name", models.ZOO)
def test_float32_onnx_matches_source_runtime_within_1e4(name: str) -> None:
    source, x = models.zoo_source(name)
    artifact = convert(source, ONNX_F32, samples=x)
    report = artifact.parity
    assert report.passed
    assert report.samples == len(x)
    for out in report.outputs:
        assert out.max_abs_error <= 1e-4, out
        if source.is_classifier:
            assert out.top1_agreement == 1.0
    # the reference really is the source's runtime, not onnxruntime on the same graph
    expected_runtime = {
        "cnn": "torch",
        "mlp": "torch",
        "pipeline": "scikit-learn",
        "forest": "scikit-learn",
        "forest_regressor": "scikit-learn",
        "onnx_mlp": "onnxruntime",
    }[name]
    assert report.reference_runtime.startswith(expected_runtime)
    assert report.artifact_runtime.startswith("onnxruntime")


@pytest.mark.parametrize("name", ["cnn", "mlp", "onnx_mlp"])
def test_float32_tflite_matches_source_runtime_within_1e4(name: str) -> None:
    source, x = models.zoo_source(name)
    artifact = convert(source, TFLITE_F32, samples=x)
    assert artifact.data[4:8] == b"TFL3"
    assert artifact.parity.passed
    for out in artifact.parity.outputs:
        assert out.max_abs_error <= 1e-4, out
        assert out.top1_agreement == 1.0
    assert artifact.parity.artifact_runtime.startswith("ai-edge-litert")


@pytest.mark.parametrize("name", ["pipeline", "forest"])
def test_tflite_target_for_sklearn_model_names_the_unsupported_operator(name: str) -> None:
    source, x = models.zoo_source(name)
    with pytest.raises(UnsupportedOperatorError) as info:
        convert(source, TFLITE_F32, samples=x)
    assert info.value.op_type.startswith("ai.onnx.ml.")
    assert info.value.node_name in str(info.value)


def test_torch_export_has_dynamic_batch_pinned_opset_and_inline_weights() -> None:
    source, _ = models.zoo_source("cnn")
    model = source.onnx_model
    dim0 = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.HasField("dim_param") and not dim0.HasField("dim_value")
    assert {o.domain: o.version for o in model.opset_import}[""] == 18
    assert all(t.data_location == 0 and not t.external_data for t in model.graph.initializer)
    # a batch size the export never saw runs
    artifact = convert(source, ONNX_F32, samples=models.image_batch(5, seed=3))
    assert artifact.parity.samples == 5 and artifact.parity.passed


def test_sklearn_classifier_outputs_plain_probabilities() -> None:
    source, x = models.zoo_source("pipeline")
    assert [o.name for o in source.outputs] == ["probabilities"]
    assert source.outputs[0].dtype == "float32"
    assert source.tasks == {"probabilities": "classification"}
    estimator, _ = models.sklearn_pipeline()
    np.testing.assert_allclose(source.reference({"x": x[:5]})[0], estimator.predict_proba(x[:5]))


def test_sklearn_regressor_output_is_a_column_judged_as_regression() -> None:
    source, x = models.zoo_source("forest_regressor")
    assert source.tasks == {"variable": "regression"}
    artifact = convert(source, ONNX_F32, samples=x)
    assert artifact.parity.outputs[0].top1_agreement is None
    assert artifact.profile.output is not None and artifact.profile.output.kind == "regression"


def test_onnx_source_newer_than_installed_onnxruntime_is_taken_in() -> None:
    import onnx

    model, x = models.onnx_helper_mlp(ir_version=onnx.IR_VERSION)
    source = from_onnx(model)
    artifact = convert(source, ONNX_F32, samples=x)
    assert artifact.parity.passed
    assert artifact.runtime["onnx_ir_version"] <= onnx.IR_VERSION


def test_tflite_source_is_inspected_validated_and_passed_through(tmp_path: Path) -> None:
    mlp, x = models.zoo_source("mlp")
    tfl = convert(mlp, TFLITE_F32, samples=x).data
    path = tmp_path / "m.tflite"
    path.write_bytes(tfl)
    source = load_source(path)
    assert source.origin == "tflite"
    assert [tuple(s.shape) for s in source.inputs] == [(None, models.MLP_FEATURES)]
    artifact = convert(source, TFLITE_F32, samples=x)
    assert artifact.data == tfl
    assert artifact.parity.passed and artifact.parity.outputs[0].max_abs_error == 0.0


def test_tflite_source_cannot_become_onnx() -> None:
    mlp, x = models.zoo_source("mlp")
    source = from_tflite(convert(mlp, TFLITE_F32, samples=x).data)
    with pytest.raises(TargetError, match="only produce TFLite"):
        convert(source, ONNX_F32, samples=x)


def test_tflite_source_refuses_requantization() -> None:
    mlp, x = models.zoo_source("mlp")
    source = from_tflite(convert(mlp, TFLITE_F32, samples=x).data)
    with pytest.raises(TargetError, match="passed through"):
        convert(source, Target("tflite", "float16"), samples=x)


def test_garbage_tflite_is_refused_with_intake_error() -> None:
    with pytest.raises(IntakeError, match="TFL3"):
        from_tflite(b"\x00" * 64)


def test_garbage_onnx_file_is_refused_with_intake_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a protobuf at all \xff\xfe")
    with pytest.raises(IntakeError, match="not a readable ONNX model"):
        load_source(bad)


def test_missing_model_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(IntakeError, match="no such model file"):
        load_source(tmp_path / "absent.onnx")


def test_unknown_extension_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "model.h5"
    p.write_bytes(b"x")
    with pytest.raises(IntakeError, match="cannot tell the model type"):
        load_source(p)


def test_pickle_is_refused_without_explicit_trust(tmp_path: Path) -> None:
    estimator, x = models.random_forest()
    p = tmp_path / "forest.pkl"
    p.write_bytes(pickle.dumps(estimator))
    with pytest.raises(IntakeError, match="executes code"):
        load_source(p, example_inputs=x)
    source = load_source(p, example_inputs=x, allow_pickle=True)
    assert source.origin == "sklearn" and source.is_classifier


def test_sklearn_estimator_without_predict_proba_is_refused() -> None:
    from sklearn.svm import LinearSVC

    x, y = models.tabular_data()
    with pytest.raises(IntakeError, match="predict_proba"):
        from_sklearn(LinearSVC().fit(x, y), x)


def test_sklearn_transformer_alone_is_refused() -> None:
    from sklearn.preprocessing import StandardScaler

    x, _ = models.tabular_data()
    with pytest.raises(IntakeError, match="neither a classifier nor a regressor"):
        from_sklearn(StandardScaler().fit(x), x)


def test_torch_module_that_fails_on_its_example_is_refused() -> None:
    module, _ = models.torch_mlp()
    with pytest.raises(IntakeError, match="does not run on the example inputs"):
        from_torch(module, np.zeros((2, 3), dtype=np.float32))


def test_torchscript_file_needs_an_input_shape(tmp_path: Path) -> None:
    import torch

    module, x = models.torch_mlp()
    path = tmp_path / "mlp.pt"
    torch.jit.save(torch.jit.trace(module, torch.from_numpy(x[:2])), str(path))
    with pytest.raises(IntakeError, match="needs an input shape"):
        load_source(path)
    source = load_source(path, input_shape=(2, models.MLP_FEATURES))
    artifact = convert(source, ONNX_F32, samples=x)
    assert artifact.parity.passed and artifact.parity.outputs[0].max_abs_error <= 1e-4


def test_state_dict_file_is_refused_with_advice(tmp_path: Path) -> None:
    import torch

    module, _ = models.torch_mlp()
    path = tmp_path / "weights.pt"
    torch.save(module.state_dict(), str(path))
    with pytest.raises(IntakeError, match="state_dict"):
        load_source(path, input_shape=(1, models.MLP_FEATURES))


def test_torch_export_program_file_is_taken_in(tmp_path: Path) -> None:
    import torch

    module, x = models.torch_mlp()
    example = (torch.from_numpy(x[:2]),)
    program = torch.export.export(module, example, dynamic_shapes=({0: torch.export.Dim("batch")},))
    path = tmp_path / "mlp.pt2"
    torch.export.save(program, str(path))
    source = load_source(path, example_inputs=x[:2])
    artifact = convert(source, ONNX_F32, samples=x)
    assert artifact.parity.passed and artifact.parity.outputs[0].max_abs_error <= 1e-4


def test_torch_export_program_with_fixed_batch_is_refused(tmp_path: Path) -> None:
    import torch

    module, x = models.torch_mlp()
    path = tmp_path / "fixed.pt2"
    torch.export.save(torch.export.export(module, (torch.from_numpy(x[:2]),)), str(path))
    with pytest.raises(IntakeError, match="fixes the batch size"):
        load_source(path, example_inputs=x[:2])
