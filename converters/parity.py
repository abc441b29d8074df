"""Parity: does a produced artifact compute what its source computes?

Pure core: :func:`compare` takes the source's and the artifact's outputs on
the same samples and returns a :class:`ParityReport`; it does no I/O and runs
no model.

Each output gets its max absolute error, max relative error
(``|got - ref| / max(|ref|, 1e-6)``) and, for classifier outputs, top-1
agreement (the share of samples whose argmax over the last axis matches).

Default tolerances by precision (:data:`DEFAULT_TOLERANCES`):

============  ================================================================
precision     an output passes when
============  ================================================================
float32       every element: ``|got - ref| <= 1e-4``
float16       every element: ``|got - ref| <= 1e-2 + 1e-2 * |ref|``
int8-*        classifier outputs: top-1 agreement >= 0.97;
              regression outputs: ``max |got - ref| <= 0.05 * (max(ref) - min(ref))``
============  ================================================================

A variant that fails is refused (:class:`~converters.errors.ParityError`,
carrying the report) unless the operator overrides the gate.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Tolerance:
    """When an output counts as equal to the source's.

    Elementwise: ``|got - ref| <= atol + rtol * |ref| + range_atol * (max(ref) - min(ref))``
    (an unset term is 0; with all unset the elementwise check is skipped).
    ``min_top1``: classifier outputs are judged by top-1 agreement instead.
    """

    atol: float | None = 1e-4
    rtol: float | None = None
    range_atol: float | None = None
    min_top1: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            k: v
            for k, v in (
                ("atol", self.atol),
                ("rtol", self.rtol),
                ("range_atol", self.range_atol),
                ("min_top1", self.min_top1),
            )
            if v is not None
        }


DEFAULT_TOLERANCES: dict[str, Tolerance] = {
    "float32": Tolerance(atol=1e-4),
    "float16": Tolerance(atol=1e-2, rtol=1e-2),
    "int8-dynamic": Tolerance(atol=None, range_atol=0.05, min_top1=0.97),
    "int8-static": Tolerance(atol=None, range_atol=0.05, min_top1=0.97),
}


def default_tolerance(precision: str) -> Tolerance:
    return DEFAULT_TOLERANCES.get(precision, DEFAULT_TOLERANCES["float32"])


@dataclass(frozen=True)
class OutputParity:
    """Errors of one output over all samples."""

    name: str
    task: str
    max_abs_error: float
    max_rel_error: float
    top1_agreement: float | None
    passed: bool
    judged_by: str
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "task": self.task,
            "max_abs_error": _finite(self.max_abs_error),
            "max_rel_error": _finite(self.max_rel_error),
            "passed": bool(self.passed),
            "judged_by": self.judged_by,
        }
        if self.top1_agreement is not None:
            out["top1_agreement"] = round(self.top1_agreement, 6)
        if self.detail:
            out["detail"] = self.detail
        return out


def _finite(x: float) -> float | str:
    return float(f"{x:.6g}") if np.isfinite(x) else str(x)


@dataclass(frozen=True)
class ParityReport:
    """Parity of one artifact against its source."""

    variant: str
    precision: str
    reference_runtime: str
    artifact_runtime: str
    samples: int
    samples_origin: str
    tolerance: Tolerance
    outputs: tuple[OutputParity, ...]
    overridden: bool = False
    notes: tuple[str, ...] = field(default=())

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs)

    def failures(self) -> list[OutputParity]:
        return [o for o in self.outputs if not o.passed]

    def summary(self) -> str:
        parts = []
        for o in self.outputs:
            s = f"{o.name}: max abs {o.max_abs_error:.3g}, max rel {o.max_rel_error:.3g}"
            if o.top1_agreement is not None:
                s += f", top-1 {o.top1_agreement:.3f}"
            parts.append(s + ("" if o.passed else f" FAILED ({o.detail})"))
        return f"{self.variant} on {self.samples} samples: " + "; ".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {
            "variant": self.variant,
            "precision": self.precision,
            "reference_runtime": self.reference_runtime,
            "artifact_runtime": self.artifact_runtime,
            "samples": self.samples,
            "samples_origin": self.samples_origin,
            "tolerance": self.tolerance.to_json(),
            "passed": self.passed,
            "overridden": self.overridden,
            "outputs": [o.to_json() for o in self.outputs],
            **({"notes": list(self.notes)} if self.notes else {}),
        }


def compare_output(
    name: str, task: str, ref: np.ndarray, got: np.ndarray, tol: Tolerance
) -> OutputParity:
    """Errors and verdict for one output."""
    ref64 = np.asarray(ref, dtype=np.float64)
    got64 = np.asarray(got, dtype=np.float64)
    if ref64.shape != got64.shape:
        if ref64.size == got64.size:
            got64 = got64.reshape(ref64.shape)
        else:
            return OutputParity(
                name,
                task,
                float("inf"),
                float("inf"),
                None,
                False,
                "shape",
                f"shape {got64.shape} differs from the source's {ref64.shape}",
            )
    diff = np.abs(got64 - ref64)
    if diff.size == 0:
        return OutputParity(name, task, 0.0, 0.0, None, True, "empty")
    max_abs = float(np.max(diff))
    max_rel = float(np.max(diff / np.maximum(np.abs(ref64), 1e-6)))
    if not np.all(np.isfinite(got64)):
        max_abs = max_rel = float("inf")
    top1 = None
    if task == "classification" and ref64.ndim >= 1 and ref64.shape[-1] >= 2:
        top1 = float(np.mean(np.argmax(got64, -1) == np.argmax(ref64, -1)))
    if tol.min_top1 is not None and top1 is not None:
        ok = bool(top1 >= tol.min_top1 and np.isfinite(max_abs))
        detail = "" if ok else f"top-1 agreement {top1:.3f} < {tol.min_top1:.3f}"
        return OutputParity(name, task, max_abs, max_rel, top1, ok, "top1", detail)
    if tol.atol is None and tol.rtol is None and tol.range_atol is None:
        ok = bool(np.isfinite(max_abs))
        return OutputParity(
            name, task, max_abs, max_rel, top1, ok, "none", "" if ok else "non-finite outputs"
        )
    bound = np.zeros_like(ref64)
    if tol.atol is not None:
        bound += tol.atol
    if tol.rtol is not None:
        bound += tol.rtol * np.abs(ref64)
    if tol.range_atol is not None:
        bound += tol.range_atol * float(np.max(ref64) - np.min(ref64))
    over = diff > bound
    ok = bool(not np.any(over) and np.isfinite(max_abs))
    detail = ""
    if not ok:
        i = int(np.argmax(diff - bound))
        detail = (
            f"{int(np.count_nonzero(over))} of {diff.size} elements over the bound; "
            f"worst error {diff.flat[i]:.3g} > bound {bound.flat[i]:.3g}"
        )
    return OutputParity(name, task, max_abs, max_rel, top1, ok, "elementwise", detail)


def compare(
    *,
    variant: str,
    precision: str,
    names: Sequence[str],
    tasks: Mapping[str, str],
    reference: Sequence[np.ndarray],
    produced: Sequence[np.ndarray],
    tolerance: Tolerance,
    reference_runtime: str,
    artifact_runtime: str,
    samples: int,
    samples_origin: str,
    notes: Sequence[str] = (),
) -> ParityReport:
    """Compare the artifact's outputs with the source's (same samples, same order)."""
    outs = []
    for i, name in enumerate(names):
        if i >= len(produced) or i >= len(reference):
            outs.append(
                OutputParity(
                    name,
                    tasks.get(name, "regression"),
                    float("inf"),
                    float("inf"),
                    None,
                    False,
                    "missing",
                    "output missing from one side",
                )
            )
            continue
        outs.append(
            compare_output(
                name, tasks.get(name, "regression"), reference[i], produced[i], tolerance
            )
        )
    return ParityReport(
        variant=variant,
        precision=precision,
        reference_runtime=reference_runtime,
        artifact_runtime=artifact_runtime,
        samples=samples,
        samples_origin=samples_origin,
        tolerance=tolerance,
        outputs=tuple(outs),
        notes=tuple(notes),
    )
