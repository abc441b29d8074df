"""edgefleet converters: turn trained models into signed, parity-checked bundles.

Writing and signing bundles lives here; reading and verifying them lives in
:mod:`device_agent.bundle`, the party that must trust them.
"""
