"""The review's plots: a :class:`ReviewDataset` in, inline SVG text out.

Each ``plot_*`` function draws one figure with matplotlib's object API (no
pyplot, no backend switch, no window; safe in a server thread) and returns the SVG
markup ready to inline into HTML, or ``None`` when the dataset holds nothing to
draw. Text stays text in the SVG (``svg.fonttype = none``), so the numbers on
the axes and annotations are selectable and searchable. Colours come from the
Okabe-Ito palette, which stays distinguishable for colour-blind readers; a
version keeps its colour across every plot.
"""

from __future__ import annotations

import contextlib
import io
import math
import re
import threading
from collections import defaultdict
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any

import matplotlib
from matplotlib import dates as mdates
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.text import Text
from matplotlib.transforms import Bbox

from fleet_server.report.dataset import PredictionDist, ReviewDataset, RolloutRow, sorted_versions

PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")
CANARY_COLOR = "#E69F00"
CONTROL_COLOR = "#0072B2"
NONE_COLOR = "#BBBBBB"
#: PSI above which a shift counts as significant (the usual rule of thumb)
PSI_SIGNIFICANT = 0.25

DECISION_STYLE: dict[str, tuple[str, str, str]] = {
    # action: (marker, colour, legend text)
    "create": ("o", "#999999", "created"),
    "start": ("o", "#0072B2", "started"),
    "advance": ("^", "#009E73", "gates passed, advanced"),
    "complete": ("*", "#009E73", "completed"),
    "promote": ("^", "#56B4E9", "promoted by operator"),
    "pause": ("s", "#E69F00", "paused"),
    "resume": ("o", "#56B4E9", "resumed"),
    "rollback": ("X", "#D55E00", "rolled back"),
    "abort": ("X", "#555555", "aborted"),
}

_RC: dict[str, Any] = {
    "svg.fonttype": "none",
    "font.family": "DejaVu Sans",
    "font.size": 10,
    "axes.titlesize": 12,
    "axes.titleweight": "bold",
    "axes.titlelocation": "left",
    "axes.labelsize": 10,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.color": "#E6E6E6",
    "grid.linewidth": 0.8,
    "legend.frameon": False,
    "legend.fontsize": 9,
    "axes.axisbelow": True,
}


#: matplotlib's rcParams are process-global: one figure is styled and drawn at a time
_DRAWING = threading.Lock()


@contextlib.contextmanager
def _style() -> Iterator[None]:
    """The review's plot style around one figure, serialised across server threads."""
    with _DRAWING, matplotlib.rc_context(_RC):  # type: ignore[arg-type]
        yield


def version_colors(versions: Sequence[str]) -> dict[str, str]:
    """A stable colour per version: in name/number order, ``(none)`` grey."""
    out: dict[str, str] = {}
    i = 0
    for v in sorted_versions(list(versions)):
        if v == "(none)":
            out[v] = NONE_COLOR
        else:
            out[v] = PALETTE[i % len(PALETTE)]
            i += 1
    return out


#: plot name -> texts of its last rendering that fell outside the saved image (tests read it)
OUTSIDE: dict[str, list[str]] = {}
_PAD_INCHES = 0.08


def _texts(fig: Figure) -> list[Text]:
    return [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]


def _saved_area(fig: Figure) -> tuple[Bbox, list[Text]]:
    """The area (inches) the SVG keeps: every artist and every visible text, padded.

    Legends outside the axes, long tick labels and annotations kept out of the layout
    (``set_in_layout(False)``) all count, so nothing is clipped at the figure's edge.
    """
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    texts = _texts(fig)
    area = fig.get_tightbbox(renderer, bbox_extra_artists=texts)
    return area.padded(_PAD_INCHES), texts


def _outside(fig: Figure, area: Bbox, texts: list[Text]) -> list[str]:
    """Texts whose drawn extent is not inside ``area`` (inches)."""
    renderer = FigureCanvasAgg(fig).get_renderer()
    out = []
    for t in texts:
        box = t.get_window_extent(renderer).transformed(fig.dpi_scale_trans.inverted())
        if box.width == 0 and box.height == 0:
            continue
        eps = 1e-3
        if (
            box.x0 < area.x0 - eps
            or box.y0 < area.y0 - eps
            or box.x1 > area.x1 + eps
            or box.y1 > area.y1 + eps
        ):
            out.append(t.get_text())
    return out


