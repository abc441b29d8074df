"""The telemetry review dataset: every number the report and the dashboard show.

The review is built in two layers. :func:`fleet_server.report.load.load_dataset`
fills a :class:`ReviewDataset` from the database; :mod:`.render` turns a dataset
into HTML with plots. The dataset is plain frozen dataclasses with a JSON
round-trip (``to_json`` / ``from_json``), and the JSON export of a report is
exactly ``dataset.to_json()``, so the numbers behind every plot can be checked
and re-used without parsing HTML.

Conventions:

* times are timezone-aware UTC datetimes, ISO 8601 strings in JSON;
* a version is named ``"<model name> v<version>"`` (see :func:`version_label`);
* rates are fractions (0.01 = 1 %), latencies milliseconds;
* ``notes`` lists what the dataset could not fill (for example a telemetry table
  that does not exist yet) so the report can say so instead of showing nothing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from fleet_server.report.errors import DatasetFormatError

FORMAT = "edgefleet-review/1"


def version_label(name: str | None, version: int | None) -> str:
    """``"kws v3"``; ``"(none)"`` for a device that runs no model."""
    if not name:
        return "(none)"
    return f"{name} v{version}" if version is not None else name


def iso(ts: datetime | None) -> str | None:
    """A UTC ISO 8601 string (``...Z``) or None."""
    if ts is None:
        return None
    return ts.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def parse_iso(value: Any, what: str) -> datetime:
    """Parse an ISO 8601 time; naive times are taken as UTC."""
    if not isinstance(value, str):
        raise DatasetFormatError(f"{what} must be an ISO 8601 string, not {value!r}")
    try:
        ts = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as e:
        raise DatasetFormatError(f"{what} {value!r} is not an ISO 8601 time") from e
    return ts.replace(tzinfo=timezone.utc) if ts.tzinfo is None else ts.astimezone(timezone.utc)


def _opt_iso(value: Any, what: str) -> datetime | None:
    return None if value is None else parse_iso(value, what)


def _num(x: float | None, digits: int = 6) -> float | None:
    """JSON-safe float: None for missing or non-finite values, rounded."""
    if x is None or not math.isfinite(x):
        return None
    return round(float(x), digits)


def _opt_float(x: Any) -> float | None:
    return None if x is None else float(x)


@dataclass(frozen=True)
class DeviceRow:
    """One device as the fleet table shows it."""

    id: str
    device_class: str
    labels: Mapping[str, str]
    bundle: str
    last_seen: datetime | None
    health: str
    #: the error code behind the health (``stale_metadata``: the device cannot get fresh
    #: update metadata, a freeze or an unreachable server), None when there is none
    health_code: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "device_class": self.device_class,
            "labels": dict(self.labels),
            "bundle": self.bundle,
            "last_seen": iso(self.last_seen),
            "health": self.health,
            "health_code": self.health_code,
        }

    @classmethod
    def from_json(cls, o: Mapping[str, Any]) -> DeviceRow:
        return cls(
            str(o["id"]),
            str(o["device_class"]),
            dict(o.get("labels") or {}),
            str(o["bundle"]),
            _opt_iso(o.get("last_seen"), "last_seen"),
            str(o.get("health", "unknown")),
            o.get("health_code") if isinstance(o.get("health_code"), str) else None,
        )


@dataclass(frozen=True)
class AdoptionPoint:
    """How many devices ran each version at ``ts``."""

    ts: datetime
    counts: Mapping[str, int]

    def to_json(self) -> dict[str, Any]:
        return {"ts": iso(self.ts), "counts": dict(self.counts)}

    @classmethod
    def from_json(cls, o: Mapping[str, Any]) -> AdoptionPoint:
        return cls(
            parse_iso(o["ts"], "adoption ts"),
            {str(k): int(v) for k, v in (o.get("counts") or {}).items()},
        )


@dataclass(frozen=True)
class StageSpan:
    """When one rollout stage ran; ``ended_at`` None while it still runs."""

    index: int
    percent: float
    started_at: datetime | None
    ended_at: datetime | None

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "percent": self.percent,
            "started_at": iso(self.started_at),
            "ended_at": iso(self.ended_at),
        }

    @classmethod
    def from_json(cls, o: Mapping[str, Any]) -> StageSpan:
        return cls(
            int(o["index"]),
            float(o["percent"]),
            _opt_iso(o.get("started_at"), "stage started_at"),
            _opt_iso(o.get("ended_at"), "stage ended_at"),
        )


@dataclass(frozen=True)
class GateRow:
    """One gate's verdict in one decision, with the numbers behind it."""

    name: str
    canary: float | None
    control: float | None
    threshold: float
    verdict: str
    n_canary: int
    n_control: int

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "canary": _num(self.canary),
            "control": _num(self.control),
            "threshold": self.threshold,
            "verdict": self.verdict,
            "n_canary": self.n_canary,
            "n_control": self.n_control,
        }

    @classmethod
    def from_json(cls, o: Mapping[str, Any]) -> GateRow:
        return cls(
            str(o["name"]),
            _opt_float(o.get("canary")),
            _opt_float(o.get("control")),
            float(o.get("threshold", 0.0)),
            str(o.get("verdict", "")),
            int(o.get("n_canary", 0)),
            int(o.get("n_control", 0)),
        )


