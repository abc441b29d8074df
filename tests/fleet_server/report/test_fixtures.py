"""A fleet history written into a real server database, for the report and dashboard tests.

:func:`populate` plays the fleet demo's story through the real rollout engine
(``decide`` / ``apply_decision`` on metrics aggregated from the very telemetry
rows it writes) and stores what the server would have stored: devices, bundles
(tar files with a drift reference profile), a group, two rollouts with their
state history, the engine's audit entries, telemetry summaries and install
events. ``kws v2`` passes every gate through three stages; ``kws v3`` errs and
is rolled back to ``kws v4`` (the previous model re-published). Devices of site
``east`` see drifted inputs on features ``f0`` and ``f2``.

This module holds no tests; it is named ``test_report_*`` to sit with its users.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from device_agent.protocol import LATENCY_BUCKETS_MS
from fleet_server.audit import SYSTEM_ACTOR
from fleet_server.db.models import AuditEntry, Bundle, Device, Group, Model, Rollout
from fleet_server.db.session import upgrade_database
from fleet_server.db.telemetry import TelemetryEvent, TelemetrySummary, create_telemetry_tables
from fleet_server.rollouts import (
    BundleRef,
    CohortMetrics,
    CohortStats,
    GateKind,
    GateSpec,
    RolloutSpec,
    RolloutState,
    Stage,
    apply_decision,
    decide,
    in_stage,
    start,
)

CLASSES = ("gateway-x86", "board-arm64", "board-legacy")
SITES = ("north", "south", "east")
FEATURES = ("f0", "f1", "f2", "f3")
REFERENCE = (0.2, 0.2, 0.2, 0.2, 0.2)
DRIFTED = (0.05, 0.05, 0.15, 0.3, 0.45)
CLASSES_OUT = 4
WINDOW = 60.0

GATES = (
    GateSpec(GateKind.INSTALL_FAILURE_RATE, 0.05, min_samples=1),
    GateSpec(GateKind.ERROR_RATE, 0.01, min_samples=200),
    GateSpec(GateKind.LATENCY_P95_RATIO, 1.5, min_samples=200),
    GateSpec(GateKind.PREDICTION_SHIFT, 0.25, min_samples=200),
)


@dataclass
class Scenario:
    """What :func:`populate` wrote, for the tests to compare with."""

    start: datetime
    end: datetime
    devices: list[Device]
    good: str = "r-good"
    bad: str = "r-bad"
    summaries: list[TelemetrySummary] = field(default_factory=list)
    decisions: list[dict[str, Any]] = field(default_factory=list)


def _profile_tar(path: Path) -> dict[str, Any]:
    """A bundle-like tar holding a drift profile; returns the manifest naming it."""
    profile = {
        "schema_version": 1,
        "input": "x",
        "reduction": "none",
        "sample_count": 512,
        "features": [
            {"name": f, "index": i, "edges": [-1.0, -0.3, 0.3, 1.0], "proportions": list(REFERENCE)}
            for i, f in enumerate(FEATURES)
        ],
        "output": {
            "name": "probs",
            "kind": "classification",
            "classes": CLASSES_OUT,
            "proportions": [0.25] * CLASSES_OUT,
        },
    }
    raw = json.dumps(profile).encode()
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("drift_profile.json")
        info.size = len(raw)
        tar.addfile(info, io.BytesIO(raw))
    return {
        "files": [
            {
                "path": "drift_profile.json",
                "role": "drift_profile",
                "sha256": hashlib.sha256(raw).hexdigest(),
                "size": len(raw),
            }
        ]
    }


def _hist(rng: random.Random, n: int, centre_ms: float) -> list[int]:
    hist = [0] * (len(LATENCY_BUCKETS_MS) + 1)
    for _ in range(n):
        v = rng.lognormvariate(0, 0.25) * centre_ms
        i = next((k for k, e in enumerate(LATENCY_BUCKETS_MS) if v <= e), len(LATENCY_BUCKETS_MS))
        hist[i] += 1
    return hist


def _multinomial(rng: random.Random, n: int, p: Sequence[float]) -> list[int]:
    out = [0] * len(p)
    for k in rng.choices(range(len(p)), weights=p, k=n):
        out[k] += 1
    return out


def populate(
    engine: Engine, tmp: Path, *, end: datetime | None = None, devices: int = 30, seed: int = 11
) -> Scenario:
    """Write the story into ``engine``'s database (migrated here) and return what was written."""
    upgrade_database(engine)
    create_telemetry_tables(engine)
    rng = random.Random(seed)
    end = (end or datetime.now(timezone.utc)).replace(microsecond=0)
    t0 = end - timedelta(minutes=40)
    T = t0.timestamp()
    sessions = sessionmaker(engine, expire_on_commit=False)
    sc = Scenario(start=t0, end=end, devices=[])

    with sessions() as s:
        s.add(Model(id="m-kws", name="kws"))
        s.flush()
        bundles = {}
        for v in (1, 2, 3, 4):
            path = tmp / f"kws-{v}.efb"
            manifest = _profile_tar(path)
            bundles[v] = Bundle(
                id=f"b-kws{v}",
                model_id="m-kws",
                name="kws",
                version=v,
                format="onnx",
                device_classes=list(CLASSES),
                file_path=str(path),
                sha256=f"{v:064x}",
                size=1,
                manifest=manifest,
                uploaded_by="op:alice",
            )
        s.add_all(bundles.values())
        s.flush()
        s.add(Group(id="g-all", name="all-devices", selector={}))
        for i in range(devices):
            d = Device(
                id=f"dev-{i:03d}",
                device_class=CLASSES[i % 3],
                labels={"site": SITES[i % 3]},
                credential_hash=f"{i:064x}",
                enrolled_at=t0 - timedelta(hours=1),
                health="ok",
            )
            sc.devices.append(d)
        s.add_all(sc.devices)
        s.commit()

    ids = [d.id for d in sc.devices]
    ref = {v: BundleRef(f"b-kws{v}", "kws", v) for v in (1, 2, 3, 4)}
    good = RolloutSpec(
        sc.good,
        ref[2],
        ref[1],
        {},
        stages=(Stage(10, 1, 180), Stage(50, 1, 180), Stage(100, 1, 180)),
        gates=GATES,
    )
    bad = RolloutSpec(
        sc.bad, ref[3], ref[2], {}, stages=(Stage(10, 1, 180), Stage(100, 1, 180)), gates=GATES
    )
    # what each device runs: (since, version); everyone starts on v1
    running: dict[str, list[tuple[float, int]]] = {d: [(T - 600, 1)] for d in ids}
    events: list[TelemetryEvent] = []
    seq = {d: 0 for d in ids}

    def next_seq(d: str) -> int:
        seq[d] += 1
        return seq[d]

    def install(d: str, at: float, v: int, rollout: str | None) -> None:
        running[d].append((at, v))
        events.append(
            TelemetryEvent(
                device_id=d,
                seq=next_seq(d),
                ts=at,
                received_at=at,
                type="install",
                outcome="installed",
                name="kws",
                version=v,
                bundle_id=f"b-kws{v}",
                rollout_id=rollout,
                body={},
            )
        )

    def version_at(d: str, t: float) -> int:
        return [v for since, v in running[d] if since <= t][-1]

    rows: list[TelemetrySummary] = []

    def telemetry_until(t_stop: float) -> None:
        t = max([r.received_at for r in rows], default=T)
        while t + WINDOW <= t_stop:
            t += WINDOW
            for d in ids:
                v = version_at(d, t - WINDOW / 2)
                bad_model = v == 3
                n = rng.randint(180, 220)
                east = SITES[int(d.split("-")[1]) % 3] == "east"
                fc = {
                    f: _multinomial(rng, n, DRIFTED if east and f in ("f0", "f2") else REFERENCE)
                    for f in FEATURES
                }
                preds = [0.25] * CLASSES_OUT if not bad_model else [0.1, 0.6, 0.15, 0.15]
                rows.append(
                    TelemetrySummary(
                        device_id=d,
                        seq=next_seq(d),
                        ts=t,
                        received_at=t,
                        window_start=t - WINDOW,
                        window_end=t,
                        name="kws",
                        version=v,
                        rollout_id=(sc.good if v == 2 else sc.bad if v in (3, 4) else None),
                        count=n,
                        errors=sum(rng.random() < (0.08 if bad_model else 0.002) for _ in range(n)),
                        latency_hist=_hist(rng, n, 12.0 if bad_model else 3.0),
                        drift_psi_max=0.4 if east else 0.02,
                        feature_counts=fc,
                        prediction_counts=_multinomial(rng, n, preds),
                    )
                )

    def metrics(spec: RolloutSpec, state: RolloutState, now: float) -> CohortMetrics:
        since = state.stage_started_at or now
        cohorts: dict[str, dict[str, Any]] = {}
        for name in ("canary", "control"):
            cohorts[name] = {
                "devices": set(),
                "inferences": 0,
                "errors": 0,
                "hist": [0] * (len(LATENCY_BUCKETS_MS) + 1),
                "pred": [0] * CLASSES_OUT,
            }
        for r in rows:
            if not since <= r.received_at <= now:
                continue
            if r.version == spec.bundle.version:
                c = cohorts["canary"]
            elif spec.previous and r.version == spec.previous.version:
                c = cohorts["control"]
            else:
                continue
            c["devices"].add(r.device_id)
            c["inferences"] += r.count
            c["errors"] += r.errors
            c["hist"] = [a + b for a, b in zip(c["hist"], r.latency_hist or [], strict=True)]
            c["pred"] = [a + b for a, b in zip(c["pred"], r.prediction_counts or [], strict=True)]
        installs = [
            e
            for e in events
            if e.rollout_id == spec.rollout_id
            and e.version == spec.bundle.version
            and since <= e.received_at <= now
        ]

        def stats(c: dict[str, Any], with_installs: bool) -> CohortStats:
            return CohortStats(
                devices=len(c["devices"]),
                installs=len(installs) if with_installs else 0,
                inferences=c["inferences"],
                errors=c["errors"],
                latency_hist=tuple(c["hist"]),
                prediction_counts=tuple(c["pred"]),
            )

        return CohortMetrics(stats(cohorts["canary"], True), stats(cohorts["control"], False))

    def step(
        spec: RolloutSpec, state: RolloutState, now: float, rollback_to: BundleRef | None = None
    ) -> RolloutState:
        telemetry_until(now)
        d = decide(spec, state, metrics(spec, state, now), now)
        new = apply_decision(spec, state, d, rollback_bundle=rollback_to)
        sc.decisions.append({"rollout": spec.rollout_id, **d.to_json()})
        audit.append(
            AuditEntry(
                ts=datetime.fromtimestamp(now, timezone.utc),
                actor=SYSTEM_ACTOR,
                action=f"rollout.{d.action.value}",
                target_type="rollout",
                target_id=spec.rollout_id,
                details=d.to_json(),
            )
        )
        if new.stage != state.stage and new.stage >= 0:
            for dev in ids:
                if in_stage(spec, new.stage, dev) and not in_stage(spec, state.stage, dev):
                    install(dev, now + rng.uniform(5, 25), spec.bundle.version, spec.rollout_id)
        return new

    audit: list[AuditEntry] = []
    # rollout 1: start by an operator at T+300, then the engine every stage's soak
    g_state = start(good, RolloutState(), T + 300, "operator:alice")
    audit.append(
        AuditEntry(
            ts=datetime.fromtimestamp(T + 300, timezone.utc),
            actor="operator:alice",
            action="rollout.start",
            target_type="rollout",
            target_id=sc.good,
            details={
                "from_status": "pending",
                "to_status": "running",
                "from_stage": -1,
                "to_stage": 0,
                "reason": "",
            },
        )
    )
    for dev in ids:
        if in_stage(good, 0, dev):
            install(dev, T + 300 + rng.uniform(5, 25), 2, sc.good)
    now = T + 300
    while not g_state.terminal:
        now += 200
        g_state = step(good, g_state, now)
    # rollout 2 starts 5 minutes later and is rolled back to kws v4
    b_start = now + 300
    telemetry_until(b_start)
    b_state = start(bad, RolloutState(), b_start, "operator:alice")
    audit.append(
        AuditEntry(
            ts=datetime.fromtimestamp(b_start, timezone.utc),
            actor="operator:alice",
            action="rollout.start",
            target_type="rollout",
            target_id=sc.bad,
            details={
                "from_status": "pending",
                "to_status": "running",
                "from_stage": -1,
                "to_stage": 0,
                "reason": "",
            },
        )
    )
    for dev in ids:
        if in_stage(bad, 0, dev):
            install(dev, b_start + rng.uniform(5, 25), 3, sc.bad)
    b_state = step(bad, b_state, b_start + 200, rollback_to=ref[4])
    assert b_state.status.value == "rolled_back", b_state
    for dev in ids:
        install(dev, b_start + 200 + rng.uniform(5, 25), 4, sc.bad)
    telemetry_until(end.timestamp())

    with sessions() as s:
        for spec, state, bundle in ((good, g_state, "b-kws2"), (bad, b_state, "b-kws3")):
            hist = state.history
            s.add(
                Rollout(
                    id=spec.rollout_id,
                    name=f"{spec.bundle.name} v{spec.bundle.version} to all",
                    bundle_id=bundle,
                    group_id="g-all",
                    strategy=spec.strategy.value,
                    status=state.status.value,
                    spec=spec.to_json(),
                    state=state.to_json(),
                    created_by="op:alice",
                    created_at=datetime.fromtimestamp(hist[0].ts, timezone.utc),
                    updated_at=datetime.fromtimestamp(hist[-1].ts, timezone.utc),
                )
            )
        s.add_all(audit)
        s.add_all(events)
        s.add_all(rows)
        for d in s.query(Device):
            v = version_at(d.id, end.timestamp())
            d.current_bundle_id, d.current_name, d.current_version = f"b-kws{v}", "kws", v
            d.last_seen_at = end - timedelta(seconds=rng.randint(1, 50))
        s.commit()
    sc.summaries = rows
    return sc


