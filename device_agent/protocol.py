"""Wire contracts between device and server: HTTP paths, MQTT topics, payloads.

The agent owns these because it cannot import the server; the server imports
them from here.

HTTP (device API, per-device credentials as ``Authorization: Bearer <token>``)::

    POST /device/v1/enroll              -> {"enrollment_token", "device_id"?, "device_class",
                                           "labels"} -> {"device_id", "credential", ...}
                                           (no auth; the single-use token is the proof)
    GET  /device/v1/assignment          -> Assignment JSON; ETag, If-None-Match -> 304
         ?model=<name>                     one model's entry, on a device running several
                                           (``[device] models``); without it, the device's
                                           most recently changed entry
    GET  /device/v1/bundles/{bundle_id} -> bundle bytes; Range supported (206)
    POST /device/v1/reports             -> {"reports": [Report, ...]} install/health reports

Assignment JSON::

    {"device_id": "cam-0001",
     "model": "m" | null,                  # the model this entry is for (one per model)
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
     "drift": {"features": [{"name": "f0", "psi": .., "ks": .., "counts": [...],
                             "mean": .., "std": ..}],   # mean/std: image channels only
               "psi_max": .., "ks_max": ..,
               "prediction": {"counts": [...], "psi": ..}} | null,
     "shadow": {"name": .., "version": .., "count": .., "agreement": ..,
                "latency_ms": {...}, "errors": ..} | null,
     "previous": {same fields} | null,   # the model this one replaced, run on a sample
     "dropped": {"samples": n, "summaries": n},
     "labels": {"count": n, "correct": n, "labelled": [per true class],
                "correct_by_class": [...], "confusion": [[t][p]] | null} | null}

Sample record body: ``{"name", "version", "predicted": class|null, "inputs": {...},
"outputs": {...}}`` with masked fields dropped or replaced by ``sha256:<hex>``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Union

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
#: certificate renewal: POST a new CSR over TLS with the current client certificate
CERTIFICATE_PATH = f"{DEVICE_API_PREFIX}/certificate"


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


# -- the wire contract as types ---------------------------------------------------------
#
# Plain dataclasses (no pydantic on the device). Each checks its bounds and invariants in
# ``__post_init__`` and raises :class:`ContractError` with a stable ``code``; the server
# validates incoming JSON against these very classes (pydantic, strict, no NaN/inf, see
# ``fleet_server.ingest.contract``), so device and server share one definition.

#: bounds of one MQTT telemetry message and its parts
MAX_MESSAGE_BYTES = 2 * 1024 * 1024
MAX_RECORDS_PER_MESSAGE = 1000
MAX_RECORD_BODY_BYTES = 256 * 1024
MAX_COUNT = 10**9  # inferences in one window on one device
MAX_NAME_LEN = 200
MAX_ID_LEN = 100
MAX_FEATURES = 1024
MAX_BINS = 1024
MAX_MESSAGE_LEN = 4000
#: bounds of one HTTP report batch
MAX_REPORTS_PER_BATCH = 1000
MAX_REPORT_BYTES = 16 * 1024
MAX_REPORT_BATCH_BYTES = 1024 * 1024
MAX_REPORT_EXTRA_FIELDS = 32
MAX_SEQ = 2**63 - 1

_INF = float("inf")
_HIST_LEN = len(LATENCY_BUCKETS_MS) + 1
_STRICT = {"strict": True, "allow_inf_nan": False, "extra": "forbid"}
_OPEN = {"strict": True, "allow_inf_nan": False, "extra": "ignore"}


class ContractError(ValueError):
    """A value breaks the wire contract; ``code`` names the rule (a metrics label)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _count(name: str, value: int | None, limit: int = MAX_COUNT) -> None:
    if value is None:
        return
    if value < 0:
        raise ContractError("negative_count", f"{name} is {value}; counts are never negative")
    if value > limit:
        raise ContractError("out_of_bounds", f"{name} is {value}, above {limit}")


def _counts(name: str, values: list[int], limit: int = MAX_COUNT) -> None:
    """Every value a count: one pass of min and max instead of a call per value."""
    if values and (min(values) < 0 or max(values) > limit):
        _count(name, min(values), limit)
        _count(name, max(values), limit)


def _text(name: str, value: str | None, limit: int) -> None:
    if value is not None and len(value) > limit:
        raise ContractError("out_of_bounds", f"{name} has {len(value)} characters, above {limit}")


