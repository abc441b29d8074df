"""Fill a :class:`ReviewDataset` from the server's database (the I/O shell of the review).

Sources:

* ``devices`` -> the fleet table (class, labels, running bundle, last seen, health);
* ``rollouts`` (spec and state with its history) -> stages in time; ``audit_log``
  entries on each rollout -> decisions with every gate's figures (the engine's
  ``Decision.to_json()`` in ``details``); rollouts without audited decisions fall
  back to the state's own history;
* ``telemetry_summaries`` -> adoption, latency and errors by version, drift per
  feature and group, canary vs control prediction distributions;
* ``telemetry_events`` and ``device_reports`` (install outcomes) -> adoption;
* the bundles' ``drift_profile.json`` -> the reference each drift PSI compares with;
* ``alert_events`` -> the alerts raised and resolved in the period.

Telemetry rows are placed in time by ``received_at`` (the server's clock), like
the rollout engine does, so device clock skew cannot move them. A source that is
missing (a table that does not exist in this database) leaves its part of the
dataset empty and adds a note saying so; nothing here writes.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import func, inspect, select
from sqlalchemy.orm import Session

from fleet_server.db.alerts import AlertEvent
from fleet_server.db.models import AuditEntry, Bundle, Device, DeviceReport, Group, Rollout
from fleet_server.db.telemetry import TelemetrySummary as S
from fleet_server.registry.groups import matches
from fleet_server.registry.profiles import bundle_profile
from fleet_server.report import sqlagg
from fleet_server.report.aggregate import (
    DriftMap,
    Seen,
    VersionSeries,
    WindowFigures,
    add_into,
    adoption_series,
    prediction_dist,
    time_edges,
)
from fleet_server.report.dataset import (
    AlertRow,
    Decision,
    DeviceRow,
    GateRow,
    PredictionDist,
    ReviewDataset,
    RolloutRow,
    StageSpan,
    version_label,
)

#: a drift profile larger than this is not read from a bundle
#: actions of the rollout engine that are not worth a marker (it kept waiting)
QUIET_ACTIONS = frozenset({"hold"})
#: alerts listed at most (the newest are in ``edgefleet alerts list``)
MAX_ALERTS = 500


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, timezone.utc)


def _has_table(session: Session, name: str) -> bool:
    return bool(inspect(session.get_bind()).has_table(name))


def load_dataset(
    session: Session,
    since: datetime,
    until: datetime,
    *,
    drift_by: str = "class",
    now: datetime | None = None,
    in_database: bool | None = None,
) -> ReviewDataset:
    """The review of ``since`` .. ``until``.

    ``drift_by`` chooses the drift heat map's groups: ``"class"`` (device class),
    ``"label:KEY"`` (the value of a device label) or ``"group"`` (the server's
    device groups; a device may be in several). ``in_database`` sums the
    telemetry's JSON arrays in SQL (:mod:`.sqlagg`, SQLite and PostgreSQL) instead
    of row by row here; by default only on PostgreSQL, where it is about twice as
    fast (on SQLite both take about as long).
    """
    now = now or datetime.now(timezone.utc)
    notes: list[str] = []
    devices = list(
        session.scalars(select(Device).where(Device.revoked_at.is_(None)).order_by(Device.id))
    )
    fleet = tuple(
        DeviceRow(
            d.id,
            d.device_class,
            dict(d.labels or {}),
            version_label(d.current_name, d.current_version),
            d.last_seen_at,
            d.health,
            d.health_code,
        )
        for d in devices
    )
    groups = list(session.scalars(select(Group).order_by(Group.name)))
    bundles = {b.id: b for b in session.scalars(select(Bundle))}
    rollouts = _rollouts(session, since, until, groups, bundles)

    have_summaries = _has_table(session, "telemetry_summaries")
    have_events = _has_table(session, "telemetry_events")
    if not have_summaries:
        notes.append(
            "The telemetry_summaries table does not exist in this database: "
            "latency, errors, drift and prediction figures are empty."
        )
    lo_f, hi_f = since.timestamp(), until.timestamp()

    first_t, last_t, window = None, None, None
    if have_summaries:
        first_t, last_t, window = session.execute(
            select(
                func.min(S.received_at),
                func.max(S.received_at),
                func.avg(S.window_end - S.window_start),
            ).where(S.received_at >= lo_f, S.received_at <= hi_f)
        ).one()
    seen = _seen(session, lo_f, hi_f, have_summaries, have_events)
    data_times = [s.ts for s in seen if s.ts >= since]
    data_times += [_utc(t) for t in (first_t, last_t) if t is not None]
    data_times += [d.ts for r in rollouts for d in r.decisions]
    lo = max(since, min(data_times)) if data_times else since
    hi = min(until, max(max(data_times), min(now, until))) if data_times else until
    edges = time_edges(lo, hi, min_width=timedelta(seconds=max(1.0, float(window or 1.0))))

    registry = {
        d.id: (version_label(d.current_name, d.current_version), d.enrolled_at) for d in devices
    }
    adoption = adoption_series(seen, registry, edges) if devices else []

    by_id = {d.id: d for d in devices}
    series, drift_map = VersionSeries(edges), DriftMap()
    cohorts = _cohort_plans(rollouts, by_id, session)
    if have_summaries:

        def keys(device_id: str) -> list[str]:
            return _group_keys(by_id.get(device_id), groups, drift_by)

        if in_database is None:
            in_database = session.get_bind().dialect.name == "postgresql"
        fill = _fill_in_database if in_database and sqlagg.supported(session) else _fill_by_rows
        fill(session, lo_f, hi_f, edges, keys, series, drift_map, cohorts)
    by_version = series.points()
    drift, missing = drift_map.cells(_references(bundles.values()))
    if missing:
        notes.append(
            "No reference profile for " + ", ".join(missing) + ": their drift PSI "
            "compares each group with the fleet-wide inputs of the same version."
        )
    predictions = [d for plan in cohorts for d in plan.dists()]
    alerts = _alerts(session, lo_f, hi_f) if _has_table(session, "alert_events") else []
    return ReviewDataset(
        generated_at=now,
        since=since,
        until=until,
        devices=fleet,
        adoption=tuple(adoption),
        rollouts=tuple(rollouts),
        by_version=tuple(by_version),
        drift=tuple(drift),
        predictions=tuple(predictions),
        notes=tuple(notes),
        alerts=tuple(alerts),
    )


def _alerts(session: Session, since: float, until: float) -> list[AlertRow]:
    """Alerts raised and resolved in the period, oldest first."""
    e = AlertEvent
    rows = session.scalars(
        select(e).where(e.ts >= since, e.ts <= until).order_by(e.ts, e.id).limit(MAX_ALERTS)
    )
    return [
        AlertRow(
            _utc(a.ts),
            a.rule_name,
            a.kind,
            a.group_name,
            a.model,
            a.status,
            a.value,
            a.threshold,
            a.delivery,
        )
        for a in rows
    ]


# -- rollouts -----------------------------------------------------------------------


def _rollouts(
    session: Session,
    since: datetime,
    until: datetime,
    groups: Sequence[Group],
    bundles: Mapping[str, Bundle],
) -> list[RolloutRow]:
    group_names = {g.id: g.name for g in groups}
    rows = session.scalars(
        select(Rollout)
        .where(Rollout.created_at <= until, Rollout.updated_at >= since)
        .order_by(Rollout.created_at)
    )
    out = []
    for r in rows:
        spec, state = r.spec or {}, r.state or {}
        b = bundles.get(r.bundle_id)
        candidate = (
            version_label(b.name, b.version) if b else _ref_label(spec.get("bundle")) or r.bundle_id
        )
        audit = session.scalars(
            select(AuditEntry)
            .where(
                AuditEntry.target_type == "rollout",
                AuditEntry.target_id == r.id,
                AuditEntry.ts >= since,
                AuditEntry.ts <= until,
            )
            .order_by(AuditEntry.ts, AuditEntry.id)
        )
        decisions = [d for d in (_decision(e) for e in audit) if d is not None]
        history = [h for h in state.get("history", []) if isinstance(h, Mapping)]
        if not decisions:
            decisions = [
                Decision(
                    _utc(float(h["ts"])),
                    str(h.get("action", "")),
                    _int(h.get("stage")),
                    str(h.get("reason", "")),
                    actor=str(h.get("actor", "")),
                )
                for h in history
                if "ts" in h
            ]
        out.append(
            RolloutRow(
                id=r.id,
                bundle=candidate,
                strategy=r.strategy,
                status=r.status,
                policy=str(spec.get("failure_policy", "")),
                stages=tuple(_stages(spec, history, r.status)),
                decisions=tuple(decisions),
                name=r.name,
                previous=_ref_label(spec.get("previous")),
                group=group_names.get(r.group_id, r.group_id),
            )
        )
    return out


def _ref_label(ref: Any) -> str | None:
    if not isinstance(ref, Mapping) or not ref.get("name"):
        return None
    return version_label(str(ref["name"]), _int(ref.get("version")))


def _int(x: Any) -> int | None:
    try:
        return None if x is None else int(x)
    except (TypeError, ValueError):
        return None


def _stages(
    spec: Mapping[str, Any], history: Sequence[Mapping[str, Any]], status: str
) -> list[StageSpan]:
    """When each stage ran, from the state's history (stage index and time of each move)."""
    percents = [
        float(s.get("percent", 0)) for s in spec.get("stages", []) if isinstance(s, Mapping)
    ]
    spans: list[StageSpan] = []
    current: tuple[int, datetime] | None = None
    for h in history:
        try:
            ts, stage = _utc(float(h["ts"])), int(h.get("stage", -1))
        except (KeyError, TypeError, ValueError):
            continue
        ended = str(h.get("to_status", "")) in ("succeeded", "rolled_back", "aborted")
        if current is not None and (stage != current[0] or ended):
            spans.append(_span(current, ts, percents))
            current = None
        if not ended and stage >= 0 and current is None:
            current = (stage, ts)
    if current is not None:
        spans.append(_span(current, None, percents))
    return spans


