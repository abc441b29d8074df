"""Render a :class:`ReviewDataset` as one self-contained HTML page.

The page needs nothing from the network: the plots are inline SVG (see
:mod:`.plots`), the style sheet is inline, there is no script. The same page is
written by ``edgefleet report`` and served by the dashboard; the dashboard only
adds a navigation bar (``nav``).

Sections, each with a stable ``id`` (tests and readers can link to them):
``summary``, ``fleet``, ``adoption``, ``rollouts``, ``latency``, ``drift``,
``predictions``. :func:`write_report` is the I/O shell: durable writes of the
HTML and, optionally, the JSON export (``dataset.to_json()``).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import datetime
from html import escape
from pathlib import Path

from fleet_server.report.dataset import GateRow, ReviewDataset, RolloutRow, sorted_versions
from fleet_server.report.plots import render_plots, version_colors
from fleet_server.rollouts.numbering import people_stages

SECTIONS = (
    ("summary", "Summary"),
    ("fleet", "Fleet"),
    ("adoption", "Version adoption"),
    ("rollouts", "Rollouts and gate decisions"),
    ("latency", "Latency and errors"),
    ("drift", "Input drift"),
    ("predictions", "Predictions"),
    ("alerts", "Alerts"),
)

CSS = """
:root { --fg:#1a1a1a; --muted:#5b5b5b; --line:#e3e3e3; --bad:#b23a00; --good:#00795a;
        --warn:#9a6a00; --bg:#ffffff; --panel:#f7f7f5; }
* { box-sizing: border-box; }
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", "DejaVu Sans", sans-serif;
       color: var(--fg); background: var(--bg); margin: 0; }