def _finite(name: str, value: float | None) -> None:
    if value is not None and (value != value or value in (float("inf"), float("-inf"))):
        raise ContractError("not_finite", f"{name} is {value}; numbers must be finite")


@dataclass(frozen=True)
class Latency:
    """Latency percentiles in milliseconds (None when the window had no inference)."""

    __pydantic_config__ = _OPEN
    p50: float | None = None
    p95: float | None = None
    p99: float | None = None
    mean: float | None = None

    def __post_init__(self) -> None:
        if all(v is None or 0 <= v < _INF for v in (self.p50, self.p95, self.p99, self.mean)):
            return  # the fast path; the loop below says what is wrong
        for k in ("p50", "p95", "p99", "mean"):
            v = getattr(self, k)
            _finite(k, v)
            if v is not None and v < 0:
                raise ContractError("out_of_bounds", f"latency {k} is {v}; never negative")


@dataclass(frozen=True)
class FeatureDrift:
    """One input feature's binned counts in a window; ``mean``/``std`` of its values are
    sent for per-channel image features (absent from older agents' summaries)."""

    __pydantic_config__ = _OPEN
    name: str
    counts: list[int]
    psi: float | None = None
    ks: float | None = None
    mean: float | None = None
    std: float | None = None

    def __post_init__(self) -> None:
        if self.mean is not None or self.std is not None:
            _finite("feature mean", self.mean)
            _finite("feature std", self.std)
            if self.std is not None and self.std < 0:
                raise ContractError("out_of_bounds", f"feature std is {self.std}; never negative")
        if len(self.name) <= MAX_NAME_LEN and len(self.counts) <= MAX_BINS:
            _counts("feature bin count", self.counts)
            return
        _text("feature name", self.name, MAX_NAME_LEN)
        if len(self.counts) > MAX_BINS:
            raise ContractError("out_of_bounds", f"{len(self.counts)} bins, above {MAX_BINS}")
        _counts("feature bin count", self.counts)


@dataclass(frozen=True)
class PredictionDrift:
    __pydantic_config__ = _OPEN
    counts: list[int]
    psi: float | None = None

    def __post_init__(self) -> None:
        if len(self.counts) > MAX_BINS:
            raise ContractError("out_of_bounds", f"{len(self.counts)} bins, above {MAX_BINS}")
        _counts("prediction bin count", self.counts)


@dataclass(frozen=True)
class Drift:
    __pydantic_config__ = _OPEN
    features: list[FeatureDrift] = field(default_factory=list)
    psi_max: float | None = None
    ks_max: float | None = None
    prediction: PredictionDrift | None = None

    def __post_init__(self) -> None:
        if len(self.features) > MAX_FEATURES:
            raise ContractError(
                "out_of_bounds", f"{len(self.features)} features, above {MAX_FEATURES}"
            )


@dataclass(frozen=True)
class ShadowSummary:
    __pydantic_config__ = _OPEN
    name: str
    version: int
    count: int
    errors: int = 0
    agreement: float | None = None
    latency_ms: Latency | None = None

    def __post_init__(self) -> None:
        _text("shadow name", self.name, MAX_NAME_LEN)
        _count("shadow version", self.version, 2**31 - 1)
        _count("shadow count", self.count)
        _count("shadow errors", self.errors)
        if self.errors > self.count:
            raise ContractError(
                "errors_exceed_count", f"shadow errors {self.errors} > count {self.count}"
            )
        if self.agreement is not None and not 0.0 <= self.agreement <= 1.0:
            raise ContractError("out_of_bounds", f"shadow agreement {self.agreement} not in [0, 1]")


#: classes up to which a window's label summary carries the full confusion matrix
MAX_CONFUSION_CLASSES = 32