def _span(cur: tuple[int, datetime], end: datetime | None, percents: Sequence[float]) -> StageSpan:
    idx = cur[0]
    return StageSpan(idx, percents[idx] if idx < len(percents) else 0.0, cur[1], end)


def _decision(e: AuditEntry) -> Decision | None:
    details = e.details or {}
    action = str(details.get("action") or e.action.rsplit(".", 1)[-1])
    if action in QUIET_ACTIONS:
        return None
    gates = []
    for g in details.get("gates") or []:
        if not isinstance(g, Mapping):
            continue
        gates.append(
            GateRow(
                name=str(g.get("name", g.get("kind", ""))),
                canary=_float(g.get("canary_value", g.get("canary"))),
                control=_float(g.get("control_value", g.get("control"))),
                threshold=_float(g.get("threshold")) or 0.0,
                verdict=str(g.get("verdict", "")),
                n_canary=_int(g.get("canary_samples", g.get("n_canary"))) or 0,
                n_control=_int(g.get("control_samples", g.get("n_control"))) or 0,
            )
        )
    if action == "advance" and details.get("status") == "pending":
        action = "start"  # the engine starts a pending rollout by "advancing" it to stage 0
    stage = _int(details.get("stage", details.get("from_stage")))
    if action == "start" or (stage is not None and stage < 0):
        stage = _int(details.get("to_stage"))
    return Decision(e.ts, action, stage, str(details.get("reason", "")), tuple(gates), e.actor)


