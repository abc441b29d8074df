"""The text of ``edgefleet rollout status ROLLOUT``: a pure function of the server's answer.

Input: the JSON of ``GET /api/v1/rollouts/{id}/status``. Stages are numbered from 1
(``stage 2 of 3``); times are UTC, readable; durations in s/min/h.
"""

from __future__ import annotations

from typing import Any

from fleet_server.cli.api import readable_time
from fleet_server.rollouts.numbering import people_stages

GATE_UNITS = {
    "install_failure_rate": "installs",
    "error_rate": "predictions",
    "latency_p95_ratio": "latency samples",
    "drift_psi": "inputs",
    "prediction_shift": "predictions",
    "shadow_agreement": "comparisons",
    "accuracy": "labels",
}

#: how each kind's threshold reads (default: "vs threshold")
GATE_THRESHOLDS = {
    "shadow_agreement": "at least",
    "accuracy": "drop at most",
}


def duration(seconds: float | None) -> str:
    """``42 s``, ``3.5 min``, ``2.0 h``."""
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _num(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def _bundle(b: dict[str, Any] | None) -> str:
    return f"{b['name']} v{b['version']} ({b['bundle_id']})" if b else "-"


def render_status(data: dict[str, Any]) -> list[str]:
    """The lines ``rollout status ROLLOUT`` prints."""
    r = data.get("rollout") or {}
    lines = []
    number, total = data["stage_number"], data["stages_total"]
    stage = f"stage {number} of {total}" if number > 0 else f"not started ({total} stages)"
    lines.append(f"rollout {data['rollout_id']}  {r.get('name', '')}")
    lines.append(f"  status     {data['status']}, {stage}, strategy {r.get('strategy', '-')}")
    lines.append(f"  candidate  {_bundle(data.get('candidate'))}")
    lines.append(f"  previous   {_bundle(data.get('previous'))}")
    if data.get("rollback_bundle"):
        lines.append(f"  rollback   {_bundle(data['rollback_bundle'])}")
    group = data.get("group") or {}
    lines.append(
        f"  group      {group.get('name')} ({data['devices']['total']} devices; "
        f"canary {r.get('canary_devices', '-')}, control {r.get('control_devices', '-')})"
    )
    plan = " -> ".join(
        f"{'[' if s['number'] == number else ''}{s['percent']:g}%"
        f"{']' if s['number'] == number else ''}"
        for s in data.get("stages", [])
    )
    lines.append(f"  stages     {plan}")
    ev = data.get("evaluation") or {}
    if data["status"] in ("running", "paused") and number > 0:
        st = data["stages"][number - 1]
        elapsed = ev.get("soak_elapsed")
        required = st["soak_seconds"]
        started = readable_time(data.get("stage_started_at"))
        if required:
            pct = min(100.0, 100.0 * (elapsed or 0) / required)
            soak = f"{duration(elapsed)} of {duration(required)} ({pct:.0f}%)"
        else:
            soak = "none required"
        lines.append(f"  soak       {soak}, stage started {started}")
        lines.append(
            f"  canaries   {ev.get('canary_devices', 0)} reporting, "
            f"{st['min_devices']} needed to advance"
        )
    gates = ev.get("gates") or []
    last = data.get("last_decision")
    if not gates and last:
        gates = last["gates"]
        lines.append(
            f"  gates      as of the engine's {last['action']} at {readable_time(last['at'])}"
            f" (stage {last['stage_number']})"
        )
    elif gates:
        lines.append("  gates")
    if gates:
        width = max(len(g.get("name") or g["kind"]) for g in gates)
        for g in gates:
            unit = GATE_UNITS.get(g["kind"], "samples")
            control = (
                f", control {_num(g.get('control_value'))} ({g.get('control_samples', 0)})"
                if g.get("control_source") not in (None, "", "none", "reference")
                else ""
            )
            bound = GATE_THRESHOLDS.get(g["kind"], "vs threshold")
            lines.append(
                f"    {(g.get('name') or g['kind']).ljust(width)}  {g['verdict'].upper():<6} "
                f"{_num(g.get('canary_value'))} {bound} {_num(g['threshold'])}  "
                f"({g.get('canary_samples', 0)} of {g.get('min_samples', 0)} {unit}{control})"
            )
    label_line = _labels(ev.get("metrics") or (last or {}).get("metrics") or {})
    if label_line:
        lines.append(label_line)
    lines.append("  devices    " + _counts(data["devices"]["by_state"]))
    lines.append("  versions   " + _counts(data["devices"]["by_version"]))
    refusals = data.get("refusals") or []
    if refusals:
        lines.append("  refused or failed the candidate")
        for f in refusals:
            devices = ", ".join(f["devices"])
            more = (
                f" and {f['count'] - len(f['devices'])} more"
                if f["count"] > len(f["devices"])
                else ""
            )
            lines.append(f"    {f['code']:<22} {f['count']} device(s): {devices}{more}")
            if f.get("message"):
                lines.append(f"      {f['message']}")
    lines.append(f"  holding    {people_stages(data.get('holding', ''))}")
    actions = data.get("actions") or []
    if actions:
        lines.append(f"  you can    edgefleet rollout {'|'.join(actions)} {data['rollout_id']}")
    history = (r.get("state") or {}).get("history") or []
    if history:
        lines.append("  history")
        for h in history:
            st_no = int(h.get("stage", -1)) + 1
            lines.append(
                f"    {readable_time(h.get('ts'))}  {h['actor']:<22} {h['action']:<9} "
                f"{h['from_status']} -> {h['to_status']}, stage {st_no}  "
                f"{people_stages(h.get('reason') or '')}".rstrip()
            )
    return lines


def _labels(metrics: dict[str, Any]) -> str:
    """Accuracy on labelled predictions per cohort, overall and per true class."""
    parts = []
    for cohort in ("canary", "control"):
        c = metrics.get(cohort) or {}
        n = int(c.get("labels") or 0)
        if not n:
            continue
        part = f"{cohort} {c.get('labels_correct', 0) / n:.1%} right of {n}"
        labelled, correct = c.get("labelled_by_class") or [], c.get("correct_by_class") or []
        if labelled and len(labelled) == len(correct):
            per = " ".join(
                f"{r / k:.0%}" if k else "-" for r, k in zip(correct, labelled, strict=True)
            )
            part += f" (by class {per})"
        parts.append(part)
    return "  labels     " + "; ".join(parts) if parts else ""


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items()) or "-"
