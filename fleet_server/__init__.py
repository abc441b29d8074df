"""edgefleet fleet server: registry, rollouts, device API and telemetry ingestion.

Importing this package stays cheap: the web stack is only imported by the
modules that need it, so the operator CLI's key and bundle commands work with
just the converters installed.
"""
