"""ONNX graph passes: offline optimization and lowering to an older runtime.

Invariants:

* Lowering never changes what the graph computes: the opset goes down only
  through :func:`onnx.version_converter.convert_version`, and the IR version
  goes down only when the model uses nothing the lower IR lacks (element
  types, model-local functions, the opsets' own IR needs). Otherwise a
  :class:`LoweringError` says what stands in the way.
* Optimization is onnxruntime's ``ORT_ENABLE_BASIC`` level (constant folding,
  redundant node removal, batch norm folding into convolutions): semantics
  preserving rewrites with standard ONNX operators only, so the optimized
  file still loads in any onnxruntime that loads the input.
"""

from __future__ import annotations

import os
import re
import tempfile
from typing import Any

import numpy as np

from .errors import LoweringError

ML_DOMAIN = "ai.onnx.ml"

# Lowest IR version that can carry each TensorProto element type (newer types only).
_ELEM_TYPE_MIN_IR = {17: 9, 18: 9, 19: 9, 20: 9, 21: 10, 22: 10, 23: 11}
_NEWEST_TYPE_IR = 12  # element types numbered above the table need at least this

_UNSUPPORTED_IR = re.compile(
    r"Unsupported model IR version: (\d+), max supported IR version: (\d+)"
)


def opsets(model: Any) -> dict[str, int]:
    """``{domain: version}`` of a model ("" is the default ai.onnx domain)."""
    out: dict[str, int] = {}
    for o in model.opset_import:
        dom = "" if o.domain in ("", "ai.onnx") else o.domain
        out[dom] = max(out.get(dom, 0), int(o.version))
    return out


def normalize_opset_imports(model: Any) -> None:
    """Merge duplicate opset imports (some exporters write the default domain twice)."""
    merged = opsets(model)
    del model.opset_import[:]
    for dom, ver in sorted(merged.items()):
        entry = model.opset_import.add()
        entry.domain = dom
        entry.version = ver


def _elem_types(model: Any) -> set[int]:
    from onnx import AttributeProto

    types: set[int] = set()

    def graph_types(g: Any) -> None:
        for t in g.initializer:
            types.add(int(t.data_type))
        for v in list(g.input) + list(g.output) + list(g.value_info):
            if v.type.HasField("tensor_type"):
                types.add(int(v.type.tensor_type.elem_type))
        for n in g.node:
            for a in n.attribute:
                if n.op_type == "Cast" and a.name == "to":
                    types.add(int(a.i))
                if a.type == AttributeProto.TENSOR:
                    types.add(int(a.t.data_type))
                if a.type == AttributeProto.GRAPH:
                    graph_types(a.g)
                for sub in a.graphs:
                    graph_types(sub)

    graph_types(model.graph)
    return types


def min_ir_version(model: Any) -> int:
    """The lowest IR version that can carry ``model`` as it is."""
    from onnx import helper

    need = int(helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True))
    for t in _elem_types(model):
        need = max(need, _ELEM_TYPE_MIN_IR.get(t, _NEWEST_TYPE_IR if t > 23 else 3))
    if len(model.functions):
        need = max(need, 8)
    return need


def set_ir_version(model: Any, target: int) -> None:
    """Stamp ``model`` with IR version ``target`` if it can carry the model."""
    if model.ir_version <= target:
        return
    need = min_ir_version(model)
    if need > target:
        raise LoweringError(
            f"the model needs ONNX IR version {need} (its opsets or element types), "
            f"the target runtime reads at most IR {target}; pick a newer runtime for "
            "this device class or re-export the model with an older opset"
        )
    model.ir_version = target


def lower(
    model: Any, max_ir: int | None, max_opset: int | None, max_ml_opset: int | None = None
) -> tuple[Any, list[str]]:
    """Return ``model`` lowered to the given limits and a list of what was done."""
    from onnx import version_converter

    notes: list[str] = []
    normalize_opset_imports(model)
    current = opsets(model)
    if max_opset is not None and current.get("", 0) > max_opset:
        try:
            model = version_converter.convert_version(model, max_opset)
        except Exception as e:  # the converter raises RuntimeError/ValueError/ConvertError
            raise LoweringError(
                f"cannot convert the model from opset {current['']} to opset {max_opset}: {e}; "
                "re-export it at a lower opset or target a newer runtime"
            ) from e
        normalize_opset_imports(model)
        notes.append(f"opset {current['']} -> {max_opset}")
    ml = opsets(model).get(ML_DOMAIN)
    if max_ml_opset is not None and ml is not None and ml > max_ml_opset:
        raise LoweringError(
            f"the model uses {ML_DOMAIN} opset {ml}, the target runtime supports at most "
            f"{max_ml_opset}; convert it with target_opset {{'{ML_DOMAIN}': {max_ml_opset}}}"
        )
    if max_ir is not None and model.ir_version > max_ir:
        before = model.ir_version
        set_ir_version(model, max_ir)
        notes.append(f"IR {before} -> {max_ir}")
    return model, notes