header { padding: 18px 32px 10px; border-bottom: 1px solid var(--line); }
header h1 { margin: 0 0 4px; font-size: 22px; }
header .period { color: var(--muted); }
nav.sections { display:flex; flex-wrap:wrap; gap: 4px 16px; margin-top: 8px; font-size: 14px; }
nav.sections a, nav.dash a { color: #0b5cab; text-decoration: none; }
nav.dash { display:flex; gap: 14px; align-items: center; padding: 8px 32px; font-size: 14px;
           background: var(--panel); border-bottom: 1px solid var(--line); }
nav.dash .current { font-weight: bold; color: var(--fg); }
main { padding: 8px 32px 40px; max-width: 1280px; }
section { margin-top: 28px; }
h2 { font-size: 18px; border-bottom: 1px solid var(--line); padding-bottom: 4px; }
h3 { font-size: 15px; margin: 18px 0 6px; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; margin: 12px 0; }
.card { background: var(--panel); border: 1px solid var(--line); border-radius: 6px;
        padding: 10px 14px; min-width: 150px; }
.card .num { font-size: 26px; font-weight: 600; }
.card .lbl { color: var(--muted); font-size: 13px; }
ul.outcomes { padding-left: 20px; }
.status-succeeded { color: var(--good); font-weight: 600; }
.status-rolled_back, .status-aborted { color: var(--bad); font-weight: 600; }
.status-paused { color: var(--warn); font-weight: 600; }
table { border-collapse: collapse; font-size: 13px; margin: 6px 0 12px; }
th, td { border-bottom: 1px solid var(--line); padding: 4px 10px; text-align: left; }
th { background: var(--panel); position: sticky; top: 0; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.breach td { background: #fde9e1; }
tr.first td { border-top: 2px solid #cfcfcf; }
td.verdict-breach { color: var(--bad); font-weight: 600; }
td.verdict-pass { color: var(--good); }
td.verdict-wait, td.verdict-skip { color: var(--muted); }
.scroll { max-height: 420px; overflow: auto; border: 1px solid var(--line); }
.scroll table { margin: 0; width: 100%; }
svg.plot { width: 100%; height: auto; display: block; }
figure { margin: 8px 0 16px; }
figcaption { color: var(--muted); font-size: 13px; }
.empty { color: var(--muted); font-style: italic; }
.notes { background: #fff7e0; border: 1px solid #f0dca0; padding: 8px 14px; border-radius: 6px; }
.health-ok { color: var(--good); } .health-offline, .health-failed { color: var(--bad); }
.health-degraded { color: var(--warn); }
"""


def _fmt_time(ts: datetime | None) -> str:
    return ts.strftime("%Y-%m-%d %H:%M:%S UTC") if ts else "–"


def format_gate_value(name: str, value: float | None) -> str:
    """A gate figure in the unit a reader expects: rates in %, latency in ms, PSI plain."""
    if value is None:
        return "–"
    if "rate" in name:
        return f"{100 * value:.2f}%"
    if "latency" in name:
        return f"{value:.2f} ms"
    return f"{value:.3f}"


def format_threshold(name: str, threshold: float) -> str:
    if name == "error_rate" or name.startswith("error_rate"):
        return f"+{100 * threshold:.2f} pt"
    if "rate" in name:
        return f"{100 * threshold:.2f}%"
    if "latency" in name:
        return f"× {threshold:g}"
    return f"{threshold:g}"


def describe_breach(g: GateRow) -> str:
    """``error_rate (canary 9.10% vs control 0.19%, threshold +1.00 pt)``."""
    if "shift" in g.name:
        # one figure between the cohorts (a divergence), not one per cohort
        return (
            f"{g.name} (canary vs control divergence {format_gate_value(g.name, g.canary)}, "
            f"threshold {format_threshold(g.name, g.threshold)})"
        )
    vs = ""
    if g.control is not None:
        vs = f" vs control {format_gate_value(g.name, g.control)}"
    return (
        f"{g.name} (canary {format_gate_value(g.name, g.canary)}{vs}, "
        f"threshold {format_threshold(g.name, g.threshold)})"
    )


def _table(
    headers: Sequence[str],
    rows: Iterable[Sequence[str]],
    *,
    num: Sequence[int] = (),
    row_class: Sequence[str] | None = None,
    cell_class: dict[int, Sequence[str]] | None = None,
    table_id: str = "",
) -> str:
    tid = f' id="{escape(table_id)}"' if table_id else ""
    head = "".join(
        f"<th{' class=num' if i in num else ''}>{escape(h)}</th>" for i, h in enumerate(headers)
    )
    body = []
    for r, row in enumerate(rows):
        rc = f' class="{row_class[r]}"' if row_class and row_class[r] else ""
        cells = []
        for i, c in enumerate(row):
            classes = ["num"] if i in num else []
            if cell_class and i in cell_class:
                classes.append(cell_class[i][r])
            cls = f' class="{" ".join(classes)}"' if classes else ""
            cells.append(f"<td{cls}>{escape(c)}</td>")
        body.append(f"<tr{rc}>{''.join(cells)}</tr>")
    return f"<table{tid}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _summary(ds: ReviewDataset) -> str:
    health = Counter(d.health for d in ds.devices)
    running = Counter(d.bundle for d in ds.devices)
    cards = [(str(len(ds.devices)), "devices in the fleet", "fleet-size")]
    for h in ("ok", "degraded", "offline"):
        if health.get(h):
            cards.append((str(health[h]), f"devices {h}", f"health-{h}"))
    stale = sum(d.health_code == "stale_metadata" for d in ds.devices)
    if stale:
        cards.append((str(stale), "devices on stale update metadata", "stale-metadata"))
    cards.append((str(len(ds.rollouts)), "rollouts in the period", "rollout-count"))
    html = ['<div class="cards">']
    for num, lbl, key in cards:
        html.append(
            f'<div class="card" data-key="{key}"><div class="num">{num}</div>'
            f'<div class="lbl">{escape(lbl)}</div></div>'
        )
    html.append("</div>")
    if running:
        now = ", ".join(f"{v}: {running[v]}" for v in sorted_versions(list(running)))
        html.append(f"<p>Running now: {escape(now)}.</p>")
    if ds.rollouts:
        html.append('<ul class="outcomes">')
        for r in ds.rollouts:
            html.append(f"<li>{_rollout_outcome(r)}</li>")
        html.append("</ul>")
    else:
        html.append('<p class="empty">No rollout ran in this period.</p>')
    if ds.notes:
        items = "".join(f"<li>{escape(n)}</li>" for n in ds.notes)
        html.append(f'<div class="notes"><strong>Missing data</strong><ul>{items}</ul></div>')
    return "".join(html)


def _rollout_outcome(r: RolloutRow) -> str:
    status = r.status.replace("_", " ")
    prev = f" (replacing {escape(r.previous)})" if r.previous else ""
    text = (
        f"<strong>{escape(r.name or r.id)}</strong>: {escape(r.bundle)}{prev}, "
        f"{escape(r.strategy.replace('_', ' '))}, "
        f'<span class="status-{escape(r.status)}">{escape(status)}</span>'
    )
    caught = r.caught_by()
    if caught and r.status in ("rolled_back", "paused", "aborted"):
        stage = next((d.stage for d in reversed(r.decisions) if d.breaches), None)
        pct = next((s.percent for s in r.stages if s.index == stage), None)
        where = f" at stage {stage + 1} ({pct:g}%)" if stage is not None and pct else ""
        gates = "; ".join(describe_breach(g) for g in caught)
        text += f'<br><span class="caught">caught{escape(where)} by gate {escape(gates)}</span>'
    elif r.status == "succeeded":
        text += f" after {len(r.stages)} stage{'s' if len(r.stages) != 1 else ''}"
    return text


def _fleet(ds: ReviewDataset) -> str:
    if not ds.devices:
        return '<p class="empty">No devices are enrolled.</p>'
    versions = sorted_versions(list({d.bundle for d in ds.devices}))
    classes = sorted({d.device_class for d in ds.devices})
    pivot = Counter((d.device_class, d.bundle) for d in ds.devices)
    rows = [
        [
            c,
            *[str(pivot.get((c, v), 0)) for v in versions],
            str(sum(pivot.get((c, v), 0) for v in versions)),
        ]
        for c in classes
    ]
    rows.append(
        [
            "all classes",
            *[str(sum(pivot.get((c, v), 0) for c in classes)) for v in versions],
            str(len(ds.devices)),
        ]
    )
    nums = list(range(1, len(versions) + 2))
    out = [
        "<h3>Devices by class and running version</h3>",
        _table(["device class", *versions, "total"], rows, num=nums, table_id="fleet-counts"),
    ]
    devs = sorted(ds.devices, key=lambda d: d.id)
    out.append(f"<h3>Devices ({len(devs)})</h3>")
    drows = [
        [
            d.id,
            d.device_class,
            ", ".join(f"{k}={v}" for k, v in sorted(d.labels.items())),
            d.bundle,
            _fmt_time(d.last_seen),
            f"{d.health} ({d.health_code})" if d.health_code else d.health,
        ]
        for d in devs
    ]
    out.append(
        '<div class="scroll">'
        + _table(
            ["device", "class", "labels", "running", "last seen", "health"],
            drows,
            cell_class={5: [f"health-{d.health}" for d in devs]},
            table_id="fleet-devices",
        )
        + "</div>"
    )
    return "".join(out)


def _decisions(ds: ReviewDataset) -> str:
    out = []
    for r in ds.rollouts:
        rows: list[list[str]] = []
        rclass: list[str] = []
        vclass: list[str] = []
        for d in r.decisions:
            stage = "–" if d.stage is None else str(d.stage + 1)
            base = [_fmt_time(d.ts), d.action, stage]
            if not d.gates:
                who = f"by {d.actor}" if d.actor else "–"
                rows.append([*base, people_stages(d.reason) or who, "", "", "", "", "", ""])
                rclass.append("first")
                vclass.append("")
            for k, g in enumerate(d.gates):
                # the decision's time, action and stage only on its first gate row
                rows.append(
                    [
                        *(base if k == 0 else ["", "", ""]),
                        g.name,
                        format_gate_value(g.name, g.canary),
                        format_gate_value(g.name, g.control),
                        format_threshold(g.name, g.threshold),
                        f"{g.n_canary:,}",
                        f"{g.n_control:,}",
                        g.verdict,
                    ]
                )
                rclass.append(
                    " ".join(
                        c
                        for c in (
                            "first" if k == 0 else "",
                            "breach" if g.verdict == "breach" else "",
                        )
                        if c
                    )
                )
                vclass.append(f"verdict-{g.verdict}")
        out.append(
            f"<h3>{escape(r.name or r.id)} · {escape(r.bundle)} · "
            f'<span class="status-{escape(r.status)}">'
            f"{escape(r.status.replace('_', ' '))}</span></h3>"
        )
        if rows:
            out.append(
                _table(
                    [
                        "time",
                        "decision",
                        "stage",
                        "gate / reason",
                        "canary",
                        "control",
                        "threshold",
                        "n canary",
                        "n control",
                        "verdict",
                    ],
                    rows,
                    num=(4, 5, 7, 8),
                    row_class=rclass,
                    cell_class={9: vclass},
                    table_id=f"decisions-{r.id}",
                )
            )
        else:
            out.append('<p class="empty">No decisions recorded.</p>')
    return "".join(out)


def _alerts(ds: ReviewDataset) -> str:
    if not ds.alerts:
        return '<p class="empty">No alert fired or resolved in this period.</p>'
    rows = [
        [
            _fmt_time(a.ts),
            a.status,
            a.rule,
            a.kind,
            a.group,
            a.model or "-",
            "-" if a.value is None else f"{a.value:.4g}",
            f"{a.threshold:.4g}",
            a.delivery,
        ]
        for a in ds.alerts
    ]
    return (
        "<p>Alerts the server's rules raised and resolved (<code>edgefleet alerts list</code> "
        "shows each one's figures and where its window's samples are).</p>"
        + _table(
            ["time", "status", "rule", "kind", "group", "model", "value", "threshold", "webhook"],
            rows,
            num=[6, 7],
            table_id="alert-list",
        )
    )


def _figure(svg: str | None, caption: str, empty: str) -> str:
    if svg is None:
        return f'<p class="empty">{escape(empty)}</p>'
    return f"<figure>{svg}<figcaption>{escape(caption)}</figcaption></figure>"


def render_html(
    ds: ReviewDataset, *, title: str = "edgefleet telemetry review", nav: str = ""
) -> str:
    """The whole review as one HTML document. ``nav`` is trusted HTML put above the page."""
    plots = render_plots(ds)
    colors = version_colors(ds.versions())
    legend = ", ".join(f"{v}" for v in colors)
    toc = "".join(f'<a href="#{sid}">{escape(t)}</a>' for sid, t in SECTIONS)
    body = {
        "summary": _summary(ds),
        "fleet": _fleet(ds),
        "adoption": _figure(
            plots["adoption"],
            "Stacked: each band is the number of devices running one version at that time.",
            "No adoption data in this period.",
        ),
        "rollouts": _figure(
            plots["timeline"],
            "Each lane is a rollout; bars are its stages, "
            "markers its decisions. The table below lists the numbers behind "
            "each decision.",
            "No rollout ran in this period.",
        )
        + _decisions(ds),
        "latency": _figure(
            plots["latency"],
            f"Per time bin, all devices running the version ({legend}).",
            "No inference summaries in this period.",
        ),
        "drift": _figure(
            plots["drift"],
            "Count-weighted mean over the period of each "
            "feature's PSI against the bundle's reference profile.",
            "No drift summaries in this period.",
        ),
        "predictions": _figure(
            plots["predictions"],
            "Share of each predicted class in the "
            "canary cohort (candidate) and the control cohort (previous "
            "version) of each rollout.",
            "No prediction distributions in this period.",
        ),
        "alerts": _alerts(ds),
    }
    sections = "".join(
        f'<section id="{sid}"><h2>{escape(t)}</h2>{body[sid]}</section>' for sid, t in SECTIONS
    )
    period = f"{_fmt_time(ds.since)} to {_fmt_time(ds.until)}"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<link rel="icon" href="data:,">'
        f"<title>{escape(title)}</title><style>{CSS}</style></head><body>{nav}"
        f'<header><h1>{escape(title)}</h1><div class="period">{escape(period)} · generated '
        f'{escape(_fmt_time(ds.generated_at))}</div><nav class="sections">{toc}</nav></header>'
        f"<main>{sections}</main></body></html>\n"
    )


def _durable_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # a report is for reading; mkstemp's 0600 is too strict
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def dataset_json(ds: ReviewDataset) -> str:
    """The JSON export: exactly the numbers the report shows."""
    return json.dumps(ds.to_json(), indent=2, sort_keys=False) + "\n"


def write_report(
    ds: ReviewDataset,
    out: Path,
    *,
    json_path: Path | None = None,
    title: str = "edgefleet telemetry review",
) -> None:
    """Write the HTML report (and the JSON export) durably: temp file, fsync, rename."""
    _durable_write(Path(out), render_html(ds, title=title).encode())
    if json_path is not None:
        _durable_write(Path(json_path), dataset_json(ds).encode())
