"""Run a conformance case through a converter path and judge the result.

Outcomes of one run (:class:`Run`):

``passed``
    the converted model's outputs match the oracle within the case's tolerance;
``refused``
    the converter raised one of its named errors (a
    :class:`~converters.errors.ConverterError` subclass);
``wrong``
    the outputs differ from the oracle, or the converter failed with an
    exception that is not one of its named errors, or the converted model does
    not run on an input the source model runs on. The suite must have none;
``n/a``
    the variant does not apply (not a rank-4 float input for ``nhwc``, the
    unconverted model itself does not run at that batch size; on the ``onnx`` path,
    a case onnxruntime itself cannot run, or computes differently from ONNX's
    expected outputs, on the unconverted model): not counted.

Oracles: at the shipped shapes, ONNX's expected outputs; at batch 1 and 2,
onnxruntime on the unconverted variant (ONNX's reference evaluator when
onnxruntime cannot run it). Tolerance: the case's ``rtol`` (ONNX's 1e-3) and
``atol`` no tighter than :data:`MIN_ATOL` (float32 kernels sum in another order).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from converters.errors import ConverterError

from .cases import NodeCase, Variant, at_batch, dynamic_batch

MIN_ATOL = 1e-5
BATCHES = (1, 2)


@dataclass(frozen=True)
class Run:
    """One converted variant at one batch size, and what came of it."""

    op: str
    case: str
    path: str
    variant: str
    batch: str
    outcome: str
    detail: str = ""


class _NotApplicable(Exception):
    pass


# -- converter paths: model -> a callable running the converted model --------------------

Runner = Callable[[Mapping[str, np.ndarray]], list[np.ndarray]]


def _tflite_runner(data: bytes) -> Runner:
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_content=data)
    details = interp.get_input_details()
    outputs = interp.get_output_details()

    def run(feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        names = list(feeds)
        for i, d in enumerate(details):
            arr = feeds[d["name"]] if d["name"] in feeds else feeds[names[i]]
            interp.resize_tensor_input(d["index"], list(arr.shape), strict=False)
        interp.allocate_tensors()
        for i, d in enumerate(details):
            arr = feeds[d["name"]] if d["name"] in feeds else feeds[names[i]]
            interp.set_tensor(d["index"], np.array(arr, dtype=d["dtype"], order="C"))
        interp.invoke()
        return [np.array(interp.get_tensor(o["index"])) for o in outputs]

    return run


def convert_tflite(model: Any) -> Runner:
    """The TFLite writer at float32 weights."""
    from converters.tflite import onnx_to_tflite

    return _tflite_runner(onnx_to_tflite(model, weights="float32"))


def _ort_runner(model: Any) -> Runner:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 4  # failures are judged here, not logged
    session = ort.InferenceSession(
        model.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"]
    )
    names = [i.name for i in session.get_inputs()]
    run_options = ort.RunOptions()
    run_options.log_severity_level = 4

    def run(feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        values = list(feeds.values())
        feed = {n: (feeds[n] if n in feeds else values[i]) for i, n in enumerate(names)}
        return [np.asarray(o) for o in session.run(None, feed, run_options)]

    return run


def is_onnxruntime_error(e: BaseException) -> bool:
    """onnxruntime's own exception types (Fail, InvalidGraph, ...), not ours."""
    return type(e).__module__.startswith("onnxruntime")


def onnx_lowering(max_opset: int, max_ir: int) -> Callable[[Any], Runner]:
    """The ONNX target path: lower to ``max_opset``/``max_ir``, optimize, run on onnxruntime."""

    def convert(model: Any) -> Runner:
        from converters import onnx_tools
        from converters.errors import LoweringError
        from converters.produce import float32_onnx_for

        optimized, _ = float32_onnx_for(model, max_ir, max_opset)
        onnx_tools.set_ir_version(optimized, max_ir)
        try:
            return _ort_runner(optimized)
        except Exception as e:
            if not is_onnxruntime_error(e):
                raise
            raise LoweringError(f"onnxruntime refuses the lowered model: {e}") from e

    return convert


# -- oracles and comparison -----------------------------------------------------------


def _oracle(
    model: Any, feeds: Mapping[str, np.ndarray], ort_only: bool = False
) -> list[np.ndarray]:
    try:
        return _ort_runner(model)(feeds)
    except Exception as e:
        if ort_only:  # the onnx path runs on onnxruntime: it cannot judge what it cannot run
            raise _NotApplicable(f"onnxruntime does not run the unconverted model: {e}") from e
    from onnx.reference import ReferenceEvaluator

    try:
        with np.errstate(all="ignore"):
            outs = ReferenceEvaluator(model).run(None, dict(feeds))
    except Exception as e:
        raise _NotApplicable(f"the unconverted model does not run: {e}") from e
    return [np.asarray(o) for o in outs]


