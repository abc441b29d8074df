"""Parity: does a produced artifact compute what its source computes?

Pure core: :func:`compare` takes the source's and the artifact's outputs on
the same samples and returns a :class:`ParityReport`; it does no I/O and runs
no model. The pipeline runs the artifact the way devices do (one sample at a
time, and at the other batch sizes the artifact allows) on validation samples
held out from calibration, and compares each batch size separately
(:func:`compare_batches`).

Each output gets its max absolute error, max relative error
(``|got - ref| / max(|ref|, 1e-6)``) and, for classifier outputs, top-1
agreement (the share of samples whose argmax over the last axis matches).

Default tolerances by precision (:data:`DEFAULT_TOLERANCES`). ``scale`` is the
output's magnitude, ``max(1, max |ref|)`` over all samples, so the bound follows
the size of the numbers the output carries (logits of 20 get a bound 20 times that
of probabilities):

============  ================================================================
precision     an output passes when
============  ================================================================
float32       every element: ``|got - ref| <= 1e-4 * scale + 1e-4 * |ref|``
float16       every element: ``|got - ref| <= 1e-2 * scale + 1e-2 * |ref|``
int8-*        classifier outputs: top-1 agreement not shown to be below 0.97: the
              upper end of its 95 % Wilson interval is >= 0.97 (one flip in 32 passes,
              five fail); judged only on enough samples that one disagreement alone
              cannot fail it (:func:`min_top1_samples`, 7 at 0.97), else refused
              saying how many are needed;
              regression outputs: ``max |got - ref| <= 0.05 * (max(ref) - min(ref))``
============  ================================================================

A variant that fails is refused (:class:`~converters.errors.ParityError`,
carrying the report) unless the operator overrides the gate.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

#: z of the two-sided 95 % interval used for top-1 agreement.
Z95 = 1.959964


@dataclass(frozen=True)
class Tolerance:
    """When an output counts as equal to the source's.

    Elementwise: ``|got - ref| <= atol + scaled_atol * max(1, max|ref|) + rtol * |ref|
    + range_atol * (max(ref) - min(ref))`` (an unset term is 0; with all unset the
    elementwise check is skipped). ``min_top1``: classifier outputs are judged by
    top-1 agreement instead (Wilson upper bound at 95 %).
    """

    atol: float | None = 1e-4
    rtol: float | None = None
    range_atol: float | None = None
    min_top1: float | None = None
    scaled_atol: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            k: v
            for k, v in (
                ("atol", self.atol),
                ("scaled_atol", self.scaled_atol),
                ("rtol", self.rtol),
                ("range_atol", self.range_atol),
                ("min_top1", self.min_top1),
            )
            if v is not None
        }

    @property
    def elementwise(self) -> bool:
        return any(v is not None for v in (self.atol, self.rtol, self.range_atol, self.scaled_atol))


DEFAULT_TOLERANCES: dict[str, Tolerance] = {
    "float32": Tolerance(atol=None, scaled_atol=1e-4, rtol=1e-4),
    "float16": Tolerance(atol=None, scaled_atol=1e-2, rtol=1e-2),
    "int8-dynamic": Tolerance(atol=None, range_atol=0.05, min_top1=0.97),
    "int8-static": Tolerance(atol=None, range_atol=0.05, min_top1=0.97),
    "int8-full": Tolerance(atol=None, range_atol=0.05, min_top1=0.97),
    "int8-full-io": Tolerance(atol=None, range_atol=0.05, min_top1=0.97),
}


def default_tolerance(precision: str) -> Tolerance:
    return DEFAULT_TOLERANCES.get(precision, DEFAULT_TOLERANCES["float32"])


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of the proportion ``successes / n``; (0, 1) when n == 0."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def min_top1_samples(threshold: float, z: float = Z95) -> int:
    """Fewest samples on which a single disagreement does not fail ``threshold`` alone."""
    for n in range(2, 100_000):
        if wilson(n - 1, n, z)[1] >= threshold:
            return n
    return 100_000


@dataclass(frozen=True)
class OutputParity:
    """Errors of one output over all samples (at the batch size that judged it)."""

    name: str
    task: str
    max_abs_error: float
    max_rel_error: float
    top1_agreement: float | None
    passed: bool
    judged_by: str
    detail: str = ""
    batch: int | None = None
    bound: float | None = None
    top1_interval: tuple[float, float] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "task": self.task,
            "max_abs_error": _finite(self.max_abs_error),
            "max_rel_error": _finite(self.max_rel_error),
            "passed": bool(self.passed),
            "judged_by": self.judged_by,
        }
        if self.batch is not None:
            out["batch"] = self.batch
        if self.bound is not None:
            out["bound_at_worst_element"] = _finite(self.bound)
        if self.top1_agreement is not None:
            out["top1_agreement"] = round(self.top1_agreement, 6)
        if self.top1_interval is not None:
            out["top1_wilson95"] = [round(v, 6) for v in self.top1_interval]
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
    batch_sizes: tuple[int, ...] = ()
    calibration_samples: int | None = None
    held_out: bool = False
    other_batches: Mapping[int, tuple[OutputParity, ...]] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs)

    def failures(self) -> list[OutputParity]:
        return [o for o in self.outputs if not o.passed]

    def summary(self) -> str:
        parts = []
        for o in self.outputs:
            s = f"{o.name}: max abs {o.max_abs_error:.6g}, max rel {o.max_rel_error:.6g}"
            if o.top1_agreement is not None:
                s += f", top-1 {o.top1_agreement:.4f}"
            if o.batch is not None:
                s += f" (batch {o.batch})"
            parts.append(s + ("" if o.passed else f" FAILED ({o.detail})"))
        batches = f" at batch {', '.join(map(str, self.batch_sizes))}" if self.batch_sizes else ""
        return f"{self.variant} on {self.samples} samples{batches}: " + "; ".join(parts)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
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
        }
        if self.batch_sizes:
            out["batch_sizes"] = list(self.batch_sizes)
        if self.other_batches:
            out["other_batch_sizes"] = {
                str(b): [o.to_json() for o in outs] for b, outs in self.other_batches.items()
            }
        if self.calibration_samples is not None:
            out["calibration_samples"] = self.calibration_samples
        out["held_out_from_calibration"] = self.held_out
        if self.notes:
            out["notes"] = list(self.notes)
        return out


def _judge_top1(
    name: str, task: str, max_abs: float, max_rel: float, agree: np.ndarray, tol: Tolerance
) -> OutputParity:
    assert tol.min_top1 is not None
    n, k = int(agree.size), int(np.count_nonzero(agree))
    top1 = k / n
    interval = wilson(k, n)
    needed = min_top1_samples(tol.min_top1)
    if n < needed:
        detail = (
            f"too few samples to judge top-1 agreement >= {tol.min_top1:g}: {n} given, "
            f"at least {needed} needed (with fewer, one disagreement alone decides); "
            "give more validation samples"
        )
        return OutputParity(
            name, task, max_abs, max_rel, top1, False, "top1", detail, top1_interval=interval
        )
    ok = bool(interval[1] >= tol.min_top1 and np.isfinite(max_abs))
    detail = (
        ""
        if ok
        else (
            f"top-1 agreement {k}/{n} = {top1:.4f}; its 95 % Wilson interval "
            f"[{interval[0]:.4f}, {interval[1]:.4f}] lies below {tol.min_top1:g}"
        )
    )
    return OutputParity(
        name, task, max_abs, max_rel, top1, ok, "top1", detail, top1_interval=interval
    )


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
    agree = None
    if task == "classification" and ref64.ndim >= 1 and ref64.shape[-1] >= 2:
        agree = np.argmax(got64, -1) == np.argmax(ref64, -1)
        top1 = float(np.mean(agree))
    if tol.min_top1 is not None and agree is not None:
        return _judge_top1(name, task, max_abs, max_rel, agree.reshape(-1), tol)
    if not tol.elementwise:
        ok = bool(np.isfinite(max_abs))
        return OutputParity(
            name, task, max_abs, max_rel, top1, ok, "none", "" if ok else "non-finite outputs"
        )
    bound = np.zeros_like(ref64)
    if tol.atol is not None:
        bound += tol.atol
    if tol.scaled_atol is not None:
        bound += tol.scaled_atol * max(1.0, float(np.max(np.abs(ref64))))
    if tol.rtol is not None:
        bound += tol.rtol * np.abs(ref64)
    if tol.range_atol is not None:
        bound += tol.range_atol * float(np.max(ref64) - np.min(ref64))
    over = diff > bound
    ok = bool(not np.any(over) and np.isfinite(max_abs))
    i = int(np.argmax(diff - bound))
    detail = ""
    if not ok:
        detail = (
            f"{int(np.count_nonzero(over))} of {diff.size} elements over the bound; "
            f"worst error {diff.flat[i]:.6g} > bound {bound.flat[i]:.6g} "
            f"(reference value {ref64.flat[i]:.6g})"
        )
    return OutputParity(
        name, task, max_abs, max_rel, top1, ok, "elementwise", detail, bound=float(bound.flat[i])
    )


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


def compare_batches(
    *,
    produced_by_batch: Mapping[int, Sequence[np.ndarray]],
    judged_at: Sequence[int] | None = None,
    calibration_samples: int | None = None,
    **kwargs: Any,
) -> ParityReport:
    """:func:`compare` at each batch size. The gate is the worst output over the batch
    sizes in ``judged_at`` (default: all; a failing one first, else the largest error);
    the other batch sizes are recorded (:attr:`ParityReport.other_batches`) and a
    failure there becomes a note. ``kwargs`` are :func:`compare`'s."""
    reports = {b: compare(produced=outs, **kwargs) for b, outs in produced_by_batch.items()}
    gate = [b for b in reports if judged_at is None or b in judged_at]
    first = reports[gate[0]]
    merged = []
    for i, _ in enumerate(first.outputs):
        candidates = [replace(reports[b].outputs[i], batch=b) for b in gate]
        merged.append(min(candidates, key=lambda o: (o.passed, -o.max_abs_error)))
    others = {
        b: tuple(replace(o, batch=b) for o in r.outputs)
        for b, r in reports.items()
        if b not in gate
    }
    notes = list(first.notes)
    for b, outs in others.items():
        for o in outs:
            if not o.passed:
                notes.append(
                    f"at batch {b} output {o.name} would fail ({o.detail}); devices serve "
                    f"batch {', '.join(map(str, gate))}: do not batch requests to this artifact"
                )
    return replace(
        first,
        outputs=tuple(merged),
        batch_sizes=tuple(gate),
        other_batches=others,
        calibration_samples=calibration_samples,
        notes=tuple(notes),
    )
