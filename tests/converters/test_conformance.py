"""The conformance suite: ONNX's node test cases through the TFLite writer and the ONNX
lowering. Prints the table (the one kept in docs/conformance.md) and fails on any run
that is silently wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from converters.conformance import ROWS, Report, run_conformance
from converters.conformance.cases import VARIANTS, onnx_cases
from converters.tflite import SUPPORTED_OPS

DOCS = Path(__file__).resolve().parents[2] / "docs" / "conformance.md"


@pytest.fixture(scope="module")
def report() -> Report:
    return run_conformance()


def test_no_conformance_run_is_wrong(report: Report, capsys: pytest.CaptureFixture[str]) -> None:
    with capsys.disabled():
        print("\n" + report.table())
    wrong = [
        f"{r.path} {r.case} [{r.variant}, batch {r.batch}]: {r.detail}" for r in report.wrong()
    ]
    assert not wrong, "\n".join(wrong)


def test_every_run_passes_or_is_refused_by_a_named_converter_error(report: Report) -> None:
    counted = [r for r in report.runs if r.outcome != "n/a"]
    assert {r.outcome for r in counted} <= {"passed", "refused"}
    for r in counted:
        if r.outcome == "refused":
            name = r.detail.split(":", 1)[0]
            assert name.endswith("Error") and name != "Error", r


def test_every_operator_the_writer_claims_is_a_row_with_cases_on_both_paths(report: Report) -> None:
    assert set(ROWS) == set(SUPPORTED_OPS)
    for op in ROWS:
        for path in ("tflite", "onnx"):
            assert report.counts(op, path)["cases"] > 0, (op, path)


def test_each_case_runs_as_shipped_with_initializers_and_behind_a_conv_at_batch_1_and_2(
    report: Report,
) -> None:
    runs = {
        (r.variant, r.batch)
        for r in report.runs
        if r.case == "test_globalaveragepool" and r.path == "tflite"
    }
    assert runs == {(v, b) for v in VARIANTS for b in ("shipped", "1", "2")}


def test_docs_table_lists_every_row() -> None:
    text = DOCS.read_text(encoding="utf-8")
    for op in ROWS:
        assert f"| {op} |" in text, (
            f"{op} missing: regenerate docs/conformance.md with "
            "`python -m converters.conformance --markdown > docs/conformance.md`"
        )


def test_onnx_cases_leave_out_function_expansions() -> None:
    names = [c.name for c in onnx_cases("Softmax")]
    assert names and not any("expanded" in n for n in names)
