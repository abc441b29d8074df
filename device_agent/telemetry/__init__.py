"""On-device telemetry: latency and error windows, stratified samples, drift summaries.

* :mod:`.stats` - pure, vectorized statistics (latency histograms, binned
  counts, PSI, KS);
* :mod:`.sampling` - stratified per-class sampling and drop/hash field masks;
* :mod:`.window` - one model's window, fed in batches, closed into the summary
  body of :mod:`device_agent.protocol`;
* :mod:`.engine` - the hot-path buffers and the worker thread that drains them
  into windows and writes records to the store.
"""

from .engine import Recorder, Telemetry, TelemetryOptions, TelemetrySink
from .sampling import FieldMask, FieldMaskError, StratifiedSampler, allocate, compile_mask
from .stats import PSI_EPSILON, binned_counts, ks_binned, psi
from .window import ModelInfo, Window

__all__ = [
    "PSI_EPSILON",
    "FieldMask",
    "FieldMaskError",
    "ModelInfo",
    "Recorder",
    "StratifiedSampler",
    "Telemetry",
    "TelemetryOptions",
    "TelemetrySink",
    "Window",
    "allocate",
    "binned_counts",
    "compile_mask",
    "ks_binned",
    "psi",
]