def _svg(fig: Figure, name: str) -> str:
    """The figure as inline SVG: no XML prolog, fluid width, ids unique per plot."""
    buf = io.StringIO()
    area, texts = _saved_area(fig)
    OUTSIDE[name] = _outside(fig, area, texts)
    with matplotlib.rc_context({"svg.hashsalt": f"ef-{name}"}):
        fig.savefig(
            buf,
            format="svg",
            metadata={"Date": None, "Creator": None},
            bbox_inches=area,
        )
    svg = buf.getvalue()
    svg = svg[svg.index("<svg") :]
    # natural size as the upper bound, so a small figure is not blown up
    max_px = round(area.width * 96)
    svg = re.sub(
        r'<svg([^>]*?) width="[^"]*" height="[^"]*"',
        rf'<svg\1 class="plot" data-plot="{name}" role="img" '
        rf'style="max-width: {max_px}px"',
        svg,
        count=1,
    )
    # ids inside each SVG are prefixed so several plots can share one page
    svg = re.sub(r'id="([^"]+)"', rf'id="{name}-\1"', svg)
    svg = re.sub(r"url\(#([^)]+)\)", rf"url(#{name}-\1)", svg)
    svg = re.sub(r'xlink:href="#([^"]+)"', rf'xlink:href="#{name}-\1"', svg)
    return svg


def _new_figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


def _time_axis(ax: Any, lo: datetime, hi: datetime, label: str = "time (UTC)") -> None:
    """Concise date ticks; the date itself goes into the axis label, not an offset text."""
    locator = mdates.AutoDateLocator(minticks=4, maxticks=9)
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(
        mdates.ConciseDateFormatter(locator, tz=lo.tzinfo, show_offset=False)
    )
    if hi > lo:
        ax.set_xlim(lo, hi)
    first, last = lo.strftime("%Y-%m-%d"), hi.strftime("%Y-%m-%d")
    day = first if first == last else f"{first} to {last}"
    ax.set_xlabel(f"{label}, {day}")


def _extent(times: Sequence[datetime]) -> tuple[datetime, datetime]:
    return min(times), max(times)


def time_span(ds: ReviewDataset) -> tuple[datetime, datetime] | None:
    """The time every time plot shows, so adoption, rollouts and latency line up."""
    times = [p.ts for p in ds.adoption] + [p.ts for p in ds.by_version]
    times += [t for r in ds.rollouts for s in r.stages for t in (s.started_at, s.ended_at) if t]
    times += [d.ts for r in ds.rollouts for d in r.decisions]
    return _extent(times) if times else None


def plot_adoption(ds: ReviewDataset, span: tuple[datetime, datetime] | None = None) -> str | None:
    """Stacked area: devices per version over time."""
    if not ds.adoption:
        return None
    with _style():
        ts: list[Any] = [p.ts for p in ds.adoption]
        versions = sorted_versions(list({v for p in ds.adoption for v in p.counts}))
        colors = version_colors(ds.versions())
        fig = _new_figure(10, 3.8)
        ax = fig.add_subplot()
        ys = [[p.counts.get(v, 0) for p in ds.adoption] for v in versions]
        ax.stackplot(
            ts,
            ys,
            labels=versions,
            colors=[colors[v] for v in versions],
            alpha=0.9,
            linewidth=0.4,
            edgecolor="white",
            step="post",
        )
        ax.set_title("Version adoption over time")
        ax.set_ylabel("devices running the version")
        total = max((sum(p.counts.values()) for p in ds.adoption), default=0)
        ax.set_ylim(0, max(1, total) * 1.02)
        _time_axis(ax, *(span or _extent(ts)))
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), title="version")
        return _svg(fig, "adoption")