@dataclass(frozen=True)
class Decision:
    """One rollout decision (automatic or by an operator)."""

    ts: datetime
    action: str
    stage: int | None
    reason: str
    gates: tuple[GateRow, ...] = ()
    actor: str = ""

    @property
    def breaches(self) -> list[GateRow]:
        return [g for g in self.gates if g.verdict == "breach"]

    def to_json(self) -> dict[str, Any]:
        return {
            "ts": iso(self.ts),
            "action": self.action,
            "stage": self.stage,
            "reason": self.reason,
            "actor": self.actor,
            "gates": [g.to_json() for g in self.gates],
        }

    @classmethod
    def from_json(cls, o: Mapping[str, Any]) -> Decision:
        stage = o.get("stage")
        return cls(
            parse_iso(o["ts"], "decision ts"),
            str(o["action"]),
            None if stage is None else int(stage),
            str(o.get("reason", "")),
            tuple(GateRow.from_json(g) for g in o.get("gates") or ()),
            str(o.get("actor", "")),
        )


@dataclass(frozen=True)
class RolloutRow:
    """A rollout: its stages in time and every decision taken on it."""

    id: str
    bundle: str
    strategy: str
    status: str
    policy: str
    stages: tuple[StageSpan, ...] = ()
    decisions: tuple[Decision, ...] = ()
    name: str = ""
    previous: str | None = None
    group: str = ""

    def caught_by(self) -> list[GateRow]:
        """The gates that breached in the decision that stopped this rollout."""
        for d in reversed(self.decisions):
            if d.breaches:
                return d.breaches
        return []

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "bundle": self.bundle,
            "previous": self.previous,
            "group": self.group,
            "strategy": self.strategy,
            "status": self.status,
            "policy": self.policy,
            "stages": [s.to_json() for s in self.stages],
            "decisions": [d.to_json() for d in self.decisions],
        }

    @classmethod
    def from_json(cls, o: Mapping[str, Any]) -> RolloutRow:
        return cls(
            str(o["id"]),
            str(o["bundle"]),
            str(o.get("strategy", "")),
            str(o.get("status", "")),
            str(o.get("policy", "")),
            tuple(StageSpan.from_json(s) for s in o.get("stages") or ()),
            tuple(Decision.from_json(d) for d in o.get("decisions") or ()),
            str(o.get("name", "")),
            o.get("previous"),
            str(o.get("group", "")),
        )


@dataclass(frozen=True)
class VersionPoint:
    """Inference figures of one version over one time bin."""

    version: str
    ts: datetime
    count: int
    errors: int
    latency_p50_ms: float | None
    latency_p95_ms: float | None

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.count if self.count else None

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "ts": iso(self.ts),
            "count": self.count,
            "errors": self.errors,
            "error_rate": _num(self.error_rate),
            "latency_p50_ms": _num(self.latency_p50_ms, 4),
            "latency_p95_ms": _num(self.latency_p95_ms, 4),
        }

    @classmethod
    def from_json(cls, o: Mapping[str, Any]) -> VersionPoint:
        return cls(
            str(o["version"]),
            parse_iso(o["ts"], "by_version ts"),
            int(o["count"]),
            int(o["errors"]),
            _opt_float(o.get("latency_p50_ms")),
            _opt_float(o.get("latency_p95_ms")),
        )


@dataclass(frozen=True)
class DriftCell:
    """PSI of one input feature against the reference profile, in one device group."""

    group: str
    feature: str
    psi: float

    def to_json(self) -> dict[str, Any]:
        return {"group": self.group, "feature": self.feature, "psi": _num(self.psi, 4)}

    @classmethod
    def from_json(cls, o: Mapping[str, Any]) -> DriftCell:
        return cls(str(o["group"]), str(o["feature"]), float(o["psi"]))


@dataclass(frozen=True)
class PredictionDist:
    """The prediction distribution of one cohort of one rollout."""

    rollout: str
    cohort: str
    labels: tuple[str, ...]
    proportions: tuple[float, ...]
    count: int = 0

    def __post_init__(self) -> None:
        if len(self.labels) != len(self.proportions):
            raise DatasetFormatError(
                f"prediction distribution of {self.rollout}/{self.cohort} has "
                f"{len(self.labels)} labels but {len(self.proportions)} proportions"
            )

    def to_json(self) -> dict[str, Any]:
        return {
            "rollout": self.rollout,
            "cohort": self.cohort,
            "labels": list(self.labels),
            "proportions": [_num(p, 4) for p in self.proportions],
            "count": self.count,
        }

    @classmethod
    def from_json(cls, o: Mapping[str, Any]) -> PredictionDist:
        return cls(
            str(o["rollout"]),
            str(o["cohort"]),
            tuple(str(x) for x in o["labels"]),
            tuple(float(p) for p in o["proportions"]),
            int(o.get("count", 0)),
        )


