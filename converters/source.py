"""Intake: bring a trained model into the converter as a :class:`SourceModel`.

Four ways in: an ONNX model, a PyTorch ``nn.Module`` with example inputs, a
scikit-learn estimator or pipeline, a TFLite flatbuffer. Each becomes an
in-memory ONNX graph (or, for TFLite, the flatbuffer itself) plus a
*reference runner*: the source's own runtime (torch, scikit-learn,
onnxruntime on the original file, the TFLite interpreter), against which every
produced artifact is checked for parity.

Heavy libraries (torch, skl2onnx, onnx) are imported inside the functions.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from device_agent.bundle.manifest import TensorSpec

from .errors import IntakeError
from .introspect import onnx_model_signature

# Opsets the converters pin, so the same source always gives the same graph and
# the result loads on onnxruntime >= 1.14 without lowering.
TORCH_OPSET = 18
SKLEARN_OPSETS = {"": 17, "ai.onnx.ml": 3}

Runner = Callable[[Mapping[str, np.ndarray]], list[np.ndarray]]


@dataclass
class SourceModel:
    """A model ready for conversion.

    ``onnx_model`` is set for every origin but ``tflite`` (where ``tflite_bytes``
    is). ``reference`` runs the source in its own runtime and returns outputs
    in the order of ``outputs``. ``tasks`` maps output names to
    ``"classification"`` (class scores over the last axis) or ``"regression"``.
    """

    origin: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    reference: Runner
    reference_runtime: str
    tasks: dict[str, str]
    sha256: str
    onnx_model: Any = None
    tflite_bytes: bytes | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def is_classifier(self) -> bool:
        return bool(self.outputs) and self.tasks.get(self.outputs[0].name) == "classification"

    def provenance(self) -> dict[str, Any]:
        return {
            "origin": self.origin,
            "sha256": self.sha256,
            "reference_runtime": self.reference_runtime,
            "notes": list(self.notes),
        }


def guess_task(spec: TensorSpec) -> str:
    """``classification`` for a float output with a class axis (``[N, C]``, C >= 2)."""
    shape = spec.shape
    if (
        len(shape) == 2
        and isinstance(shape[-1], int)
        and shape[-1] >= 2
        and spec.dtype.startswith("float")
    ):
        return "classification"
    return "regression"


def _tasks(outputs: Sequence[TensorSpec], task: str | Mapping[str, str] | None) -> dict[str, str]:
    if isinstance(task, Mapping):
        return {o.name: task.get(o.name, guess_task(o)) for o in outputs}
    if task in ("classification", "regression"):
        return {o.name: str(task) for o in outputs}
    if task not in (None, "auto"):
        raise IntakeError(f"task {task!r} must be classification, regression or auto")
    return {o.name: guess_task(o) for o in outputs}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_onnx(model: Any, what: str) -> None:
    import onnx

    if len(model.graph.node) == 0:
        raise IntakeError(f"{what} has an empty graph")
    try:
        onnx.checker.check_model(model)
    except Exception as e:
        raise IntakeError(f"{what} is not a valid ONNX model: {e}") from e


def _onnx_reference(model: Any) -> Runner:
    from .onnx_tools import loadable_by_installed_ort, ort_session, run

    try:
        session = ort_session(loadable_by_installed_ort(model))
    except Exception as e:
        raise IntakeError(f"onnxruntime cannot run the source model: {e}") from e
    return lambda inputs: run(session, dict(inputs))


def from_onnx(model: Any, *, task: str | Mapping[str, str] | None = None) -> SourceModel:
    """Take an ONNX model (a path or an :class:`onnx.ModelProto`).

    A file with external data is read whole and kept as a single in-memory model.
    """
    import onnx

    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        try:
            model = onnx.load(str(path))
        except FileNotFoundError as e:
            raise IntakeError(f"no such model file {path}") from e
        except Exception as e:
            raise IntakeError(f"{path} is not a readable ONNX model: {e}") from e
    elif not isinstance(model, onnx.ModelProto):
        raise IntakeError(f"expected an ONNX path or ModelProto, got {type(model).__name__}")
    _check_onnx(model, "the ONNX model")
    import onnxruntime

    inputs, outputs, _ = onnx_model_signature(model)
    return SourceModel(
        origin="onnx",
        inputs=inputs,
        outputs=outputs,
        reference=_onnx_reference(model),
        reference_runtime=f"onnxruntime {onnxruntime.__version__}",
        tasks=_tasks(outputs, task),
        sha256=_sha256(model.SerializeToString()),
        onnx_model=model,
    )


def _as_arrays(example: Any) -> list[np.ndarray]:
    items = list(example) if isinstance(example, (tuple, list)) else [example]
    out = []
    for item in items:
        if hasattr(item, "detach"):
            item = item.detach().cpu().numpy()
        out.append(np.ascontiguousarray(np.asarray(item)))
    if not out or any(a.ndim == 0 for a in out):
        raise IntakeError("example inputs must be one or more arrays with a batch dimension")
    return out


def export_torch(
    module: Any,
    example: Sequence[np.ndarray],
    input_names: Sequence[str],
    output_names: Sequence[str] | None,
    opset: int,
) -> tuple[Any, list[str]]:
    """Export to one in-memory ONNX model with a dynamic batch dimension."""
    import onnx
    import torch

    notes: list[str] = []
    args = tuple(torch.from_numpy(a) for a in example)
    is_script = isinstance(module, torch.jit.ScriptModule)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    if isinstance(module, torch.export.ExportedProgram):
        # The program's own shapes decide; its batch must already be dynamic.
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                program = torch.onnx.export(
                    module,
                    args,
                    dynamo=True,
                    opset_version=opset,
                    input_names=list(input_names),
                    output_names=list(output_names) if output_names else None,
                    external_data=False,
                    optimize=True,
                    verbose=False,
                )
        except Exception as e:
            raise IntakeError(f"torch.onnx.export failed on the torch.export program: {e}") from e
        assert program is not None
        model = program.model_proto
        for inp in model.graph.input:
            if inp.type.tensor_type.shape.dim[0].HasField("dim_value"):
                raise IntakeError(
                    f"the torch.export program fixes the batch size of input {inp.name!r}; "
                    "export it with dynamic_shapes={'x': {0: torch.export.Dim('batch')}} "
                    "so devices can run any batch size"
                )
        return model, notes
    if not is_script:
        try:
            batch = torch.export.Dim("batch")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                program = torch.onnx.export(
                    module,
                    args,
                    dynamo=True,
                    opset_version=opset,
                    input_names=list(input_names),
                    output_names=list(output_names) if output_names else None,
                    dynamic_shapes=tuple({0: batch} for _ in args),
                    external_data=False,
                    optimize=True,
                    verbose=False,
                )
            assert program is not None
            return program.model_proto, notes
        except Exception as e:  # fall back to the TorchScript exporter below
            notes.append(
                f"torch.export-based exporter failed ({type(e).__name__}); "
                "used the TorchScript exporter"
            )
    buf = io.BytesIO()
    names = list(output_names) if output_names else ["output"]
    axes = {n: {0: "batch"} for n in [*input_names, *names]}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                args,
                buf,  # type: ignore[arg-type]
                dynamo=False,
                opset_version=opset,
                input_names=list(input_names),
                output_names=names,
                dynamic_axes=axes,
            )
    except Exception as e:
        raise IntakeError(f"torch.onnx.export failed: {e}") from e
    return onnx.load_from_string(buf.getvalue()), notes


def _torch_runner(module: Any, input_names: Sequence[str]) -> Runner:
    import torch

    def run(inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        args = [torch.from_numpy(np.ascontiguousarray(inputs[n])) for n in input_names]
        with torch.no_grad():
            out = module(*args)
        outs = out if isinstance(out, (tuple, list)) else [out]
        return [o.detach().cpu().numpy() for o in outs]

    return run


def from_torch(
    module: Any,
    example_inputs: Any,
    *,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    opset: int = TORCH_OPSET,
    task: str | Mapping[str, str] | None = None,
) -> SourceModel:
    """Take a PyTorch module (``nn.Module``, TorchScript, or a ``torch.export`` program).

    ``example_inputs`` is an array/tensor or a tuple of them, each with a batch
    dimension first; the export makes that dimension dynamic. The module is
    put into eval mode.
    """
    import torch

    program = None
    if isinstance(module, torch.export.ExportedProgram):
        _refuse_fixed_batch(module, example_inputs)
        program, module = module, module.module()
    if not callable(module):
        raise IntakeError(f"expected a torch module, got {type(module).__name__}")
    if hasattr(module, "eval"):
        # modules unflattened from a torch.export program are frozen and refuse eval()
        with contextlib.suppress(NotImplementedError):
            module.eval()
    example = _as_arrays(example_inputs)
    names = (
        list(input_names)
        if input_names
        else (["x"] if len(example) == 1 else [f"x{i}" for i in range(len(example))])
    )
    if len(names) != len(example):
        raise IntakeError(f"{len(names)} input names for {len(example)} example inputs")
    runner = _torch_runner(module, names)
    try:
        runner(dict(zip(names, example, strict=True)))
    except Exception as e:
        raise IntakeError(f"the module does not run on the example inputs: {e}") from e
    model, notes = export_torch(program or module, example, names, output_names, opset)
    _check_onnx(model, "the exported model")
    inputs, outputs, _ = onnx_model_signature(model)
    raw = model.SerializeToString()
    return SourceModel(
        origin="torch",
        inputs=inputs,
        outputs=outputs,
        reference=runner,
        reference_runtime=f"torch {torch.__version__}",
        tasks=_tasks(outputs, task),
        sha256=_sha256(raw),
        onnx_model=model,
        notes=notes,
    )


def _refuse_fixed_batch(program: Any, example_inputs: Any) -> None:
    """A torch.export program whose batch dimension is a constant cannot take samples of
    another batch size, nor serve one: say how to re-export it."""
    user = set(program.graph_signature.user_inputs)
    rows = [len(a) for a in _as_arrays(example_inputs)]
    for node in program.graph.nodes:
        if node.op != "placeholder" or node.name not in user:
            continue
        val = node.meta.get("val")
        shape = getattr(val, "shape", None)
        if not shape or not isinstance(shape[0], int):
            continue  # a symbolic (dynamic) batch
        given = f" (the samples have batch {rows[0]})" if rows and rows[0] != shape[0] else ""
        raise IntakeError(
            f"the torch.export program fixes the batch size of input {node.name!r} to "
            f"{shape[0]}{given}. Re-export it with a dynamic batch: torch.export.export(model, "
            f"(x,), dynamic_shapes={{'{node.name}': {{0: torch.export.Dim('batch')}}}}); "
            "--input-shape cannot change the shapes of an exported program"
        )


def from_sklearn(
    estimator: Any,
    example_inputs: Any,
    *,
    input_name: str = "x",
    opsets: Mapping[str, int] | None = None,
) -> SourceModel:
    """Take a fitted scikit-learn estimator or pipeline (classifier or regressor).

    Classifiers give one output, ``probabilities`` (``[N, classes]`` float32,
    what ``predict_proba`` returns); regressors give ``variable`` (``[N, 1]``
    or ``[N, targets]``, what ``predict`` returns).
    """
    from skl2onnx import to_onnx
    from sklearn.base import is_classifier, is_regressor

    x = np.asarray(example_inputs, dtype=np.float32)
    if x.ndim != 2:
        raise IntakeError(f"example inputs must be a 2-D [samples, features] array, got {x.shape}")
    classifier = is_classifier(estimator)
    if not classifier and not is_regressor(estimator):
        raise IntakeError(f"{type(estimator).__name__} is neither a classifier nor a regressor")
    if classifier and not hasattr(estimator, "predict_proba"):
        raise IntakeError(
            f"{type(estimator).__name__} has no predict_proba; use a probabilistic classifier"
        )
    from skl2onnx.common.data_types import FloatTensorType

    try:
        model = to_onnx(
            estimator,
            initial_types=[(input_name, FloatTensorType([None, x.shape[1]]))],
            options={"zipmap": False} if classifier else None,
            target_opset=dict(opsets or SKLEARN_OPSETS),
        )
    except Exception as e:
        raise IntakeError(f"skl2onnx cannot convert {type(estimator).__name__}: {e}") from e
    from .onnx_tools import normalize_opset_imports

    normalize_opset_imports(model)
    if classifier:
        keep = [o for o in model.graph.output if o.name == "probabilities"]
        del model.graph.output[:]
        model.graph.output.extend(keep)

    def run(inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        batch = np.asarray(inputs[input_name])
        if classifier:
            return [np.asarray(estimator.predict_proba(batch))]
        out = np.asarray(estimator.predict(batch))
        return [out.reshape(len(batch), -1)]

    _check_onnx(model, "the converted model")
    inputs, outputs, _ = onnx_model_signature(model)
    import sklearn

    return SourceModel(
        origin="sklearn",
        inputs=inputs,
        outputs=outputs,
        reference=run,
        reference_runtime=f"scikit-learn {sklearn.__version__}",
        tasks=_tasks(outputs, "classification" if classifier else "regression"),
        sha256=_sha256(model.SerializeToString()),
        onnx_model=model,
    )


def from_tflite(
    model: str | os.PathLike[str] | bytes, *, task: str | Mapping[str, str] | None = None
) -> SourceModel:
    """Take a TFLite flatbuffer (path or bytes): inspected, validated, passed through."""
    from .introspect import tflite_signature

    if isinstance(model, bytes):
        data = model
    else:
        try:
            data = Path(model).read_bytes()
        except OSError as e:
            raise IntakeError(f"cannot read {model}: {e}") from e
    if len(data) < 8 or data[4:8] != b"TFL3":
        raise IntakeError("not a TFLite flatbuffer (no TFL3 identifier); give a .tflite file")
    from .errors import PackError

    with _temp_file(data, ".tflite") as path:
        try:
            inputs, outputs, _ = tflite_signature(path)
        except PackError as e:
            raise IntakeError(str(e)) from e
    from device_agent.runtime import load_backend

    backend = _tflite_backend(data, load_backend)
    return SourceModel(
        origin="tflite",
        inputs=inputs,
        outputs=outputs,
        reference=lambda inputs: backend.run(dict(inputs)),
        reference_runtime=f"{backend.name}",
        tasks=_tasks(outputs, task),
        sha256=_sha256(data),
        tflite_bytes=data,
    )


def _tflite_backend(data: bytes, load_backend: Any) -> Any:
    # The interpreter reads the file at load time, so the temp file can go after.
    with _temp_file(data, ".tflite") as path:
        try:
            backend = load_backend(path, "tflite")
        except Exception as e:
            raise IntakeError(f"the TFLite interpreter refuses the model: {e}") from e
    return backend


class _temp_file:
    def __init__(self, data: bytes, suffix: str) -> None:
        import tempfile

        fd, name = tempfile.mkstemp(suffix=suffix, prefix="edgefleet-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        self.path = Path(name)

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc: object) -> None:
        self.path.unlink(missing_ok=True)


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,224,224"`` -> ``(1, 3, 224, 224)``."""
    try:
        shape = tuple(int(s) for s in text.replace("x", ",").split(",") if s.strip())
    except ValueError as e:
        raise IntakeError(f"input shape {text!r} must be integers like 1,3,224,224") from e
    if not shape or any(s <= 0 for s in shape):
        raise IntakeError(f"input shape {text!r} must be positive integers like 1,3,224,224")
    return shape


