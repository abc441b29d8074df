"""The device API: enrollment, check-in (assignment), bundle download, reports."""