def session_for(engine: Engine) -> Session:
    return sessionmaker(engine, expire_on_commit=False)()


# -- a small app serving only the dashboard, for the browser tests ------------------

#: environment variable naming the database :func:`dashboard_app` serves
DB_ENV = "EDGEFLEET_REPORT_TEST_DB"
BUNDLES_ENV = "EDGEFLEET_REPORT_TEST_BUNDLES"


def dashboard_app() -> Any:
    """uvicorn factory: a FastAPI app with a server context and only the dashboard router."""
    import os

    from fastapi import FastAPI

    from fleet_server.api.dashboard import dashboard_router
    from fleet_server.context import ServerContext
    from fleet_server.settings import ServerSettings

    settings = ServerSettings(
        database_url=os.environ[DB_ENV],
        bundle_dir=Path(os.environ[BUNDLES_ENV]),
        run_migrations=False,
    )
    app = FastAPI(title="edgefleet dashboard (test app)")
    app.state.ctx = ServerContext(settings)
    app.include_router(dashboard_router())
    return app


def add_operator(
    engine: Engine, name: str, role: str, token: str, *, revoked: bool = False
) -> None:
    """An operator with one token (hashed with the development pepper, as the server does)."""
    from fleet_server.db.models import Operator, OperatorToken
    from fleet_server.security import TokenHasher
    from fleet_server.settings import DEV_TOKEN_PEPPER

    with sessionmaker(engine)() as s:
        s.add(Operator(id=f"op-{name}", name=name, role=role))
        s.flush()
        s.add(
            OperatorToken(
                id=f"tok-{name}",
                operator_id=f"op-{name}",
                token_hash=TokenHasher(DEV_TOKEN_PEPPER).hash(token),
                revoked_at=datetime.now(timezone.utc) if revoked else None,
            )
        )
        s.commit()
