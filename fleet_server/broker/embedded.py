"""An MQTT broker inside the Python process (amqtt), for machines without Mosquitto.

Same surface as :class:`fleet_server.broker.mosquitto.LocalMosquitto` (``add_user``,
``reload``, ``start``, ``stop``, ``port``) and the same rules: users and
passwords (PBKDF2 hashes held in memory), a device may publish only under its
own id and read only its own notify topic; the server user reads and writes
everything. amqtt speaks MQTT 3.1.1 only, so the server must run with
``mqtt_version = 4`` against it (no shared subscriptions: one replica ingests).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from device_agent.protocol import TOPIC_ROOT
from fleet_server.broker.mosquitto import (
    SERVER_USER,
    BrokerError,
    check_mosquitto_hash,
    free_port,
    mosquitto_hash,
)

log = logging.getLogger(__name__)

#: broker id -> {username: password hash}; the plugins look their broker up here
_USERS: dict[str, dict[str, str]] = {}

try:  # the plugin base classes exist only where amqtt is installed
    from amqtt.contexts import Action
    from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin

    class EdgefleetAuthPlugin(BaseAuthPlugin):
        """Username/password against the broker's user table; anonymous is refused."""

        @dataclass
        class Config:
            broker_id: str = ""

        async def authenticate(self, *, session: Any) -> bool | None:
            users = _USERS.get(self.config.broker_id, {})
            stored = users.get(session.username or "")
            return stored is not None and check_mosquitto_hash(stored, session.password or "")

    class EdgefleetTopicPlugin(BaseTopicPlugin):
        """Per-device topics, like the Mosquitto ACL in :mod:`fleet_server.broker.mosquitto`."""

        @dataclass
        class Config:
            broker_id: str = ""

        async def topic_filtering(
            self, *, session: Any = None, topic: str | None = None, action: Any = None
        ) -> bool:
            user = getattr(session, "username", None) or ""
            if user == SERVER_USER:
                return True
            if not user or not topic:
                return False
            own = f"{TOPIC_ROOT}/{user}/"
            if action == Action.PUBLISH:
                return topic.startswith(own + "telemetry/") or topic == own + "status"
            return topic in (own + "notify", own + "status")

    AVAILABLE = True
except ImportError:  # pragma: no cover - amqtt not installed
    AVAILABLE = False


class EmbeddedBroker:
    """amqtt in a background thread with its own event loop; stop it with :meth:`stop`."""

    def __init__(self, root: Path, *, port: int | None = None) -> None:
        self.root = Path(root)
        self.port = port or free_port()
        self.broker_id = secrets.token_hex(8)
        self.users: dict[str, str] = {}
        _USERS[self.broker_id] = self.users
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broker: Any = None

    @staticmethod
    def available() -> bool:
        return AVAILABLE

    def add_user(self, username: str, password: str) -> None:
        self.users[username] = mosquitto_hash(password)

    def remove_user(self, username: str) -> None:
        """Refuse ``username`` from now on and close its open sessions."""
        self.users.pop(username, None)
        loop, broker = self._loop, self._broker
        if loop is None or broker is None or not loop.is_running():
            return

        async def close_sessions() -> None:
            # amqtt has no public call for this: its session table is the only way in
            for _client_id, (session, handler) in list(getattr(broker, "_sessions", {}).items()):
                if getattr(session, "username", None) == username and handler is not None:
                    await handler.stop()

        try:
            asyncio.run_coroutine_threadsafe(close_sessions(), loop).result(10)
        except Exception:  # best effort: the user can no longer authenticate anyway
            log.warning("could not close the sessions of %s on the embedded broker", username)

    def reload(self) -> None:
        """Users take effect at once (the table is shared with the plugins)."""

    def start(self, timeout: float = 10.0) -> EmbeddedBroker:
        if not AVAILABLE:
            raise BrokerError(
                "neither mosquitto nor amqtt is installed; "
                "`apt-get install mosquitto` or `pip install amqtt`"
            )
        from amqtt.broker import Broker

        config = {
            "listeners": {
                "default": {"type": "tcp", "bind": f"127.0.0.1:{self.port}", "max_connections": 0}
            },
            "plugins": {
                f"{__name__}.EdgefleetAuthPlugin": {"broker_id": self.broker_id},
                f"{__name__}.EdgefleetTopicPlugin": {"broker_id": self.broker_id},
            },
        }
        ready = threading.Event()
        failed: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            # amqtt's own tasks can fail while clients drop at shutdown; keep that in the log
            loop.set_exception_handler(
                lambda _loop, ctx: log.debug("embedded broker: %s", ctx.get("message"))
            )
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                self._broker = Broker(config, loop=loop)
                loop.run_until_complete(self._broker.start())
            except BaseException as e:  # reported to the caller of start()
                failed.append(e)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name="embedded-mqtt", daemon=True)
        self._thread.start()
        if not ready.wait(timeout) or failed:
            raise BrokerError(f"the embedded broker did not start: {failed[0] if failed else ''}")
        return self

    def stop(self) -> None:
        loop, broker = self._loop, self._broker
        if loop is not None and broker is not None and loop.is_running():
            fut = asyncio.run_coroutine_threadsafe(broker.shutdown(), loop)
            try:
                fut.result(10)
            finally:
                loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(10)
        self._loop = self._broker = self._thread = None
        _USERS.pop(self.broker_id, None)
