"""Errors of the telemetry review (report and dashboard)."""

from __future__ import annotations


class ReportError(Exception):
    """Root of the report package's errors."""


class DatasetFormatError(ReportError, ValueError):
    """A review dataset (JSON) is malformed or of another format version."""


class TimeRangeError(ReportError, ValueError):
    """A ``--since`` / ``--until`` value cannot be parsed or the range is empty."""
