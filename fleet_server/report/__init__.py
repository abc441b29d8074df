"""The telemetry review: a dataset of fleet figures, rendered as an HTML report and dashboard.

* :mod:`.dataset`: the review dataset (plain dataclasses, JSON round-trip);
* :mod:`.load`: fills a dataset from the server's database;
* :mod:`.plots` / :mod:`.render`: dataset to inline-SVG plots and one HTML page;
* :mod:`.dashboard`: a read-only FastAPI router serving the same page.
"""

from fleet_server.report.dataset import ReviewDataset
from fleet_server.report.errors import DatasetFormatError, ReportError, TimeRangeError
from fleet_server.report.render import render_html, write_report

__all__ = [
    "DatasetFormatError",
    "ReportError",
    "ReviewDataset",
    "TimeRangeError",
    "render_html",
    "write_report",
]