def installed_ort_max_ir(model: Any) -> int | None:
    """If the installed onnxruntime refuses ``model`` for its IR version, its maximum."""
    import onnxruntime as ort

    try:
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as e:
        m = _UNSUPPORTED_IR.search(str(e))
        if m:
            return int(m.group(2))
    return None


def loadable_by_installed_ort(model: Any) -> Any:
    """A copy of ``model`` the installed onnxruntime accepts (IR lowered if that is safe)."""
    import onnxruntime as ort
    from onnx import ModelProto

    from .errors import TargetError
    from .targets import onnxruntime_limits

    copy = ModelProto()
    copy.CopyFrom(model)
    try:
        if copy.ir_version <= onnxruntime_limits(ort.__version__)[0]:
            return copy  # known to load; skip the probe session
    except TargetError:
        pass
    limit = installed_ort_max_ir(copy)
    if limit is not None:
        set_ir_version(copy, limit)
    return copy


def ort_session(model: Any, threads: int = 1) -> Any:
    """An onnxruntime CPU session over an in-memory model."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(
        model.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"]
    )


def optimize(model: Any) -> Any:
    """Apply onnxruntime's basic graph optimizations offline and return the result."""
    import onnx
    import onnxruntime as ort

    fd, path = tempfile.mkstemp(suffix=".onnx", prefix="edgefleet-opt-")
    os.close(fd)
    try:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        opts.optimized_model_filepath = path
        opts.log_severity_level = 3
        ort.InferenceSession(
            model.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"]
        )
        optimized = onnx.load(path)
    except Exception as e:
        raise LoweringError(f"onnxruntime could not optimize the model: {e}") from e
    finally:
        os.unlink(path)
    optimized.ir_version = model.ir_version
    prune_opset_imports(optimized, keep=opsets(model))
    return optimized


def _used_domains(graph: Any, out: set[str]) -> None:
    from onnx import AttributeProto

    for n in graph.node:
        out.add("" if n.domain in ("", "ai.onnx") else n.domain)
        for a in n.attribute:
            if a.type == AttributeProto.GRAPH:
                _used_domains(a.g, out)
            for sub in a.graphs:
                _used_domains(sub, out)


def prune_opset_imports(model: Any, keep: dict[str, int] | None = None) -> None:
    """Drop opset imports no node uses (onnxruntime writes every domain it knows).

    Domains in ``keep`` stay at their version there; the default domain always stays.
    """
    used: set[str] = {""}
    _used_domains(model.graph, used)
    for f in model.functions:
        used.add(f.domain)
        for n in f.node:
            used.add("" if n.domain in ("", "ai.onnx") else n.domain)
    current = opsets(model)
    merged = {d: (keep or {}).get(d, v) for d, v in current.items() if d in used}
    del model.opset_import[:]
    for dom, ver in sorted(merged.items()):
        entry = model.opset_import.add()
        entry.domain = dom
        entry.version = ver


def run(session: Any, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run an onnxruntime session on named inputs, returning every output."""
    return [np.asarray(o) for o in session.run(None, inputs)]


def toposort(model: Any) -> None:
    """Order the main graph's nodes so every input is produced before it is used."""
    graph = model.graph
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        rest = []
        for node in pending:
            if all(i in available for i in node.input):
                ordered.append(node)
                available.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            names = ", ".join(n.name or n.op_type for n in rest[:5])
            raise LoweringError(f"the graph has a cycle or dangling inputs at nodes {names}")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


def drop_value_info(model: Any) -> None:
    """Forget intermediate shape annotations (stale after rewrites; re-inferred on load)."""
    del model.graph.value_info[:]
