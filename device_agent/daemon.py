"""The agent daemon: serve the active model, keep it updated, report over MQTT.

:class:`AgentDaemon` wires the library's parts together from one
:class:`~device_agent.config.AgentConfig`:

* a :class:`~device_agent.store.TelemetryStore` at ``<state_dir>/telemetry.db``;
* an :class:`~device_agent.agent.Agent` serving ``predict()`` (pass your own
  to embed the daemon in an application: ``AgentDaemon(cfg, agent=agent)``);
* an :class:`~device_agent.update.Updater` over ``<state_dir>`` with an
  :class:`~device_agent.update.fetch.HttpFetcher` when ``[server] url`` is set;
* when ``[mqtt] host`` is set, an :class:`~device_agent.transport.mqtt.MqttTransport`
  and a :class:`~device_agent.reporter.Reporter` draining the store; a message
  on the device's notify topic triggers an immediate check-in;
* unless ``[serving] enabled = false``, a
  :class:`~device_agent.serving.ServingEndpoint`: the Open Inference Protocol on
  ``<state_dir>/serving.sock`` (and TCP on 127.0.0.1 when ``tcp_port`` is set), so
  apps on the device call the model through ``Agent.predict()``.

The loop checks in every ``server.poll_seconds``, at once when notified, and
about once a second while a new model is on probation. An error in one round
is logged and never stops serving.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .agent import Agent
from .bundle import TrustStore
from .config import AgentConfig, ConfigError
from .store import TelemetryStore
from .update.errors import UpdateBusyError
from .update.fetch import HttpFetcher, ModelFetcher
from .update.machine import State
from .update.updater import Updater

log = logging.getLogger(__name__)

PROBATION_TICK_SECONDS = 1.0


def load_trust(config: AgentConfig) -> TrustStore:
    """The device's trust store, or a :class:`ConfigError` that says how to fix it."""
    path = Path(config.device.trust_store)
    try:
        return TrustStore.load(path)
    except FileNotFoundError as e:
        raise ConfigError(
            f"trust store {path} does not exist; set [device] trust_store to the file the "
            "provisioning image installed"
        ) from e
    except (ValueError, OSError) as e:
        raise ConfigError(f"trust store {path} is unreadable: {e}") from e


def read_token(config: AgentConfig) -> str | None:
    tf = config.server.token_file
    if tf is None:
        return None
    try:
        return Path(tf).read_text().strip() or None
    except OSError as e:
        raise ConfigError(f"cannot read server.token_file {tf}: {e}") from e


def server_ssl_context(config: AgentConfig) -> ssl.SSLContext | None:
    """TLS to an ``https://`` server: verified against the fleet CA, with the device's
    client certificate once enrolled (its identity on the device API)."""
    s = config.server
    if not s.url.startswith("https://"):
        return None
    from .identity import IdentityError, client_ssl_context

    try:
        return client_ssl_context(s.ca_file, s.cert_file, s.key_file if s.cert_file else None)
    except IdentityError as e:
        raise ConfigError(str(e)) from e


def model_dir(state_dir: str | Path, name: str) -> Path:
    """Where one model of a device running several keeps its slots and update state."""
    return Path(state_dir) / "models" / name


#: seconds between renewal attempts after one failed
RENEW_RETRY_SECONDS = 60.0


