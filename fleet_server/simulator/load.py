"""A light load simulator: thousands of protocol-speaking devices in one asyncio process.

Where :mod:`fleet_server.simulator.fleet` runs real agents (a thread pool, an ONNX
runtime and a state directory each; a few hundred per machine at most), a
:class:`LightDevice` keeps only what the wire needs, so one process holds thousands:

* **enrollment** through the real ``POST /device/v1/enroll`` with a single-use token
  the admin API issued (:meth:`LoadFleet.enroll`);
* **check-ins** ``GET /device/v1/assignment`` every ``poll_seconds`` (jittered) with
  ``If-None-Match``; a 200 that names a new desired bundle starts an install;
* **bundle downloads** ``GET /device/v1/bundles/{id}`` in ``Range`` requests of
  ``range_bytes`` (each must answer 206), checked against the assignment's sha256
  and size, then an install report over HTTP (``POST /device/v1/reports``) and an
  ``install`` event over MQTT, as the agent sends both;
* **telemetry** one MQTT connection per device (gmqtt, pure asyncio, MQTT 5):
  a retained ``status`` with a last will, the ``notify`` subscription (a notify
  triggers a check-in at once, like the agent), and every ``window_seconds`` one
  QoS 1 ``summary`` record of the running model with a per-device ``seq`` that
  strictly increases across kinds (:mod:`device_agent.protocol`).

Nothing is predicted: the summary's counts, errors and latency histogram are drawn
from ``inferences_per_window`` and ``error_rate`` so that the rollout gates see the
same kind of figures real agents send. Every request's latency is recorded in
:class:`LoadStats` by kind (first check-in of a device, 200, 304).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.util
import json
import logging
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from device_agent.protocol import (
    ASSIGNMENT_PATH,
    ENROLL_PATH,
    LATENCY_BUCKETS_MS,
    REPORTS_PATH,
    notify_topic,
    status_topic,
    telemetry_topic,
)

if importlib.util.find_spec("sniffio") is None:
    # httpcore asks ``import sniffio`` again for every lock it makes (several per
    # request); without the package each ask is a failed search of sys.path. A None
    # entry makes the import fail at once, which httpcore reads as "asyncio".
    sys.modules.setdefault("sniffio", None)  # type: ignore[arg-type]


class LoadSimError(RuntimeError):
    """The simulated fleet could not be set up (enrollment or broker connection failed)."""


@dataclass(frozen=True)
class LoadConfig:
    """How the simulated devices behave; the defaults are the production intervals."""

    server_url: str
    mqtt_host: str
    mqtt_port: int
    poll_seconds: float = 60.0
    window_seconds: float = 60.0
    inferences_per_window: int = 60
    error_rate: float = 0.001
    range_bytes: int = 64 * 1024
    #: HTTP connections the whole fleet shares, split into pools of ``http_pool_size``
    http_connections: int = 64
    #: connections per httpx pool: httpcore's pool does work proportional to the square
    #: of its connection count on every request (its keep-alive bookkeeping counts all
    #: connections once per idle one), so one 256-connection pool spends tens of ms of
    #: CPU per request and caps the simulated fleet near 20 requests/s; pools of 16
    #: cost 256 times less each
    http_pool_size: int = 16
    http_timeout: float = 60.0
    #: MQTT connections opened at once while the fleet connects
    connect_concurrency: int = 64
    #: requests (token issue + enroll) in flight at once while the fleet enrolls
    enroll_concurrency: int = 16
    mqtt_keepalive: int = 120
    #: also subscribe to the device's notify topic and check in when notified
    notify: bool = True
    #: more server replicas behind the same fleet: the devices' connection pools take
    #: ``server_url`` and these in turn, and a device keeps its pool (a sticky balancer)
    replica_urls: tuple[str, ...] = ()


@dataclass
class LoadStats:
    """What the simulated fleet saw; latencies in seconds."""

    first_checkin: list[float] = field(default_factory=list)
    checkin_200: list[float] = field(default_factory=list)
    checkin_304: list[float] = field(default_factory=list)
    checkin_errors: int = 0
    downloads: int = 0
    download_bytes: int = 0
    download_errors: int = 0
    installs: int = 0
    published: int = 0
    publish_errors: int = 0
    notified: int = 0

    def checkins(self) -> int:
        return len(self.first_checkin) + len(self.checkin_200) + len(self.checkin_304)

    def reset_latencies(self) -> None:
        self.first_checkin.clear()
        self.checkin_200.clear()
        self.checkin_304.clear()


def percentile(values: list[float], q: float) -> float | None:
    """The ``q`` quantile (0..1) of ``values`` by nearest rank; None if empty."""
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


@dataclass
class LightDevice:
    """One simulated device: credentials, its assignment ETag, its running model, its seq."""

    device_id: str
    credential: str
    pool: int = 0  # which of the fleet's HTTP pools this device uses
    etag: str | None = None
    model: dict[str, Any] | None = None  # the desired ref it installed (name, version, ...)
    rollout_id: str | None = None
    seq: int = 0
    checked_in: bool = False
    mqtt: Any = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.credential}"}


def summary_body(
    model: dict[str, Any],
    rollout_id: str | None,
    start: float,
    end: float,
    count: int,
    errors: int,
    rng: random.Random,
) -> dict[str, Any]:
    """A summary record body that meets the wire contract (histogram totals count - errors)."""
    hist = [0] * (len(LATENCY_BUCKETS_MS) + 1)
    ok = count - errors
    fast = rng.randint(0, ok)
    hist[6] = fast  # <= 1 ms
    hist[7] = ok - fast  # <= 2 ms
    return {
        "window_start": start,
        "window_end": end,
        "name": model["name"],
        "version": model["version"],
        "slot": "a",
        "rollout_id": rollout_id,
        "count": count,
        "errors": errors,
        "latency_ms": {"p50": 0.9, "p95": 1.8, "p99": 1.9, "mean": 1.0},
        "latency_hist": hist,
        "dropped": {"samples": 0, "summaries": 0},
    }


class LoadFleet:
    """Many :class:`LightDevice` s on one event loop, sharing a few small HTTP pools.

    Use inside a running loop::

        fleet = LoadFleet(LoadConfig(url, "127.0.0.1", 1883))
        await fleet.enroll(admin_token, 1000, device_class="gw")
        await fleet.connect()
        fleet.start()
        ...
        await fleet.stop()
    """

    def __init__(
        self, config: LoadConfig, *, seed: int = 0, clock: Callable[[], float] = time.time
    ) -> None:
        self.config = config
        self.devices: list[LightDevice] = []
        self.stats = LoadStats()
        self.clock = clock
        self.rng = random.Random(seed)
        size = max(1, min(config.http_pool_size, config.http_connections))
        count = max(1, -(-config.http_connections // size))

        urls = (config.server_url, *config.replica_urls)

        def client(connections: int, url: str = config.server_url) -> httpx.AsyncClient:
            limits = httpx.Limits(
                max_connections=connections,
                max_keepalive_connections=connections,
                # below uvicorn's 5 s keep-alive timeout: a connection idle that long is
                # not reused, so a request never races the server closing it
                keepalive_expiry=3.0,
            )
            return httpx.AsyncClient(base_url=url, limits=limits, timeout=config.http_timeout)

        #: the operator's client (admin API calls of the caller), apart from the devices'
        self.http = client(8)
        #: the devices' pools; each device uses one (``LightDevice.pool``). Requests in
        #: flight per pool at most its size: httpcore also scans its whole queue of
        #: waiting requests on every change (quadratic with thousands queued), so
        #: devices queue on the pool's semaphore, in FIFO order, and each latency is
        #: timed once a connection is free
        count = max(count, len(urls))
        self._pools = [client(size, urls[i % len(urls)]) for i in range(count)]
        self._slots = [asyncio.Semaphore(size) for _ in range(count)]
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    # -- set-up -------------------------------------------------------------------
    async def enroll(
        self,
        admin_token: str,
        count: int,
        *,
        device_class: str,
        prefix: str = "sim",
        labels: dict[str, str] | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[LightDevice]:
        """Enroll ``count`` devices through the real API: the admin API issues one
        single-use token per device, the device exchanges it at ``/device/v1/enroll``."""
        admin = {"Authorization": f"Bearer {admin_token}"}
        sem = asyncio.Semaphore(self.config.enroll_concurrency)
        start = len(self.devices)
        made: list[LightDevice | None] = [None] * count
        done = 0

        async def one(i: int) -> None:
            nonlocal done
            pool = (start + i) % len(self._pools)
            http = self._pools[pool]
            async with sem, self._slots[pool]:
                r = await http.post(
                    "/api/v1/enrollment-tokens",
                    headers=admin,
                    json={"device_class": device_class, "labels": labels or {}},
                )
                if r.status_code != 201:
                    raise LoadSimError(f"enrollment token refused: {r.status_code} {r.text}")
                device_id = f"{prefix}-{start + i:06d}"
                e = await http.post(
                    ENROLL_PATH,
                    json={
                        "enrollment_token": r.json()["token"],
                        "device_id": device_id,
                        "device_class": device_class,
                        "labels": labels or {},
                    },
                )
                if e.status_code != 201:
                    raise LoadSimError(f"{device_id}: enrollment refused: {e.status_code} {e.text}")
                made[i] = LightDevice(device_id, e.json()["credential"], pool=pool)
                done += 1
                if progress is not None and (done % 500 == 0 or done == count):
                    progress(done, count)

        await asyncio.gather(*(one(i) for i in range(count)))
        new = [d for d in made if d is not None]
        self.devices += new
        return new

    async def connect(self, progress: Callable[[int, int], None] | None = None) -> None:
        """Open every device's MQTT connection (username = device id, password = its
        credential), publish its retained status, subscribe to its notify topic."""
        from gmqtt import Client, Message

        logging.getLogger("gmqtt").setLevel(logging.ERROR)
        sem = asyncio.Semaphore(self.config.connect_concurrency)
        done = 0
        todo = [d for d in self.devices if d.mqtt is None]

        async def one(d: LightDevice) -> None:
            nonlocal done
            will = Message(status_topic(d.device_id), b'{"state":"offline"}', qos=1, retain=True)
            client = Client(d.device_id, clean_session=True, will_message=will)
            client.set_auth_credentials(d.device_id, d.credential)
            client.set_config({"reconnect_retries": 10, "reconnect_delay": 2})

            def on_message(_c: Any, topic: str, _payload: bytes, _qos: int, _p: Any) -> int:
                self.stats.notified += 1
                d.wake.set()
                return 0

            client.on_message = on_message
            async with sem:
                try:
                    await client.connect(
                        self.config.mqtt_host,
                        self.config.mqtt_port,
                        keepalive=self.config.mqtt_keepalive,
                    )
                except Exception as e:  # noqa: BLE001 - wrapped with the device's name
                    raise LoadSimError(f"{d.device_id}: MQTT connect failed: {e!r}") from e
            if self.config.notify:
                client.subscribe(notify_topic(d.device_id), qos=1)
            client.publish(
                status_topic(d.device_id), json.dumps({"state": "online"}), qos=1, retain=True
            )
            d.mqtt = client
            done += 1
            if progress is not None and (done % 1000 == 0 or done == len(todo)):
                progress(done, len(todo))

        await asyncio.gather(*(one(d) for d in todo))

    # -- running ------------------------------------------------------------------
    def start(self) -> None:
        """Start every device's loop; the first check-ins spread over one poll interval."""
        self._stopping = False
        for d in self.devices:
            self._tasks.append(asyncio.ensure_future(self._run(d)))

    async def stop(self) -> None:
        """Stop the loops, disconnect MQTT (clean: no last will), close the HTTP pool."""
        self._stopping = True
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        sem = asyncio.Semaphore(self.config.connect_concurrency)

        async def bye(d: LightDevice) -> None:
            async with sem:
                with contextlib.suppress(Exception):  # the broker goes away next anyway
                    await asyncio.wait_for(d.mqtt.disconnect(), 5)
                d.mqtt = None

        await asyncio.gather(*(bye(d) for d in self.devices if d.mqtt is not None))
        for http in (self.http, *self._pools):
            await http.aclose()

    async def _run(self, d: LightDevice) -> None:
        cfg = self.config
        loop_now = time.monotonic
        next_poll = loop_now() + self.rng.uniform(0, cfg.poll_seconds)
        next_window = loop_now() + self.rng.uniform(0, cfg.window_seconds) + cfg.window_seconds
        window_start = self.clock()
        while not self._stopping:
            wait = min(next_poll, next_window) - loop_now()
            if wait > 0:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(d.wake.wait(), wait)
            now = loop_now()
            if d.wake.is_set():
                d.wake.clear()
                await self._checkin(d)
                next_poll = loop_now() + cfg.poll_seconds * self.rng.uniform(0.9, 1.1)
            if now >= next_poll:
                await self._checkin(d)
                next_poll += cfg.poll_seconds * self.rng.uniform(0.9, 1.1)
                next_poll = max(next_poll, loop_now())
            if now >= next_window:
                end = self.clock()
                self._publish_window(d, window_start, end)
                window_start = end
                next_window += cfg.window_seconds

    async def _checkin(self, d: LightDevice) -> None:
        headers = d.headers
        if d.etag:
            headers["If-None-Match"] = f'"{d.etag}"'
        try:
            async with self._slots[d.pool]:
                t0 = time.perf_counter()
                r = await self._pools[d.pool].get(ASSIGNMENT_PATH, headers=headers)
                took = time.perf_counter() - t0
        except httpx.HTTPError:
            self.stats.checkin_errors += 1
            return
        if r.status_code == 304:
            (self.stats.checkin_304 if d.checked_in else self.stats.first_checkin).append(took)
            d.checked_in = True
            return
        if r.status_code != 200:
            self.stats.checkin_errors += 1
            return
        (self.stats.checkin_200 if d.checked_in else self.stats.first_checkin).append(took)
        d.checked_in = True
        doc = r.json()
        desired = doc.get("desired")
        if desired is None or (
            d.model is not None and d.model.get("bundle_id") == desired["bundle_id"]
        ):
            d.etag, d.rollout_id = doc["assignment_id"], doc.get("rollout_id")
            return
        if await self._download(d, desired):
            # the ETag only once the assignment is carried out: a failed download is
            # tried again at the next check-in (a 200 again), as the agent does
            d.etag = doc["assignment_id"]
            d.model, d.rollout_id = desired, doc.get("rollout_id")
            await self._report_install(d, desired)

    async def _download(self, d: LightDevice, ref: dict[str, Any]) -> bool:
        """Fetch the bundle in Range requests; True if every part was a 206 and the bytes
        match the assignment's size and sha256."""
        size, step = int(ref["size"]), max(1, self.config.range_bytes)
        digest, got = hashlib.sha256(), 0
        try:
            while got < size:
                end = min(size, got + step) - 1
                async with self._slots[d.pool]:
                    r = await self._pools[d.pool].get(
                        ref["url"], headers={**d.headers, "Range": f"bytes={got}-{end}"}
                    )
                if r.status_code != 206 or len(r.content) != end - got + 1:
                    self.stats.download_errors += 1
                    return False
                digest.update(r.content)
                got += len(r.content)
        except httpx.HTTPError:
            self.stats.download_errors += 1
            return False
        self.stats.downloads += 1
        self.stats.download_bytes += got
        if digest.hexdigest() != ref["sha256"]:
            self.stats.download_errors += 1
            return False
        return True

    async def _report_install(self, d: LightDevice, ref: dict[str, Any]) -> None:
        report = {
            "type": "install",
            "outcome": "installed",
            "name": ref["name"],
            "version": ref["version"],
            "bundle_id": ref["bundle_id"],
            "rollout_id": d.rollout_id,
            "state": "committed",
            "ts": self.clock(),
        }
        try:
            async with self._slots[d.pool]:
                await self._pools[d.pool].post(
                    REPORTS_PATH, headers=d.headers, json={"reports": [report]}
                )
        except httpx.HTTPError:
            self.stats.checkin_errors += 1
        self._publish(d, "events", report)
        self.stats.installs += 1

    def _publish_window(self, d: LightDevice, start: float, end: float) -> None:
        if d.model is None:
            return
        n = self.config.inferences_per_window
        errors = sum(1 for _ in range(n) if self.rng.random() < self.config.error_rate)
        body = summary_body(d.model, d.rollout_id, start, end, n, errors, self.rng)
        self._publish(d, "summary", body)

    def _publish(self, d: LightDevice, kind: str, body: dict[str, Any]) -> None:
        if d.mqtt is None:
            return
        record = {"seq": d.next_seq(), "kind": kind, "ts": self.clock(), "body": body}
        payload = json.dumps({"device_id": d.device_id, "records": [record]})
        try:
            d.mqtt.publish(telemetry_topic(d.device_id, kind), payload, qos=1)
            self.stats.published += 1
        except Exception:  # noqa: BLE001 - counted; the bench reports it
            self.stats.publish_errors += 1