def _float(x: Any) -> float | None:
    try:
        return None if x is None else float(x)
    except (TypeError, ValueError):
        return None


# -- telemetry ---------------------------------------------------------------------


def _seen(
    session: Session, lo_f: float, hi_f: float, have_summaries: bool, have_events: bool
) -> list[Seen]:
    """When each device started running each version: installs and first summaries."""
    seen = []
    if have_summaries:
        for d, name, version, t in session.execute(
            select(S.device_id, S.name, S.version, func.min(S.received_at))
            .where(S.received_at >= lo_f, S.received_at <= hi_f)
            .group_by(S.device_id, S.name, S.version)
        ):
            seen.append(Seen(d, version_label(name, version), _utc(t)))
    if have_events:
        from fleet_server.db.telemetry import TelemetryEvent as E

        for d, ev_name, ev_version, t in session.execute(
            select(E.device_id, E.name, E.version, E.received_at).where(
                E.type == "install",
                E.outcome == "installed",
                E.received_at <= hi_f,
                E.shadow.is_not(True),
            )
        ):
            if ev_name:
                seen.append(Seen(d, version_label(ev_name, ev_version), _utc(t)))
    until = _utc(hi_f)
    for d, rp_name, rp_version, at in session.execute(
        select(
            DeviceReport.device_id,
            DeviceReport.name,
            DeviceReport.version,
            DeviceReport.received_at,
        ).where(
            DeviceReport.type == "install",
            DeviceReport.outcome == "installed",
            DeviceReport.received_at <= until,
        )
    ):
        if rp_name:
            seen.append(Seen(d, version_label(rp_name, rp_version), at))
    return seen


