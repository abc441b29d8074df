"""edgefleet device agent: verified model bundles, embeddable inference, telemetry.

This package is what ships to every device. It imports nothing from
``fleet_server`` or ``converters`` and none of FastAPI, onnx, torch or
scikit-learn.
"""

__version__ = "0.1.0"
