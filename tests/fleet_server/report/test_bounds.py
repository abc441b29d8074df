"""No text of any plot falls outside the image the report embeds: legends outside the
axes, long rollout names and statuses, tick labels and breach notes all stay whole."""

from __future__ import annotations

from dataclasses import replace

import pytest

from fleet_server.report import plots
from fleet_server.report.dataset import ReviewDataset
from fleet_server.report.synthetic import synthetic_dataset

LONG = "condition v2 to the north gateways, retrained on the October data"


def _long_names(ds: ReviewDataset) -> ReviewDataset:
    rollouts = tuple(
        replace(r, name=f"{LONG} #{i}", status="rolled_back") for i, r in enumerate(ds.rollouts)
    )
    return replace(ds, rollouts=rollouts)


@pytest.mark.parametrize("variant", ["synthetic", "long names"])
def test_every_text_of_every_plot_lies_inside_the_saved_image(variant: str) -> None:
    ds = synthetic_dataset(devices=40, seed=5)
    if variant == "long names":
        ds = _long_names(ds)
    plots.OUTSIDE.clear()
    rendered = plots.render_plots(ds)
    drawn = {name for name, svg in rendered.items() if svg}
    assert {"timeline", "adoption", "drift", "predictions"} <= drawn, drawn
    assert set(plots.OUTSIDE) == drawn
    assert {name: texts for name, texts in plots.OUTSIDE.items() if texts} == {}


def test_the_check_sees_a_text_placed_outside_the_figure() -> None:
    """The bounds check itself: a text kept out of the saved area is reported."""
    from matplotlib.figure import Figure
    from matplotlib.transforms import Bbox

    fig = Figure(figsize=(4, 3))
    ax = fig.add_subplot()
    ax.set_title("inside")
    far = fig.text(1.5, 0.5, "(rolled back)")
    area = Bbox.from_bounds(0, 0, 4, 3)
    assert plots._outside(fig, area, [ax.title, far]) == ["(rolled back)"]
