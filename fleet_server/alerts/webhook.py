"""Webhook delivery: alerts POSTed as JSON, retried with backoff, off the request path.

The queue is the ``alert_events`` table: an alert with webhooks is stored ``pending``
with its first attempt due at once. A daemon thread takes due alerts, claims each by a
compare-and-set on its attempt count (so two replicas never send the same attempt), and
POSTs the body to every webhook not yet reached. A webhook answering 2xx is done; any
other answer, a timeout or a refused connection is retried after
``base_delay * 2**(attempts - 1)`` seconds (capped at ``max_delay``), until ``max_attempts``;
then the alert is marked ``failed`` and that is written to the audit log.

Delivery is at least once: a receiver whose 2xx got lost sees the alert again, with the
same ``id`` (also sent as the ``X-Edgefleet-Alert-Id`` header) to drop the repeat.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx
from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session, sessionmaker

from fleet_server import audit
from fleet_server.alerts.service import ALERT_ACTOR, AlertEvaluator
from fleet_server.db.alerts import AlertEvent
from fleet_server.metrics import ServerMetrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeliveryConfig:
    """Bounded retry settings; the defaults give up after 10 attempts over about 17 minutes."""

    timeout: float = 5.0
    max_attempts: int = 10
    base_delay: float = 2.0
    max_delay: float = 600.0
    poll: float = 1.0
    batch: int = 20

    def delay(self, attempts: int) -> float:
        """Seconds before the next attempt, after ``attempts`` failed ones."""
        return float(min(self.base_delay * 2 ** max(attempts - 1, 0), self.max_delay))


class WebhookDeliverer:
    """Sends pending alerts to their webhooks from a daemon thread."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        config: DeliveryConfig | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.sessions = sessions
        self.config = config or DeliveryConfig()
        self.clock = clock
        self.sent = 0
        self._http = httpx.Client(timeout=self.config.timeout, follow_redirects=False)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def deliver_due(self) -> int:
        """Attempt every alert whose next attempt is due; how many attempts were made."""
        now = self.clock()
        with self.sessions() as s:
            due = s.execute(
                select(AlertEvent.id, AlertEvent.attempts)
                .where(AlertEvent.delivery == "pending", AlertEvent.next_attempt_at <= now)
                .order_by(AlertEvent.id)
                .limit(self.config.batch)
            ).all()
        made = 0
        for event_id, attempts in due:
            if self._stop.is_set():
                break
            if self._attempt(event_id, attempts):
                made += 1
        return made

    def _attempt(self, event_id: int, attempts: int) -> bool:
        now = self.clock()
        n = attempts + 1
        with self.sessions() as s:  # claim this attempt (and push the next one back)
            result = s.execute(
                update(AlertEvent)
                .where(
                    AlertEvent.id == event_id,
                    AlertEvent.attempts == attempts,
                    AlertEvent.delivery == "pending",
                )
                .values(attempts=n, next_attempt_at=now + self.config.delay(n))
                .execution_options(synchronize_session=False)
            )
            claimed = getattr(result, "rowcount", 0)
            s.commit()
            if claimed != 1:
                return False
            event = s.get(AlertEvent, event_id)
            assert event is not None
            body = {"id": event.id, **event.payload}
            urls = list(event.webhooks or [])
        remaining, errors = [], []
        for url in urls:
            error = self._post(url, body)
            if error is not None:
                remaining.append(url)
                errors.append(f"{url}: {error}")
        with self.sessions() as s:
            event = s.get(AlertEvent, event_id)
            assert event is not None
            event.webhooks = remaining
            if not remaining:
                event.delivery = "delivered"
                event.delivered_at = self.clock()
                event.last_error = None
                self.sent += 1
            else:
                event.last_error = "; ".join(errors)[:2000]
                if n >= self.config.max_attempts:
                    event.delivery = "failed"
                    event.next_attempt_at = None
                    audit.record(
                        s,
                        actor=ALERT_ACTOR,
                        action="alert.delivery_failed",
                        target_type="alert_rule",
                        target_id=event.rule_id,
                        details={
                            "event_id": event.id,
                            "rule": event.rule_name,
                            "attempts": n,
                            "error": event.last_error,
                        },
                    )
                    log.error("alert %s: giving up after %d attempts: %s", event_id, n, errors)
                else:
                    log.warning("alert %s: attempt %d failed (%s); retrying", event_id, n, errors)
            s.commit()
        return True

    def _post(self, url: str, body: dict[str, object]) -> str | None:
        """None if ``url`` took the alert, else why not."""
        try:
            r = self._http.post(
                url,
                json=body,
                headers={
                    "User-Agent": "edgefleet-alerts/1",
                    "X-Edgefleet-Alert-Id": str(body["id"]),
                    "X-Edgefleet-Alert-Status": str(body.get("status")),
                },
            )
        except httpx.HTTPError as e:
            return f"{type(e).__name__}: {e}"
        if 200 <= r.status_code < 300:
            return None
        return f"HTTP {r.status_code}"

    # -- background thread ---------------------------------------------------------

    def start(self) -> WebhookDeliverer:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="alert-webhooks", daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.deliver_due()
            except Exception:  # a database outage must not kill the loop
                log.exception("webhook delivery round failed; retrying")
            self._stop.wait(self.config.poll)

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._http.close()


class AlertLoops:
    """The evaluator and the webhook deliverer of one server, started and stopped together."""

    def __init__(
        self,
        engine: Engine,
        sessions: sessionmaker[Session],
        metrics: ServerMetrics,
        *,
        interval: float = 30.0,
        public_url: str = "",
        delivery: DeliveryConfig | None = None,
    ) -> None:
        self.evaluator = AlertEvaluator(
            engine, sessions, metrics, interval=interval, public_url=public_url
        )
        self.deliverer = WebhookDeliverer(sessions, delivery)

    def start(self) -> AlertLoops:
        self.evaluator.start()
        self.deliverer.start()
        return self

    def stop(self) -> None:
        self.evaluator.stop()
        self.deliverer.stop()


__all__ = ["AlertLoops", "DeliveryConfig", "WebhookDeliverer"]