@dataclass(frozen=True)
class LabelSummary:
    """True labels an app posted for this window's predictions (classifiers only).

    ``labelled[c]`` / ``correct[c]``: labelled predictions whose true class is ``c``, and
    how many of them the model got right; ``confusion[t][p]`` (up to
    :data:`MAX_CONFUSION_CLASSES` classes) counts true class ``t`` predicted as ``p``.
    """

    __pydantic_config__ = _STRICT
    count: int
    correct: int
    labelled: list[int]
    correct_by_class: list[int]
    confusion: list[list[int]] | None = None

    def __post_init__(self) -> None:
        _count("labels count", self.count)
        _count("labels correct", self.correct)
        if self.correct > self.count:
            raise ContractError("errors_exceed_count", "labels correct > labels count")
        n = len(self.labelled)
        if n > MAX_BINS or len(self.correct_by_class) != n:
            raise ContractError(
                "out_of_bounds",
                f"labelled and correct_by_class must have one entry per class (at most {MAX_BINS})",
            )
        _counts("labelled", self.labelled)
        _counts("correct_by_class", self.correct_by_class)
        if (
            sum(self.labelled) != self.count
            or sum(self.correct_by_class) != self.correct
            or any(c > k for c, k in zip(self.correct_by_class, self.labelled, strict=True))
        ):
            raise ContractError("out_of_bounds", "per-class label counts do not add up")
        m = self.confusion
        if m is not None:
            if n > MAX_CONFUSION_CLASSES or len(m) != n or any(len(r) != n for r in m):
                raise ContractError(
                    "out_of_bounds",
                    f"confusion must be classes x classes (at most {MAX_CONFUSION_CLASSES})",
                )
            for row in m:
                _counts("confusion", row)
            if [sum(r) for r in m] != self.labelled or [m[i][i] for i in range(n)] != list(
                self.correct_by_class
            ):
                raise ContractError("out_of_bounds", "confusion does not match the label counts")


@dataclass(frozen=True)
class SummaryBody:
    """One window of one model on one device (see the module docstring)."""

    __pydantic_config__ = _STRICT
    name: str
    version: int
    count: int
    errors: int
    window_start: float | None = None
    window_end: float | None = None
    slot: str | None = None
    rollout_id: str | None = None
    latency_ms: Latency | None = None
    latency_hist: list[int] | None = None
    drift: Drift | None = None
    shadow: ShadowSummary | None = None
    dropped: dict[str, int] | None = None
    labels: LabelSummary | None = None
    #: the model this one replaced, run beside it on a sample of inputs (agreement)
    previous: ShadowSummary | None = None

    def __post_init__(self) -> None:
        hist = self.latency_hist
        if (
            0 <= self.errors <= self.count <= MAX_COUNT
            and 0 <= self.version < 2**31
            and len(self.name) <= MAX_NAME_LEN
            and (self.slot is None or len(self.slot) <= 8)
            and (self.rollout_id is None or len(self.rollout_id) <= 40)
            and (self.window_start is None or -_INF < self.window_start < _INF)
            and (self.window_end is None or -_INF < self.window_end < _INF)
            and (
                self.window_start is None
                or self.window_end is None
                or self.window_end >= self.window_start
            )
            and (
                hist is None
                or (
                    len(hist) == _HIST_LEN
                    and min(hist) >= 0
                    and max(hist) <= MAX_COUNT
                    and sum(hist) == self.count - self.errors
                )
            )
            and (
                self.dropped is None
                or (
                    len(self.dropped) <= 16
                    and all(len(k) <= 40 and 0 <= v <= 2**62 for k, v in self.dropped.items())
                )
            )
        ):
            return  # the fast path; the checks below say what is wrong
        _text("name", self.name, MAX_NAME_LEN)
        _text("slot", self.slot, 8)
        _text("rollout_id", self.rollout_id, 40)
        _count("version", self.version, 2**31 - 1)
        _count("count", self.count)
        _count("errors", self.errors)
        _finite("window_start", self.window_start)
        _finite("window_end", self.window_end)
        if self.errors > self.count:
            raise ContractError("errors_exceed_count", f"errors {self.errors} > count {self.count}")
        if (
            self.window_start is not None
            and self.window_end is not None
            and self.window_end < self.window_start
        ):
            raise ContractError("out_of_bounds", "window_end is before window_start")
        if self.latency_hist is not None:
            if len(self.latency_hist) != len(LATENCY_BUCKETS_MS) + 1:
                raise ContractError(
                    "histogram_mismatch",
                    f"latency_hist has {len(self.latency_hist)} buckets, "
                    f"not {len(LATENCY_BUCKETS_MS) + 1}",
                )
            _counts("latency_hist bucket", self.latency_hist)
            if sum(self.latency_hist) != self.count - self.errors:
                raise ContractError(
                    "histogram_mismatch",
                    f"latency_hist totals {sum(self.latency_hist)}, but count - errors is "
                    f"{self.count - self.errors}",
                )
        if self.dropped is not None:
            if len(self.dropped) > 16:
                raise ContractError("out_of_bounds", "dropped has more than 16 fields")
            for k, v in self.dropped.items():
                _text("dropped key", k, 40)
                _count(f"dropped[{k}]", v, 2**62)