def compare(expected: list[np.ndarray], got: list[np.ndarray], rtol: float, atol: float) -> str:
    """``""`` when ``got`` matches ``expected``, else what differs."""
    if len(got) != len(expected):
        return f"{len(got)} outputs, expected {len(expected)}"
    for i, (want, have) in enumerate(zip(expected, got, strict=True)):
        want, have = np.asarray(want), np.asarray(have)
        if want.shape != have.shape:
            return f"output {i}: shape {have.shape}, expected {want.shape}"
        if want.dtype.kind == "b" or have.dtype.kind == "b":
            if not np.array_equal(want, have):
                return f"output {i}: boolean values differ"
            continue
        w, h = want.astype(np.float64), have.astype(np.float64)
        close = np.isclose(h, w, rtol=rtol, atol=atol, equal_nan=True)
        if not close.all():
            diff = np.abs(np.where(np.isfinite(h - w), h - w, np.inf))
            j = int(np.argmax(np.where(close, -1.0, diff)))
            return (
                f"output {i}: {int((~close).sum())} of {close.size} elements differ; "
                f"at {np.unravel_index(j, w.shape)} got {h.flat[j]:.6g}, "
                f"expected {w.flat[j]:.6g}"
            )
    return ""


def _convert(path_fn: Callable[[Any], Runner], model: Any) -> tuple[Runner | None, str, str]:
    """(runner, outcome if refused/failed, detail)."""
    try:
        with np.errstate(all="ignore"):
            return path_fn(model), "", ""
    except ConverterError as e:
        return None, "refused", f"{type(e).__name__}: {e}"
    except Exception as e:  # not one of the converter's named errors: a bug
        return None, "wrong", f"unnamed failure {type(e).__name__}: {e}"


def _judge_run(
    runner: Runner, feeds: Mapping[str, np.ndarray], expected: list[np.ndarray], case: NodeCase
) -> tuple[str, str]:
    try:
        with np.errstate(all="ignore"):
            got = runner(feeds)
    except Exception as e:
        return "wrong", f"the converted model fails to run: {type(e).__name__}: {e}"
    problem = compare(expected, got, case.rtol, max(case.atol, MIN_ATOL))
    return ("wrong", problem) if problem else ("passed", "")


def _ort_disagrees(variant: Variant, case: NodeCase) -> bool:
    """onnxruntime on the *unconverted* variant fails or differs from ONNX's expected
    outputs (e.g. its align_corners downsampling): a runtime matter, not the lowering's."""
    try:
        with np.errstate(all="ignore"):
            got = _ort_runner(variant.model)(variant.feeds)
    except Exception:
        return True
    return bool(compare(case.outputs, got, case.rtol, max(case.atol, MIN_ATOL)))


def judge_variant(path: str, path_fn: Callable[[Any], Runner], variant: Variant) -> list[Run]:
    """Runs of one variant: shipped shapes, then batch 1 and 2 with a dynamic batch."""
    case = variant.case
    runs = []

    def record(batch: str, outcome: str, detail: str = "") -> None:
        runs.append(Run(case.op, case.name, path, variant.name, batch, outcome, detail))

    runner, outcome, detail = _convert(path_fn, variant.model)
    if runner is None:
        record("shipped", outcome, detail)
    else:
        result = _judge_run(runner, variant.feeds, case.outputs, case)
        if result[0] == "wrong" and path == "onnx" and _ort_disagrees(variant, case):
            result = ("n/a", "onnxruntime itself fails or differs on the unconverted model")
        record("shipped", *result)
    dynamic = dynamic_batch(variant)
    if dynamic is None:
        return runs
    oracle_runs = []
    for batch in BATCHES:
        feeds = at_batch(variant, batch)
        try:
            oracle_runs.append((batch, feeds, _oracle(dynamic, feeds, path == "onnx")))
        except _NotApplicable:
            continue
    if not oracle_runs:
        return runs
    runner, outcome, detail = _convert(path_fn, dynamic)
    for batch, feeds, expected in oracle_runs:
        if runner is None:
            record(str(batch), outcome, detail)
        else:
            record(str(batch), *_judge_run(runner, feeds, expected, case))
    return runs