def plot_timeline(ds: ReviewDataset, span: tuple[datetime, datetime] | None = None) -> str | None:
    """One lane per rollout: stage bars over time, each decision marked."""
    rollouts = [r for r in ds.rollouts if r.stages or r.decisions]
    if not rollouts:
        return None
    with _style():
        fig = _new_figure(10, 1.6 + 0.9 * len(rollouts))
        ax = fig.add_subplot()
        times = [t for r in rollouts for s in r.stages for t in (s.started_at, s.ended_at) if t]
        times += [d.ts for r in rollouts for d in r.decisions]
        lo, hi = _extent(times)
        pad = (hi - lo) * 0.03
        used_actions: list[str] = []
        for lane, r in enumerate(reversed(rollouts)):
            for s in r.stages:
                if s.started_at is None:
                    continue
                end = s.ended_at or ds.until
                shade = 0.25 + 0.6 * min(s.percent, 100) / 100
                left = mdates.date2num(s.started_at)
                width = mdates.date2num(end) - left
                ax.barh(
                    lane,
                    width,
                    left=left,
                    height=0.5,
                    color=(0.0, 0.447, 0.698, shade),
                    edgecolor="white",
                    linewidth=1,
                )
                ax.text(
                    left + width / 2,
                    lane,
                    f"{s.percent:g}%",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if shade > 0.5 else "#1a1a1a",
                    clip_on=True,
                )
            for d in r.decisions:
                marker, color, label = DECISION_STYLE.get(d.action, ("D", "#777777", d.action))
                if label not in used_actions:
                    used_actions.append(label)
                ax.plot(
                    [mdates.date2num(d.ts)],
                    [lane + 0.42],
                    marker=marker,
                    color=color,
                    markersize=10 if marker == "*" else 8,
                    markeredgecolor="white",
                    linestyle="none",
                    zorder=5,
                )
                if d.breaches:
                    names = ", ".join(g.name for g in d.breaches)
                    right_half = d.ts > lo + (hi - lo) / 2
                    note = ax.annotate(
                        f"{d.action}: {names} breached",
                        (mdates.date2num(d.ts), lane + 0.42),
                        xytext=(-8 if right_half else 8, 9),
                        textcoords="offset points",
                        ha="right" if right_half else "left",
                        fontsize=8.5,
                        color=color,
                        fontweight="bold",
                    )
                    note.set_in_layout(False)
        ax.set_yticks(range(len(rollouts)))
        ax.set_yticklabels(
            [
                f"{r.name or r.id}\n{r.bundle} · {r.status.replace('_', ' ')}"
                for r in reversed(rollouts)
            ],
            fontsize=9,
        )
        ax.set_ylim(-0.6, len(rollouts) - 0.1 + 0.3)
        ax.grid(axis="y", visible=False)
        ax.set_title("Rollout stages and gate decisions")
        ax.xaxis_date()
        _time_axis(ax, *(span or (lo - pad, hi + pad)))
        handles: list[Any] = [
            Line2D([], [], marker=m, color=c, linestyle="none", markersize=8, label=t)
            for m, c, t in DECISION_STYLE.values()
            if t in used_actions
        ]
        handles += [
            Line2D([], [], marker="D", color="#777777", linestyle="none", label=t)
            for t in used_actions
            if t not in {s[2] for s in DECISION_STYLE.values()}
        ]
        handles.append(Patch(color=(0.0, 0.447, 0.698, 0.6), label="stage running"))
        fig.legend(handles=handles, loc="outside lower center", ncols=len(handles))
        return _svg(fig, "timeline")


def plot_latency_errors(
    ds: ReviewDataset, span: tuple[datetime, datetime] | None = None
) -> str | None:
    """p95 latency (ms) and error rate (%) per version over time, sharing the time axis."""
    if not ds.by_version:
        return None
    with _style():
        series: dict[str, list[Any]] = defaultdict(list)
        for p in sorted(ds.by_version, key=lambda p: p.ts):
            series[p.version].append(p)
        colors = version_colors(ds.versions())
        fig = _new_figure(10, 5.6)
        top, bottom = fig.subplots(2, 1, sharex=True)
        for v in sorted_versions(list(series)):
            pts = series[v]
            t = [p.ts for p in pts]
            p95 = [p.latency_p95_ms if p.latency_p95_ms is not None else math.nan for p in pts]
            er = [100 * p.error_rate if p.error_rate is not None else math.nan for p in pts]
            style = {
                "color": colors[v],
                "marker": "o",
                "markersize": 3,
                "linewidth": 1.6,
                "label": v,
            }
            top.plot(t, p95, **style)
            bottom.plot(t, er, **style)
        top.set_title("Latency p95 and error rate by version")
        top.set_ylabel("p95 latency (ms)")
        top.set_ylim(bottom=0)
        bottom.set_ylabel("error rate (%)")
        bottom.set_ylim(bottom=0)
        _time_axis(bottom, *(span or _extent([p.ts for p in ds.by_version])))
        top.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), title="version")
        return _svg(fig, "latency")