class AgentDaemon:
    """Everything ``edgefleet-agent run`` runs; :meth:`run` blocks until :meth:`stop`."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        agent: Agent | None = None,
        crash_at: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``clock`` is the device's wall clock (window boundaries, bundle expiry,
        probation, report times); a simulator passes a controllable one."""
        self.config = config
        state_dir = Path(config.device.state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        self.trust = load_trust(config)
        self.store = TelemetryStore(
            state_dir / "telemetry.db", max_bytes=config.telemetry.max_db_bytes, resilient=True
        )
        self.fetcher = (
            HttpFetcher(
                config.server.url,
                token=None if config.server.cert_file else read_token(config),
                timeout=config.server.timeout_seconds,
                chunk_bytes=config.update.download_chunk_bytes,
                ssl_context=server_ssl_context(config),
            )
            if config.server.url
            else None
        )
        self._clock = clock
        self._renew_after = 0.0  # monotonic time of the next renewal attempt
        names: list[str | None] = list(config.device.models)
        if agent is not None and names:
            raise ConfigError(
                "an embedded Agent serves one model; [device] models names several: run the "
                "daemon without agent= and call its agents (daemon.agents[name])"
            )
        #: model name -> the agent serving it; None: the one model of a device that
        #: declares none (whichever its first assignment names)
        self.agents: dict[str | None, Agent] = {}
        #: model name -> its updater (own slots, update state and lock)
        self.updaters: dict[str | None, Updater] = {}
        for name in names or [None]:
            a = agent if agent is not None else Agent(config, self.store, wall=clock)
            fetcher: Any = self.fetcher
            if name is not None and self.fetcher is not None:
                fetcher = ModelFetcher(self.fetcher, name)
            self.agents[name] = a
            self.updaters[name] = Updater(
                state_dir if name is None else model_dir(state_dir, name),
                self.trust,
                a,
                config=config.update,
                fetcher=fetcher,
                events=self.store,
                error_rate_since=a.counts_since,
                crash_at=crash_at,
                clock=clock,
                on_telemetry_policy=a.apply_telemetry_policy,
                device_class=config.device.device_class,
                model_name=name,
            )
        #: the first model's agent and updater (the only ones on a one-model device)
        self.agent = next(iter(self.agents.values()))
        self.updater = next(iter(self.updaters.values()))
        if self.fetcher is not None:
            from .uptane.wiring import attach_or_migrate

            attach_or_migrate(
                config,
                self.updater
                if not names
                else {n: u for n, u in self.updaters.items() if n is not None},
                self.fetcher,
                clock,
            )
        self.transport: Any = None
        self.reporter: Any = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.serving: Any = None  # the local inference endpoint, once started
        self.rounds = 0

    # -- control -------------------------------------------------------------------
    def wake(self) -> None:
        """Check in now (the server said the assignment changed)."""
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def start(self) -> AgentDaemon:
        """Run in a background thread (for applications that embed the daemon)."""
        t = threading.Thread(target=self.run, name="edgefleet-agent", daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def join(self, timeout: float | None = None) -> None:
        for t in self._threads:
            t.join(timeout)

    # -- the loop ------------------------------------------------------------------
    def _probation(self) -> bool:
        return any(u.state is State.PROBATION for u in self.updaters.values())

    def run(self) -> None:
        cfg = self.config
        for name, updater in self.updaters.items():
            try:
                updater.boot()
            except UpdateBusyError:
                raise
            except Exception:  # noqa: BLE001 - serve what boot loaded; the loop retries
                log.exception(
                    "update state recovery failed at start; serving continues",
                    extra={"model": name},
                )
        self._report_store_notes()
        self._start_serving()
        self._start_mqtt()
        log.info(
            "agent running",
            extra={
                "device_id": cfg.device.id,
                "server": cfg.server.url or None,
                "mqtt": f"{cfg.mqtt.host}:{cfg.mqtt.port}" if cfg.mqtt.host else None,
                "state": self.updater.state.value,
                "models": [n for n in self.updaters if n is not None] or None,
            },
        )
        next_check = 0.0
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                woke = self._wake.is_set()
                self._wake.clear()
                full = woke or now >= next_check  # also on probation: a rollback is seen
                # each model in turn: one model's failed round never holds another's back
                for name, updater in self.updaters.items():
                    try:
                        if full:
                            updater.check()
                        elif updater.state is State.PROBATION:
                            updater.tick()
                    except Exception:  # noqa: BLE001 - one bad round must not stop serving
                        log.exception(
                            "update round failed; serving continues", extra={"model": name}
                        )
                if full:
                    next_check = now + cfg.server.poll_seconds
                    self.rounds += 1
                self._after_round()
                timeout = max(0.0, next_check - time.monotonic())
                if self._probation():
                    timeout = min(timeout, PROBATION_TICK_SECONDS)
                self._wake.wait(timeout)
        finally:
            self._shutdown()

    def _report_store_notes(self) -> None:
        """Tell the server what happened to the telemetry store (reset, full disk)."""
        for note in self.store.take_notes():
            extra = {k: v for k, v in note.items() if k not in ("code", "message")}
            with contextlib.suppress(Exception):
                self.updater.report_health(note["code"], note["message"], telemetry=extra)

    def renew_certificate_if_due(self) -> bool:
        """Renew the client certificate when less than ``[server] renew_fraction`` of its
        validity remains; HTTP and MQTT present the new one from their next connection.
        True when renewed. A failure is logged and retried later; the current
        certificate is kept."""
        from .renew import RenewalError, due, renew

        if time.monotonic() < self._renew_after:
            return False
        try:
            if not due(self.config, self._clock()):
                return False
            renew(self.config)
        except RenewalError as e:
            log.warning("certificate renewal failed: %s", e)
            self._renew_after = time.monotonic() + RENEW_RETRY_SECONDS
            return False
        if self.fetcher is not None:
            self.fetcher.ssl_context = server_ssl_context(self.config)
        if self.transport is not None:
            with contextlib.suppress(Exception):
                self.transport.reload_client_certificate()
        log.info("client certificate renewed", extra={"device_id": self.config.device.id})
        return True

    def _after_round(self) -> None:
        self.renew_certificate_if_due()
        self._report_store_notes()
        if self.reporter is not None:
            self.reporter.notify()
        if self.transport is not None:
            model = self.agent.model
            status: dict[str, Any] = {
                "update_state": self.updater.state.value,
                "model": model.name if model else None,
                "version": model.version if model else None,
            }
            if len(self.agents) > 1:
                status["models"] = {
                    name: {
                        "version": a.model.version if a.model else None,
                        "update_state": self.updaters[name].state.value,
                    }
                    for name, a in self.agents.items()
                }
            if any(self.transport.status_extra.get(k) != v for k, v in status.items()):
                with contextlib.suppress(Exception):
                    self.transport.set_status(**status)

    def _start_serving(self) -> None:
        """The local inference endpoint ([serving]); a failure is logged, updates go on."""
        if not self.config.serving.enabled:
            return
        from .serving import ServingEndpoint, ServingStartError

        try:
            self.serving = ServingEndpoint(
                self.agents if len(self.agents) > 1 or None not in self.agents else self.agent,
                self.config.serving,
                self.config.device.state_dir,
            ).start()
        except ServingStartError as e:
            log.error("local inference endpoint not started: %s", e)

    def _start_mqtt(self) -> None:
        if not self.config.mqtt.host:
            return
        from .reporter import Reporter
        from .transport.mqtt import MqttTransport

        self.transport = MqttTransport.from_config(self.config).start()
        self.reporter = Reporter(
            self.store,
            self.transport,
            self.config.device.id,
            batch_size=self.config.mqtt.batch_size,
            inflight=self.config.mqtt.inflight,
        ).start()
        t = threading.Thread(target=self._forward_notifications, name="notify", daemon=True)
        t.start()
        self._threads.append(t)

    def _forward_notifications(self) -> None:
        q = self.transport.notifications
        while not self._stop.is_set():
            try:
                q.get(timeout=0.2)
            except queue.Empty:
                continue
            log.info("assignment changed (notify); checking in now")
            self.wake()

    def _shutdown(self) -> None:
        log.info("agent stopping")
        if self.reporter is not None:
            self.reporter.stop(drain_timeout=2.0)
        if self.transport is not None:
            self.transport.stop()
        if self.serving is not None:
            self.serving.stop()
        for agent in self.agents.values():
            agent.close()
        self.store.close()
        for updater in self.updaters.values():
            updater.unlock()