GroupKeys = Callable[[str], list[str]]


def _fill_by_rows(
    session: Session,
    lo_f: float,
    hi_f: float,
    edges: Sequence[datetime],
    keys: GroupKeys,
    series: VersionSeries,
    drift_map: DriftMap,
    cohorts: Sequence[_CohortPlan],
) -> None:
    """One streamed pass over the period's summaries, decoding each row's JSON here."""
    rows = session.execute(
        select(
            S.device_id,
            S.received_at,
            S.name,
            S.version,
            S.rollout_id,
            S.count.label("n"),  # not `count`: Row.count is tuple.count
            S.errors,
            S.latency_hist,
            S.p95_ms,
            S.feature_counts,
            S.prediction_counts,
        )
        .where(S.received_at >= lo_f, S.received_at <= hi_f)
        .execution_options(yield_per=2000)
    )
    for r in rows:
        label = version_label(r.name, r.version)
        series.add(
            WindowFigures(
                _utc(r.received_at), label, r.n or 0, r.errors or 0, r.latency_hist, r.p95_ms
            )
        )
        if r.feature_counts:
            drift_map.add(keys(r.device_id), label, max(r.n or 0, 1), r.feature_counts)
        if r.prediction_counts:
            for plan in cohorts:
                plan.add(r.device_id, r.received_at, label, r.rollout_id, r.prediction_counts)