def load_source(
    path: str | os.PathLike[str],
    *,
    input_shape: Sequence[int] | None = None,
    example_inputs: np.ndarray | None = None,
    allow_pickle: bool = False,
    task: str | None = None,
) -> SourceModel:
    """Open a model file by its extension.

    * ``.onnx``: ONNX; ``.tflite``: TFLite (passed through);
    * ``.joblib``/``.pkl``/``.pickle``: a pickled scikit-learn model. Unpickling
      runs code from the file, so ``allow_pickle=True`` is required and only
      files you trust should be given; ``example_inputs`` are required;
    * ``.pt``/``.pt2``: TorchScript (``torch.jit.save``) or a ``torch.export``
      program (``torch.export.save``); ``input_shape`` or ``example_inputs``
      give the example input (batch first).
    """
    path = Path(path)
    if not path.is_file():
        raise IntakeError(f"no such model file {path}")
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return from_onnx(path, task=task)
    if suffix == ".tflite":
        return from_tflite(path, task=task)
    if suffix in (".joblib", ".pkl", ".pickle"):
        if not allow_pickle:
            raise IntakeError(
                f"{path} is a pickle; loading it executes code from the file. "
                "Pass allow_pickle=True (CLI: --trust-pickle) only for files you trust"
            )
        if example_inputs is None:
            raise IntakeError("a scikit-learn model needs example inputs (a .npy file)")
        import joblib

        try:
            estimator = joblib.load(path)
        except Exception as e:
            raise IntakeError(f"cannot unpickle {path}: {e}") from e
        return from_sklearn(estimator, example_inputs)
    if suffix in (".pt", ".pt2", ".pth"):
        if example_inputs is None:
            if input_shape is None:
                raise IntakeError(f"{path} needs an input shape (CLI: --input-shape 1,3,32,32)")
            rng = np.random.default_rng(0)
            example_inputs = rng.normal(size=tuple(input_shape)).astype(np.float32)
        return from_torch(_load_torch(path), example_inputs, task=task)
    raise IntakeError(
        f"cannot tell the model type of {path.name}; use .onnx, .tflite, .joblib/.pkl "
        "(scikit-learn), or .pt/.pt2 (TorchScript or torch.export)"
    )


def _load_torch(path: Path) -> Any:
    import torch

    errors = []
    try:
        return torch.jit.load(str(path), map_location="cpu")
    except Exception as e:
        errors.append(f"TorchScript: {e}")
    try:
        return torch.export.load(str(path))
    except Exception as e:
        errors.append(f"torch.export: {e}")
    raise IntakeError(
        f"{path} is neither a TorchScript file nor a torch.export program "
        f"({'; '.join(str(x)[:200] for x in errors)}); a plain state_dict cannot be "
        "converted without its module class: save with torch.jit.save or torch.export.save"
    )