@dataclass(frozen=True)
class AlertRow:
    """An alert the server raised or resolved in the period (``alert_events``)."""

    ts: datetime
    rule: str
    kind: str
    group: str
    model: str | None
    status: str
    value: float | None
    threshold: float
    delivery: str

    def to_json(self) -> dict[str, Any]:
        return {
            "ts": iso(self.ts),
            "rule": self.rule,
            "kind": self.kind,
            "group": self.group,
            "model": self.model,
            "status": self.status,
            "value": self.value,
            "threshold": self.threshold,
            "delivery": self.delivery,
        }

    @classmethod
    def from_json(cls, o: Mapping[str, Any]) -> AlertRow:
        value = o.get("value")
        return cls(
            parse_iso(o["ts"], "ts"),
            str(o["rule"]),
            str(o["kind"]),
            str(o["group"]),
            None if o.get("model") is None else str(o["model"]),
            str(o["status"]),
            None if value is None else float(value),
            float(o["threshold"]),
            str(o.get("delivery", "none")),
        )


@dataclass(frozen=True)
class ReviewDataset:
    """Everything one telemetry review shows, for the period ``since`` .. ``until``."""

    generated_at: datetime
    since: datetime
    until: datetime
    devices: tuple[DeviceRow, ...] = ()
    adoption: tuple[AdoptionPoint, ...] = ()
    rollouts: tuple[RolloutRow, ...] = ()
    by_version: tuple[VersionPoint, ...] = ()
    drift: tuple[DriftCell, ...] = ()
    predictions: tuple[PredictionDist, ...] = ()
    notes: tuple[str, ...] = field(default=())
    alerts: tuple[AlertRow, ...] = ()

    def versions(self) -> list[str]:
        """Every version the dataset mentions, in order of first appearance."""
        seen: dict[str, None] = {}
        for p in self.adoption:
            for v in p.counts:
                seen.setdefault(v, None)
        for vp in self.by_version:
            seen.setdefault(vp.version, None)
        for d in self.devices:
            seen.setdefault(d.bundle, None)
        return list(seen)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "generated_at": iso(self.generated_at),
            "since": iso(self.since),
            "until": iso(self.until),
            "fleet": {"devices": [d.to_json() for d in self.devices]},
            "adoption": [p.to_json() for p in self.adoption],
            "rollouts": [r.to_json() for r in self.rollouts],
            "by_version": [v.to_json() for v in self.by_version],
            "drift": [c.to_json() for c in self.drift],
            "predictions": [p.to_json() for p in self.predictions],
            "notes": list(self.notes),
            "alerts": [a.to_json() for a in self.alerts],
        }

    @classmethod
    def from_json(cls, o: Any) -> ReviewDataset:
        if not isinstance(o, Mapping):
            raise DatasetFormatError(f"a review dataset is a JSON object, not {type(o).__name__}")
        if o.get("format", FORMAT) != FORMAT:
            raise DatasetFormatError(
                f"dataset format {o.get('format')!r} is not {FORMAT!r}; "
                "re-export it with this version of edgefleet"
            )
        try:
            return cls(
                generated_at=parse_iso(o["generated_at"], "generated_at"),
                since=parse_iso(o["since"], "since"),
                until=parse_iso(o["until"], "until"),
                devices=tuple(
                    DeviceRow.from_json(d) for d in (o.get("fleet") or {}).get("devices", ())
                ),
                adoption=tuple(AdoptionPoint.from_json(p) for p in o.get("adoption", ())),
                rollouts=tuple(RolloutRow.from_json(r) for r in o.get("rollouts", ())),
                by_version=tuple(VersionPoint.from_json(v) for v in o.get("by_version", ())),
                drift=tuple(DriftCell.from_json(c) for c in o.get("drift", ())),
                predictions=tuple(PredictionDist.from_json(p) for p in o.get("predictions", ())),
                notes=tuple(str(n) for n in o.get("notes", ())),
                alerts=tuple(AlertRow.from_json(a) for a in o.get("alerts", ())),
            )
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, DatasetFormatError):
                raise
            raise DatasetFormatError(f"review dataset is malformed: {e!r}") from e


def sorted_versions(labels: Sequence[str]) -> list[str]:
    """Versions ordered by model name, then numeric version (``v2`` before ``v10``)."""

    def key(label: str) -> tuple[str, int, str]:
        name, _, v = label.rpartition(" v")
        if name and v.isdigit():
            return (name, int(v), "")
        return (label, -1, label)

    return sorted(labels, key=key)