@dataclass(frozen=True)
class EventBody:
    """An event record (install report and the like); unknown fields are carried along
    within :data:`MAX_RECORD_BODY_BYTES`."""

    __pydantic_config__ = _OPEN
    type: str
    outcome: str | None = None
    name: str | None = None
    version: int | None = None
    bundle_id: str | None = None
    rollout_id: str | None = None
    shadow: bool | None = None
    error_code: str | None = None
    message: str | None = None
    state: str | None = None
    ts: float | None = None

    def __post_init__(self) -> None:
        _text("type", self.type, 40)
        _text("outcome", self.outcome, 40)
        _text("name", self.name, MAX_NAME_LEN)
        _text("bundle_id", self.bundle_id, 40)
        _text("rollout_id", self.rollout_id, 40)
        _text("error_code", self.error_code, 100)
        _text("message", self.message, MAX_MESSAGE_LEN)
        _text("state", self.state, 100)
        _count("version", self.version, 2**31 - 1)


@dataclass(frozen=True)
class SampleBody:
    """A sampled inference (masked inputs and outputs)."""

    __pydantic_config__ = _OPEN
    name: str
    version: int
    predicted: int | str | None = None
    inputs: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _text("name", self.name, MAX_NAME_LEN)
        _count("version", self.version, 2**31 - 1)
        if isinstance(self.predicted, str):
            _text("predicted", self.predicted, 100)
        if len(self.inputs) + len(self.outputs) > 256:
            raise ContractError("out_of_bounds", "more than 256 input and output fields")


def _record_checks(seq: int, ts: float) -> None:
    if 0 <= seq <= MAX_SEQ and -_INF < ts < _INF:
        return
    if not 0 <= seq <= MAX_SEQ:
        raise ContractError("out_of_bounds", f"seq {seq} is not in [0, 2**63)")
    _finite("ts", ts)


@dataclass(frozen=True)
class SummaryRecord:
    __pydantic_config__ = _OPEN
    seq: int
    kind: Literal["summary", "summaries"]
    ts: float
    body: SummaryBody

    def __post_init__(self) -> None:
        _record_checks(self.seq, self.ts)


@dataclass(frozen=True)
class SampleRecord:
    __pydantic_config__ = _OPEN
    seq: int
    kind: Literal["samples", "sample"]
    ts: float
    body: SampleBody

    def __post_init__(self) -> None:
        _record_checks(self.seq, self.ts)


@dataclass(frozen=True)
class EventRecord:
    __pydantic_config__ = _OPEN
    seq: int
    kind: Literal["events", "event"]
    ts: float
    body: EventBody

    def __post_init__(self) -> None:
        _record_checks(self.seq, self.ts)


TelemetryRecord = Union[SummaryRecord, SampleRecord, EventRecord]  # noqa: UP007


@dataclass(frozen=True)
class TelemetryMessage:
    """One MQTT telemetry message: ``{"device_id", "records": [...]}``."""

    __pydantic_config__ = _OPEN
    device_id: str
    records: list[TelemetryRecord]

    def __post_init__(self) -> None:
        _text("device_id", self.device_id, MAX_ID_LEN)
        if len(self.records) > MAX_RECORDS_PER_MESSAGE:
            raise ContractError(
                "too_many_records",
                f"{len(self.records)} records in one message, above {MAX_RECORDS_PER_MESSAGE}",
            )


@dataclass(frozen=True)
class SentMark:
    """How far a device got sending one kind: the highest ``seq`` the broker acknowledged
    and how many records of that kind it acknowledged since the device's store began."""

    __pydantic_config__ = _STRICT
    seq: int
    count: int

    def __post_init__(self) -> None:
        _count("sent seq", self.seq, MAX_SEQ)
        _count("sent count", self.count, MAX_SEQ)


@dataclass(frozen=True)
class DeviceStatus:
    """The retained status message; ``sent`` holds the device's sent high-water marks."""

    __pydantic_config__ = _OPEN
    state: Literal["online", "offline"]
    update_state: str | None = None
    model: str | None = None
    version: int | None = None
    sent: dict[str, SentMark] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _text("update_state", self.update_state, 100)
        _text("model", self.model, MAX_NAME_LEN)
        for k in self.sent:
            if k not in TELEMETRY_KINDS:
                raise ContractError("bad_fields", f"sent mark for unknown kind {k!r}")
