"""Wire contracts between device and server: HTTP paths, MQTT topics, payloads.

The agent owns these because it cannot import the server; the server imports
them from here.

HTTP (device API, per-device credentials as ``Authorization: Bearer <token>``)::

    POST /device/v1/enroll              -> {"enrollment_token", "device_id"?, "device_class",
                                           "labels"} -> {"device_id", "credential", ...}
                                           (no auth; the single-use token is the proof)
    GET  /device/v1/assignment          -> Assignment JSON; ETag, If-None-Match -> 304
    GET  /device/v1/bundles/{bundle_id} -> bundle bytes; Range supported (206)
    POST /device/v1/reports             -> {"reports": [Report, ...]} install/health reports

Assignment JSON::

    {"device_id": "cam-0001",
     "assignment_id": "sha256 of the fields below",   # also the ETag
     "desired": {"bundle_id": "b-…", "name": "m", "version": 7, "url": "/device/v1/bundles/b-…",
                 "sha256": "<of the bundle file>", "size": 12345} | null,
     "shadow":  {same fields} | null,      # run beside the active model, serve nothing from it
     "rollout_id": "r-…" | null, "stage": 1 | null,
     "telemetry": {"sample_rate": 0.01, "window_seconds": 60}}

Report (HTTP and MQTT ``events``)::

    {"type": "install", "outcome": "installed" | "failed" | "rolled_back" | "refused",
     "name": "m", "version": 7, "error_code": "hash_mismatch" | null, "message": "…",
     "state": "<update state where it ended>", "ts": 1760000000.0}

MQTT (QoS 1; a device may publish only under its own id, enforced by broker ACL
and checked again on ingestion):

* ``edgefleet/v1/devices/{device_id}/telemetry/{kind}`` kind in summary|samples|events,
  payload = ``{"device_id": ..., "records": [{"seq": n, "kind": ..., "ts": t, "body": {...}}]}``;
  ``seq`` is per device, strictly increasing across all kinds, so the receiver
  drops duplicates by (device_id, seq).
* ``edgefleet/v1/devices/{device_id}/status`` retained ``{"state": "online"|"offline", ...}``,
  with a last will of ``{"state": "offline"}``.
* ``edgefleet/v1/devices/{device_id}/notify`` server -> device: "assignment changed, pull now".

Summary record body (one per window per active model)::

    {"window_start": t0, "window_end": t1, "name": "m", "version": 7, "slot": "a",
     "rollout_id": "r-…" | null,
     "count": 1200, "errors": 3,
     "latency_ms": {"p50": .., "p95": .., "p99": .., "mean": ..},
     "latency_hist": [counts per LATENCY_BUCKETS_MS bucket; len = len(buckets) + 1],
     "drift": {"features": [{"name": "f0", "psi": .., "ks": .., "counts": [...]}],
               "psi_max": .., "ks_max": ..,
               "prediction": {"counts": [...], "psi": ..}} | null,
     "shadow": {"name": .., "version": .., "count": .., "agreement": ..,
                "latency_ms": {...}, "errors": ..} | null,
     "dropped": {"samples": n, "summaries": n}}

Sample record body: ``{"name", "version", "predicted": class|null, "inputs": {...},
"outputs": {...}}`` with masked fields dropped or replaced by ``sha256:<hex>``.
"""

from __future__ import annotations

TOPIC_ROOT = "edgefleet/v1/devices"
TELEMETRY_KINDS = ("summary", "samples", "events")

#: upper bounds (ms) of the latency histogram buckets; the last bucket is open
LATENCY_BUCKETS_MS: tuple[float, ...] = (
    0.01,
    0.02,
    0.05,
    0.1,
    0.2,
    0.5,
    1,
    2,
    5,
    10,
    20,
    50,
    100,
    200,
    500,
    1000,
    2000,
    5000,
)

DEVICE_API_PREFIX = "/device/v1"
ENROLL_PATH = f"{DEVICE_API_PREFIX}/enroll"
ASSIGNMENT_PATH = f"{DEVICE_API_PREFIX}/assignment"
REPORTS_PATH = f"{DEVICE_API_PREFIX}/reports"


def telemetry_topic(device_id: str, kind: str) -> str:
    if kind not in TELEMETRY_KINDS:
        raise ValueError(f"telemetry kind {kind!r} is not one of {TELEMETRY_KINDS}")
    return f"{TOPIC_ROOT}/{device_id}/telemetry/{kind}"


def status_topic(device_id: str) -> str:
    return f"{TOPIC_ROOT}/{device_id}/status"


def notify_topic(device_id: str) -> str:
    return f"{TOPIC_ROOT}/{device_id}/notify"


def parse_device_topic(topic: str) -> tuple[str, str, str | None]:
    """Split a device topic into (device_id, channel, kind); ValueError if not one."""
    parts = topic.split("/")
    if len(parts) < 5 or "/".join(parts[:3]) != TOPIC_ROOT:
        raise ValueError(f"not an edgefleet device topic: {topic!r}")
    device_id, channel = parts[3], parts[4]
    kind = parts[5] if len(parts) > 5 else None
    return device_id, channel, kind
