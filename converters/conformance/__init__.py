"""Operator conformance: ONNX's node test cases through each converter path.

For every operator row (:data:`ROWS`: every operator the TFLite writer claims,
:data:`converters.tflite.SUPPORTED_OPS`, which the ONNX lowering must carry as
well), every ONNX node test case of that operator (and the row's extra cases)
is converted by each path and run:

``tflite``
    :func:`converters.tflite.onnx_to_tflite` at float32 weights, run with ai-edge-litert;
``onnx``
    the ONNX target path for the oldest onnxruntime the project knows
    (:data:`ONNX_LIMITS`): lowered by :func:`converters.onnx_tools.lower`,
    optimized, run with onnxruntime.

Each case runs in three variants (as shipped, weights as initializers, behind a
1x1 convolution; see :mod:`.cases`), each at the shipped shapes and with a dynamic
batch at batch 1 and 2. Every run passes or is refused with a named error; a
``wrong`` run is a bug (see :mod:`.judge`).

Adding an operator: give the writer its lowering (it joins ``SUPPORTED_OPS`` and
so :data:`ROWS`); cases of your own go into :data:`EXTRA_CASES` under its name.
The table in ``docs/conformance.md`` is written by
``python -m converters.conformance --markdown``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from .cases import VARIANTS, NodeCase, onnx_cases
from .extra import EXTRA_CASES
from .judge import Run, Runner, convert_tflite, judge_variant, onnx_lowering

#: (max opset, max IR) of the oldest onnxruntime release in converters.targets.ORT_LIMITS.
ONNX_LIMITS = (15, 8)

PATHS: dict[str, Callable[[object], Runner]] = {
    "tflite": convert_tflite,
    "onnx": onnx_lowering(*ONNX_LIMITS),
}

OUTCOMES = ("passed", "refused", "wrong")


@dataclass(frozen=True)
class Row:
    """One operator of the table: which paths claim it, and how to get its cases."""

    op: str
    paths: tuple[str, ...] = ("tflite", "onnx")

    def cases(self) -> list[NodeCase]:
        extra = EXTRA_CASES.get(self.op)
        return onnx_cases(self.op) + (extra() if extra else [])


def _rows() -> dict[str, Row]:
    from converters.tflite import SUPPORTED_OPS

    return {op: Row(op) for op in sorted(SUPPORTED_OPS)}


#: Operator -> row. Every operator the TFLite writer lowers has one.
ROWS: dict[str, Row] = _rows()


@dataclass
class Report:
    """All runs of a conformance pass."""

    runs: list[Run]

    def counts(self, op: str, path: str) -> dict[str, int]:
        mine = [r for r in self.runs if r.op == op and r.path == path and r.outcome != "n/a"]
        out = {k: sum(1 for r in mine if r.outcome == k) for k in OUTCOMES}
        out["cases"] = len(mine)
        return out

    def wrong(self) -> list[Run]:
        return [r for r in self.runs if r.outcome == "wrong"]

    def table(self, paths: Sequence[str] = ("tflite", "onnx")) -> str:
        """Markdown table: operator, then cases/passed/refused/wrong per path."""
        ops = sorted({r.op for r in self.runs})
        head = ["operator"]
        for p in paths:
            head += [f"{p} cases", "passed", "refused", "wrong"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        totals = {p: dict.fromkeys(("cases", *OUTCOMES), 0) for p in paths}
        for op in ops:
            cells = [op]
            for p in paths:
                c = self.counts(op, p)
                for k in totals[p]:
                    totals[p][k] += c[k]
                cells += [str(c["cases"]), str(c["passed"]), str(c["refused"]), str(c["wrong"])]
            lines.append("| " + " | ".join(cells) + " |")
        cells = ["**total**"]
        for p in paths:
            cells += [f"**{totals[p][k]}**" for k in ("cases", *OUTCOMES)]
        lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def refusals(self) -> dict[tuple[str, str, str], int]:
        """(operator, path, error name) -> number of refused runs."""
        out: dict[tuple[str, str, str], int] = {}
        for r in self.runs:
            if r.outcome == "refused":
                key = (r.op, r.path, r.detail.split(":", 1)[0])
                out[key] = out.get(key, 0) + 1
        return out


def run_conformance(
    ops: Iterable[str] | None = None, paths: Sequence[str] = ("tflite", "onnx")
) -> Report:
    """Convert and judge every case of ``ops`` (default: every row) on ``paths``."""
    runs: list[Run] = []
    for op in sorted(ops if ops is not None else ROWS):
        row = ROWS.get(op, Row(op))
        for case in row.cases():
            for make in VARIANTS.values():
                variant = make(case)
                if variant is None:
                    continue
                for path in paths:
                    if path in row.paths:
                        runs.extend(judge_variant(path, PATHS[path], variant))
    return Report(runs)
