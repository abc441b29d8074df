"""Everything one server instance holds: settings, database, caches, notifier, metrics.

One :class:`ServerContext` is built per app by :func:`fleet_server.app.create_app`
and reached from request handlers through ``request.app.state.ctx`` (see
:mod:`fleet_server.api.deps`). Nothing here is a module-level singleton.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from device_agent.bundle import TrustStore
from fleet_server.assignments.cache import AssignmentCache, DeviceAuthCache, LastSeenBuffer
from fleet_server.assignments.document import (
    AssignmentChange,
    AssignmentWriter,
    Notifier,
    TelemetryPolicy,
)
from fleet_server.broker.notify import MqttNotifier, NullNotifier
from fleet_server.db.group_commit import GroupCommitter
from fleet_server.db.models import Device, DeviceModel, Operator, OperatorToken
from fleet_server.db.session import make_engine, make_sessionmaker, upgrade_database
from fleet_server.metrics import ServerMetrics
from fleet_server.registry.bundles import BundleRegistry
from fleet_server.registry.certificates import CertificateAuth
from fleet_server.registry.storage import BundleStore
from fleet_server.rollouts.service import RolloutService
from fleet_server.security import Role, TokenHasher, new_id
from fleet_server.settings import ServerSettings

if TYPE_CHECKING:
    from fleet_server.broker.beside import BrokerBeside
    from fleet_server.broker.monitor import BrokerMonitor
    from fleet_server.pki.ca import FleetCA

log = logging.getLogger(__name__)

BOOTSTRAP_OPERATOR = "bootstrap-admin"


class ServerContext:
    """The state of one server instance."""

    def __init__(self, settings: ServerSettings, notifier: Notifier | None = None) -> None:
        self.broker: BrokerBeside | None = None
        self.monitor: BrokerMonitor | None = None
        self.ca: FleetCA | None = None
        if settings.ca_dir is not None:
            from fleet_server.pki.ca import FleetCA

            self.ca = FleetCA.load(settings.ca_dir)
        if settings.broker != "none":
            from fleet_server.broker.beside import BrokerBeside
            from fleet_server.broker.mosquitto import SERVER_USER

            self.broker = BrokerBeside(
                settings.broker,
                settings.broker_dir,
                settings.broker_port or None,
                ca=self.ca,
                tls_port=settings.broker_tls_port or None,
                # the broker's certificate names what devices use to reach it
                tls_names=list(
                    dict.fromkeys(
                        [
                            *([settings.mqtt_public_host] if settings.mqtt_public_host else []),
                            *settings.tls_names,
                            "127.0.0.1",
                            "localhost",
                        ]
                    )
                ),
            )
            settings = settings.model_copy(
                update={
                    "mqtt_host": "127.0.0.1",
                    "mqtt_port": self.broker.port,
                    "mqtt_username": SERVER_USER,
                    "mqtt_password": self.broker.server_password,
                    "mqtt_version": self.broker.mqtt_version,
                    "ingest_client_id": settings.ingest_client_id or "edgefleet-ingest-beside",
                }
            )
        self.settings = settings
        self.engine: Engine = make_engine(settings.database_url)
        self.sessions: sessionmaker[Session] = make_sessionmaker(self.engine)
        self.hasher = TokenHasher(settings.token_pepper)
        self.metrics = ServerMetrics()
        self.telemetry_policy = TelemetryPolicy(
            settings.telemetry_sample_rate, settings.telemetry_window_seconds
        )
        self.device_auth = DeviceAuthCache(self.engine, settings.device_auth_cache_size)
        #: device client certificates (TLS) -> device id, for recorded valid ones only
        self.device_certs = CertificateAuth(
            self.engine,
            ttl_seconds=max(settings.assignment_cache_seconds, 1.0),
            max_size=settings.device_auth_cache_size,
        )
        self.assignment_cache = AssignmentCache(self.engine, self.telemetry_policy)
        self.last_seen = LastSeenBuffer(self.engine)
        #: device install and health reports: concurrent requests share transactions
        self.report_commits = GroupCommitter(
            self.session, name="device-reports", prepare=_load_reporting_devices
        )
        self.bundles = BundleStore(settings.bundle_dir)
        self.registry = BundleRegistry(
            self.bundles,
            self.trust_store,
            max_upload_bytes=settings.max_upload_bytes,
            signing_key_dir=settings.signing_key_dir,
            signing_key=settings.signing_key,
        )
        if notifier is None:
            notifier = (
                MqttNotifier(
                    settings.mqtt_host,
                    settings.mqtt_port,
                    username=settings.mqtt_username,
                    password=settings.mqtt_password,
                    mqtt_version=settings.mqtt_version,
                )
                if settings.mqtt_host
                else NullNotifier()
            )
        self.notifier = notifier
        self.assignments = AssignmentWriter(self.telemetry_policy, self._on_assignment_change)
        self.rollouts = RolloutService(
            self.assignments, self.registry, rollback_by_release=settings.uptane_dir is not None
        )

    # -- lifecycle ---------------------------------------------------------
    def start(self) -> None:
        """Start the broker beside the server (if configured), migrate the database and
        create the bootstrap admin token if configured."""
        if self.broker is not None:
            self.broker.start()
        if self.settings.mqtt_host:  # broker connectivity and connected devices for /healthz
            from fleet_server.broker.monitor import BrokerMonitor

            s = self.settings
            self.monitor = BrokerMonitor.connect(
                s.mqtt_host,
                s.mqtt_port,
                username=s.mqtt_username or None,
                password=s.mqtt_password or None,
                mqtt_version=s.mqtt_version,
            ).start()
        if self.settings.run_migrations:
            upgrade_database(self.engine)
        if self.settings.admin_bootstrap_token:
            self._ensure_bootstrap_token(self.settings.admin_bootstrap_token)

    def close(self) -> None:
        if self.monitor is not None:
            self.monitor.stop()
        try:
            self.report_commits.close()
            self.last_seen.flush()
        finally:
            close = getattr(self.notifier, "close", None)
            if close is not None:
                close()
            self.engine.dispose()
            if self.broker is not None:
                self.broker.stop()

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self.sessions() as s:
            yield s

    def trust_store(self) -> TrustStore:
        """The trust store uploaded bundles are verified against (read per upload)."""
        path = self.settings.trust_store
        if path is None:
            return TrustStore()
        return TrustStore.load(Path(path))

    # -- internals -----------------------------------------------------------
    def _ensure_bootstrap_token(self, token: str) -> None:
        h = self.hasher.hash(token)
        with self.session() as s:
            if s.scalar(select(OperatorToken.id).where(OperatorToken.token_hash == h)):
                return
            op = s.scalar(select(Operator).where(Operator.name == BOOTSTRAP_OPERATOR))
            if op is None:
                op = Operator(id=new_id("op"), name=BOOTSTRAP_OPERATOR, role=Role.admin.name)
                s.add(op)
                s.flush()
            s.add(OperatorToken(id=new_id("tok"), operator_id=op.id, token_hash=h))
            try:
                s.commit()
            except Exception:  # another replica won the race; its row is equivalent
                s.rollback()
                log.info("bootstrap admin token already created by another replica")

    def _on_assignment_change(self, changes: list[AssignmentChange]) -> None:
        for c in changes:
            self.assignment_cache.put(c.device_id, c.assignment_id, c.body, c.model)
            if not c.bundles_changed:
                # a new rollout id over the same bundles (a control device when a rollout
                # starts): waking every device of the group at once for it would cost a
                # fleet-wide burst of check-ins; the next poll brings it
                continue
            try:
                self.notifier.notify(c.device_id, c.assignment_id)
                self.metrics.notifications.inc()
            except Exception:  # notification is best effort; devices also poll
                log.exception("could not notify %s", c.device_id)


def _load_reporting_devices(session: Session, device_ids: list[str]) -> list[object]:
    """The rows a batch of device reports updates, in one query per table."""
    ids = sorted(set(device_ids))
    held: list[object] = list(session.scalars(select(Device).where(Device.id.in_(ids))))
    held += session.scalars(select(DeviceModel).where(DeviceModel.device_id.in_(ids)))
    return held