def _natural(name: str) -> list[Any]:
    """Sort key ordering the numbers inside a name by value (``f2`` < ``f10``)."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", name)]


def plot_drift(ds: ReviewDataset) -> str | None:
    """Heat map of PSI against the reference profile: feature (rows) x device group."""
    if not ds.drift:
        return None
    with _style():
        groups = sorted({c.group for c in ds.drift})
        # f2 before f10, x[c2] before x[c10]: one row per feature or image channel, in order
        features = sorted({c.feature for c in ds.drift}, key=_natural)
        grid = [[math.nan] * len(groups) for _ in features]
        for c in ds.drift:
            grid[features.index(c.feature)][groups.index(c.group)] = c.psi
        vmax = max(0.5, max((c.psi for c in ds.drift), default=0.0))
        fig = _new_figure(min(10, 3.2 + 1.3 * len(groups)), 1.5 + 0.42 * len(features))
        ax = fig.add_subplot()
        im = ax.imshow(grid, cmap="YlOrRd", vmin=0, vmax=vmax, aspect="auto")
        ax.grid(False)
        ax.set_xticks(range(len(groups)), groups)
        ax.set_yticks(range(len(features)), features)
        ax.tick_params(length=0)
        for i, row in enumerate(grid):
            for j, val in enumerate(row):
                if math.isnan(val):
                    ax.text(j, i, "–", ha="center", va="center", color="#777777")
                    continue
                dark = val / vmax > 0.55
                ax.text(
                    j,
                    i,
                    f"{val:.2f}",
                    ha="center",
                    va="center",
                    fontsize=9,
                    color="white" if dark else "#1a1a1a",
                    fontweight="bold" if val > PSI_SIGNIFICANT else "normal",
                )
        ax.set_title("Input drift: PSI per feature and device group")
        ax.set_xlabel(f"device group (bold: PSI > {PSI_SIGNIFICANT}, a significant shift)")
        ax.set_ylabel("input feature")
        for side in ("left", "bottom"):
            ax.spines[side].set_visible(False)
        cbar = fig.colorbar(im, ax=ax, shrink=0.9)
        cbar.set_label("PSI vs reference profile")
        return _svg(fig, "drift")


def plot_predictions(ds: ReviewDataset) -> str | None:
    """Grouped bars: the share of each predicted class, canary vs control, per rollout."""
    by_rollout: dict[str, dict[str, PredictionDist]] = defaultdict(dict)
    for p in ds.predictions:
        by_rollout[p.rollout][p.cohort] = p
    if not by_rollout:
        return None
    names = {r.id: r for r in ds.rollouts}
    with _style():
        n = len(by_rollout)
        cols = min(n, 2)
        rows = math.ceil(n / cols)
        fig = _new_figure(10, 0.6 + 3.0 * rows)
        axes = fig.subplots(rows, cols, squeeze=False)
        for k, (rid, cohorts) in enumerate(by_rollout.items()):
            ax = axes[k // cols][k % cols]
            labels = list(dict.fromkeys(lb for c in cohorts.values() for lb in c.labels))
            x = range(len(labels))
            width = 0.4
            for off, cohort, color in (
                (-width / 2, "canary", CANARY_COLOR),
                (width / 2, "control", CONTROL_COLOR),
            ):
                dist = cohorts.get(cohort)
                if dist is None:
                    continue
                share = dict(zip(dist.labels, dist.proportions, strict=True))
                ax.bar(
                    [i + off for i in x],
                    [100 * share.get(lb, 0.0) for lb in labels],
                    width,
                    color=color,
                    label=f"{cohort} (n={dist.count:,})",
                )
            tallest = max((100 * q for c in cohorts.values() for q in c.proportions), default=1)
            ax.set_ylim(0, tallest * 1.3)  # headroom so the legend never covers a bar
            ax.set_xticks(list(x), labels, rotation=30 if len(labels) > 6 else 0)
            ax.set_ylabel("share of predictions (%)")
            ax.set_title(_rollout_title(rid, names.get(rid)), fontsize=10.5)
            ax.grid(axis="x", visible=False)
            ax.legend(loc="upper right")
        for k in range(n, rows * cols):
            axes[k // cols][k % cols].set_visible(False)
        fig.suptitle(
            "Prediction distribution: canary vs control",
            x=0.01,
            ha="left",
            fontweight="bold",
            fontsize=12,
        )
        return _svg(fig, "predictions")


def _rollout_title(rid: str, r: RolloutRow | None) -> str:
    if r is None:
        return rid
    return f"{r.name or r.id}: {r.bundle} ({r.status.replace('_', ' ')})"


PLOTS = {
    "adoption": plot_adoption,
    "timeline": plot_timeline,
    "latency": plot_latency_errors,
    "drift": plot_drift,
    "predictions": plot_predictions,
}


def render_plots(ds: ReviewDataset) -> dict[str, str | None]:
    """Every plot of the review, by name (``None`` where the dataset has no data)."""
    span = time_span(ds)
    return {
        "adoption": plot_adoption(ds, span),
        "timeline": plot_timeline(ds, span),
        "latency": plot_latency_errors(ds, span),
        "drift": plot_drift(ds),
        "predictions": plot_predictions(ds),
    }