def _fill_in_database(
    session: Session,
    lo_f: float,
    hi_f: float,
    edges: Sequence[datetime],
    keys: GroupKeys,
    series: VersionSeries,
    drift_map: DriftMap,
    cohorts: Sequence[_CohortPlan],
) -> None:
    """The same sums as :func:`_fill_by_rows`, computed by the database (:mod:`.sqlagg`)."""
    lo = edges[0].timestamp()
    width = (edges[1] - edges[0]).total_seconds() if len(edges) > 1 else 1.0
    width = width or 1.0
    for name, version, b, n, errors, p95_sum, p95_n in sqlagg.version_totals(
        session, lo, hi_f, width
    ):
        series.add_totals(version_label(name, version), int(b), n, errors, p95_sum, p95_n)
    for name, version, b, idx, n in sqlagg.latency_buckets(session, lo, hi_f, width):
        series.add_bucket(version_label(name, version), int(b), int(idx), n)
    counts: dict[tuple[str, str], dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for device, name, version, feature, idx, n in sqlagg.feature_buckets(session, lo_f, hi_f):
        cells = counts[(device, version_label(name, version))][str(feature)]
        if len(cells) <= int(idx):
            cells.extend([0] * (int(idx) + 1 - len(cells)))
        cells[int(idx)] += int(n)
    for device, name, version, weight in sqlagg.feature_weights(session, lo_f, hi_f):
        label = version_label(name, version)
        drift_map.add(keys(device), label, int(weight), counts.get((device, label), {}))
    for plan in cohorts:
        t0, t1 = max(plan.t0, lo_f), min(plan.t1, hi_f)
        if t0 > t1:
            continue
        preds: dict[tuple[str, str, str | None], list[int]] = defaultdict(list)
        for device, name, version, rollout, idx, n in sqlagg.prediction_buckets(session, t0, t1):
            cells = preds[(device, version_label(name, version), rollout)]
            if len(cells) <= int(idx):
                cells.extend([0] * (int(idx) + 1 - len(cells)))
            cells[int(idx)] += int(n)
        for (device, label, rollout), cells in preds.items():
            plan.add(device, t0, label, rollout, cells)


def _group_keys(device: Device | None, groups: Sequence[Group], drift_by: str) -> list[str]:
    if device is None:
        return ["(unknown device)"]
    if drift_by == "group":
        keys = [
            g.name
            for g in groups
            if matches(g.selector or {}, g.device_class, device.labels or {}, device.device_class)
        ]
        return keys or ["(no group)"]
    if drift_by.startswith("label:"):
        key = drift_by[len("label:") :]
        return [f"{key}={(device.labels or {}).get(key, '(none)')}"]
    return [device.device_class]


def _references(bundles: Iterable[Bundle]) -> dict[str, dict[str, Sequence[float]]]:
    refs: dict[str, dict[str, Sequence[float]]] = {}
    for b in bundles:
        profile = bundle_profile(b)
        if profile is not None:
            refs[version_label(b.name, b.version)] = {
                f.name: f.proportions for f in profile.features
            }
    return refs


class _CohortPlan:
    """Which summaries count as one rollout's canary and control, and their prediction sums.

    Canary: the candidate version in this rollout's group while the rollout ran;
    control: the previous version in the same group over the same time.
    """

    def __init__(self, r: RolloutRow, t0: float, t1: float, member: Callable[[str], bool]) -> None:
        self.r, self.t0, self.t1, self.member = r, t0, t1, member
        self.canary: list[int] = []
        self.control: list[int] = []

    def add(
        self, device_id: str, t: float, label: str, rollout_id: str | None, counts: Sequence[int]
    ) -> None:
        if not self.t0 <= t <= self.t1 or not self.member(device_id):
            return
        if label == self.r.bundle and rollout_id in (self.r.id, None):
            add_into(self.canary, counts)
        elif self.r.previous and label == self.r.previous:
            add_into(self.control, counts)

    def dists(self) -> list[PredictionDist]:
        out = []
        for cohort, total in (("canary", self.canary), ("control", self.control)):
            d = prediction_dist(self.r.id, cohort, [total])
            if d is not None:
                out.append(d)
        return out


def _cohort_plans(
    rollouts: Sequence[RolloutRow], by_id: Mapping[str, Device], session: Session
) -> list[_CohortPlan]:
    group_ids = {
        r.id: r.group_id
        for r in session.scalars(select(Rollout).where(Rollout.id.in_([r.id for r in rollouts])))
    }
    group_of = {g.id: g for g in session.scalars(select(Group))}
    plans = []
    for r in rollouts:
        starts = [s.started_at for s in r.stages if s.started_at]
        if not starts:
            continue
        ends = [s.ended_at for s in r.stages]
        # a finished rollout's cohorts are compared while it ran; a running one's until now
        t1 = max(e for e in ends if e).timestamp() if all(ends) else float("inf")
        group = group_of.get(group_ids.get(r.id, ""))

        def member(device_id: str, group: Group | None = group) -> bool:
            d = by_id.get(device_id)
            if d is None or group is None:
                return d is not None
            return matches(group.selector or {}, group.device_class, d.labels or {}, d.device_class)

        plans.append(_CohortPlan(r, min(starts).timestamp(), t1, member))
    return plans
