"""Device identity from the fleet CA, end to end against a real server and Mosquitto.

An operator creates the fleet CA; the server then serves HTTPS and its broker takes
devices only over TLS, both asking for a client certificate from the fleet CA. A device
makes its key pair itself, enrolls with a CSR and the one-time token, and talks HTTP and
MQTT with its own certificate; the private key never leaves it. The tests play the
attacker: a bearer token, a copy of the server's database, another device's certificate,
a certificate from another CA, a revoked certificate. A revoked device is refused on
HTTP and MQTT at once; certificates are renewed before they expire.
"""

from __future__ import annotations

import json
import secrets
import shutil
import sqlite3
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest

from device_agent.identity import FileKeyProvider, save_certificate
from device_agent.protocol import telemetry_topic
from device_agent.transport import Backoff
from device_agent.transport.mqtt import MqttTransport, TlsOptions
from fleet_server.client import AdminClient
from fleet_server.demo.services import ServerProcess
from fleet_server.pki.ca import FleetCA
from tests.bundlesim import BundleSim
from tests.fleet_server.ingest.test_parse import summary_body


def wait_until(cond: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


@dataclass
class Setup:
    server: ServerProcess
    admin: AdminClient
    ca: FleetCA
    tmp: Path

    @property
    def ca_file(self) -> Path:
        return self.tmp / "ca" / "ca.crt"

    def http(self, cert: Path | None = None, key: Path | None = None) -> httpx.Client:
        """An HTTPS client that verifies the server by the fleet CA (and presents ``cert``)."""
        context = ssl.create_default_context(cafile=self.ca_file)
        if cert is not None:
            context.load_cert_chain(cert, key)
        return httpx.Client(base_url=self.server.url, verify=context, timeout=30)

    def enroll(self, device_id: str, csr: bytes | None) -> httpx.Response:
        token = self.admin.post("/enrollment-tokens", json={"device_class": "gw"})["token"]
        body: dict[str, Any] = {
            "enrollment_token": token,
            "device_class": "gw",
            "device_id": device_id,
        }
        if csr is not None:
            body["csr"] = csr.decode()
        with self.http() as c:
            return c.post("/device/v1/enroll", json=body)

    def health(self) -> dict[str, Any]:
        with self.http() as c:
            return dict(c.get("/healthz").json())


def start(tmp_path: Path, sim: BundleSim, **settings: str) -> Setup:
    trust = tmp_path / "trust.json"
    sim.trust("release").save(trust)
    ca = FleetCA.init(tmp_path / "ca")
    token = "id-admin-" + secrets.token_urlsafe(24)
    server = ServerProcess(
        tmp_path / "server",
        {
            "environment": "development",
            "database_url": f"sqlite:///{tmp_path / 'db.sqlite'}",
            "bundle_dir": str(tmp_path / "bundles"),
            "trust_store": str(trust),
            "admin_bootstrap_token": token,
            "broker": "mosquitto",
            "broker_dir": str(tmp_path / "broker"),
            "ca_dir": str(tmp_path / "ca"),
            **settings,
        },
    ).start()
    assert server.url.startswith("https://")
    return Setup(server, AdminClient(server.url, token, verify=str(ca.cert_path)), ca, tmp_path)


@pytest.fixture
def setup(tmp_path: Path, sim: BundleSim) -> Iterator[Setup]:
    s = start(tmp_path, sim)
    try:
        yield s
    finally:
        s.server.stop()


@dataclass
class Device:
    id: str
    key: FileKeyProvider
    cert: Path
    ca: Path
    endpoint: dict[str, Any]
    credential: str | None

    def http(self, setup: Setup) -> httpx.Client:
        return setup.http(self.cert, self.key.key_file())

    def transport(self, **kw: Any) -> MqttTransport:
        return MqttTransport(
            self.id,
            self.endpoint["host"],
            self.endpoint["port"],
            tls=TlsOptions(self.ca, self.cert, self.key.key_file()),
            mqtt_version=self.endpoint["mqtt_version"],
            backoff=Backoff(initial=0.2, maximum=1.0),
            **kw,
        )


def enroll_device(setup: Setup, device_id: str) -> Device:
    home = setup.tmp / "devices" / device_id
    key = FileKeyProvider(home / "device.key")
    r = setup.enroll(device_id, key.csr(device_id))
    assert r.status_code == 201, r.text
    answer = r.json()
    endpoint = answer["mqtt"]
    assert endpoint["tls"] is True and "BEGIN CERTIFICATE" in endpoint["ca_pem"]
    ca = home / "fleet-ca.crt"
    ca.write_text(endpoint["ca_pem"])
    cert = save_certificate(home / "device.crt", answer["certificate"])
    return Device(device_id, key, cert, ca, endpoint, answer["credential"])


def record(device_id: str, seq: int) -> bytes:
    rec = {"seq": seq, "kind": "summary", "ts": time.time(), "body": summary_body()}
    return json.dumps({"device_id": device_id, "records": [rec]}).encode()


def test_enrolled_device_talks_tls_with_its_own_certificate(setup: Setup) -> None:
    dev = enroll_device(setup, "gw-1")
    t = dev.transport().start()
    try:
        assert t.wait_connected(10), t.last_error
        for seq in range(1, 6):
            assert t.publish(telemetry_topic("gw-1", "summary"), record("gw-1", seq)).wait(10)
        assert wait_until(lambda: setup.health()["ingest"]["stored"] == 5, 15)
        assert wait_until(lambda: setup.health()["broker"]["connected_devices"] == 1, 10)
    finally:
        t.stop()
    # the private key never left the device: nothing the server keeps holds it
    key_pem = dev.key.path.read_bytes()
    for p in [*(setup.tmp / "server").rglob("*"), *(setup.tmp / "broker").rglob("*")]:
        if p.is_file():
            assert key_pem not in p.read_bytes(), p
    with open(setup.tmp / "db.sqlite", "rb") as f:
        assert b"PRIVATE KEY" not in f.read()


def test_enrollment_without_a_csr_is_refused_and_keeps_the_token_unused(setup: Setup) -> None:
    token = setup.admin.post("/enrollment-tokens", json={"device_class": "gw"})["token"]
    body = {"enrollment_token": token, "device_class": "gw", "device_id": "gw-2"}
    http = setup.http()
    r = http.post("/device/v1/enroll", json=body)
    assert r.status_code == 400 and "certificate signing request" in r.text
    bad = http.post("/device/v1/enroll", json={**body, "csr": "not a csr"})
    assert bad.status_code == 400
    key = FileKeyProvider(setup.tmp / "gw-2.key")
    ok = http.post("/device/v1/enroll", json={**body, "csr": key.csr("someone-else").decode()})
    assert ok.status_code == 201  # the same token still works
    assert ok.json()["credential"] is None  # no bearer token for a device with a certificate
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(ok.json()["certificate"].encode())
    assert cert.subject.rfc4514_string() == "CN=gw-2"  # the server names the device


def _plain_connect(port: int, user: str, password: str) -> Any:
    got: list[Any] = []
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=user, protocol=mqtt.MQTTv5)
    c.username_pw_set(user, password)
    c.on_connect = lambda _c, _u, _f, rc, _p: got.append(rc)
    try:
        c.connect("127.0.0.1", port)
    except OSError as e:
        return e
    c.loop_start()
    wait_until(lambda: bool(got), 5)
    c.loop_stop()
    c.disconnect()
    return got[0] if got else None


def test_no_reusable_secret_admits_a_device_to_mqtt(setup: Setup) -> None:
    dev = enroll_device(setup, "gw-3")
    assert dev.credential is None  # nothing reusable crossed the wire
    where = json.loads((setup.tmp / "broker" / "broker.json").read_text())
    rc = _plain_connect(where["port"], "gw-3", "efd_guessed")
    assert rc is not None and getattr(rc, "is_failure", True), rc
    other = FleetCA.init(setup.tmp / "other-ca")  # a certificate from another CA
    home = setup.tmp / "devices" / "forged"
    key = FileKeyProvider(home / "k")
    save_certificate(home / "c", other.sign_device_csr(key.csr("gw-3"), "gw-3"))
    forged = MqttTransport(
        "gw-3",
        dev.endpoint["host"],
        dev.endpoint["port"],
        tls=TlsOptions(dev.ca, home / "c", key.key_file()),
        mqtt_version=5,
        backoff=Backoff(initial=0.2, maximum=0.5),
    ).start()
    try:
        assert not forged.wait_connected(3)
    finally:
        forged.stop()


def test_device_api_knows_the_device_by_its_certificate_only(setup: Setup) -> None:
    dev = enroll_device(setup, "gw-5")
    with dev.http(setup) as http:
        r = http.get("/device/v1/assignment")
        assert r.status_code == 200, r.text
        assert r.json()["device_id"] == "gw-5"
        ok = http.post("/device/v1/reports", json={"reports": [{"type": "health"}]})
        assert ok.status_code == 200, ok.text
    plain = setup.server.url.replace("https://", "http://")
    with pytest.raises(httpx.HTTPError):  # no plain HTTP beside the TLS listener
        httpx.get(f"{plain}/device/v1/assignment", timeout=5)
    with setup.http() as anonymous:  # TLS without a client certificate
        assert anonymous.get("/device/v1/assignment").status_code == 401
        # a bearer token is no way in for a device with a certificate
        r = anonymous.get("/device/v1/assignment", headers={"Authorization": "Bearer efd_x"})
        assert r.status_code == 401


def test_a_copy_of_the_database_lets_no_one_act_as_a_device(setup: Setup) -> None:
    dev = enroll_device(setup, "gw-6")
    live = sqlite3.connect(setup.tmp / "db.sqlite")  # a consistent copy, WAL included
    db = sqlite3.connect(":memory:")
    live.backup(db)
    live.close()
    try:
        (cred_hash,) = db.execute("SELECT credential_hash FROM devices WHERE id='gw-6'").fetchone()
        (pem,) = db.execute("SELECT pem FROM device_certificates WHERE device_id='gw-6'").fetchone()
        dump = "\n".join(db.iterdump())
    finally:
        db.close()
    assert "PRIVATE KEY" not in dump  # certificates only: public
    assert pem.strip() == dev.cert.read_text().strip()
    with setup.http() as http:  # the stored hash as a bearer token
        r = http.get("/device/v1/assignment", headers={"Authorization": f"Bearer {cred_hash}"})
        assert r.status_code == 401
    # the certificate from the copy, with a key of the attacker's own: TLS will not take it
    home = setup.tmp / "attacker"
    cert = save_certificate(home / "gw-6.crt", pem)
    own = FileKeyProvider(home / "own.key")
    with pytest.raises(ssl.SSLError):
        ssl.create_default_context(cafile=setup.ca_file).load_cert_chain(cert, own.key_file())
    # and no way around it: a certificate for gw-6 from a CA the attacker made is refused
    # in the TLS handshake, on HTTP as on MQTT
    fake_ca = FleetCA.init(home / "fake-ca")
    save_certificate(home / "fake.crt", fake_ca.sign_device_csr(own.csr("gw-6"), "gw-6"))
    with (
        pytest.raises(httpx.HTTPError),
        setup.http(home / "fake.crt", own.key_file()) as http,
    ):
        http.get("/device/v1/assignment")


def test_another_devices_certificate_gets_its_own_device_only(setup: Setup) -> None:
    """gw-b holds a valid certificate of its own; it cannot reach gw-a's bundle and its
    requests are filed under gw-b, whatever they claim."""
    a, b = enroll_device(setup, "gw-a"), enroll_device(setup, "gw-b")
    setup.ca  # noqa: B018 - the same fleet CA signed both
    with a.http(setup) as http_a:
        assert http_a.get("/device/v1/assignment").json()["device_id"] == "gw-a"
    with b.http(setup) as http_b:
        r = http_b.get("/device/v1/assignment", headers={"X-Device-Id": "gw-a"})
        assert r.json()["device_id"] == "gw-b"
        r = http_b.post(
            "/device/v1/reports",
            json={"reports": [{"type": "health", "health": "failed", "device_id": "gw-a"}]},
        )
        assert r.status_code == 200
    devices = {d["id"]: d for d in setup.admin.get("/devices")["items"]}
    assert devices["gw-a"]["health"] != "failed" and devices["gw-b"]["health"] == "failed"


def test_revoked_device_is_refused_on_http_and_mqtt_at_once(setup: Setup) -> None:
    dev = enroll_device(setup, "gw-4")
    t = dev.transport().start()
    http = dev.http(setup)  # one keep-alive connection, opened before the revocation
    try:
        assert t.wait_connected(10)
        assert http.get("/device/v1/assignment").status_code == 200
        setup.admin.post("/devices/gw-4/revoke")
        # HTTP: the very next request on the open connection is refused
        r = http.get("/device/v1/assignment")
        assert r.status_code == 401, r.text
        assert "revoked" in r.text
        assert wait_until(lambda: not t.connected, 10), "the revoked session stayed open"
        time.sleep(2)  # the transport keeps retrying with its certificate
        assert not t.connected
        with dev.http(setup) as fresh_http:  # a new connection fares no better
            assert fresh_http.get("/device/v1/assignment").status_code == 401
            renew = fresh_http.post(
                "/device/v1/certificate", json={"csr": dev.key.csr("gw-4").decode()}
            )
            assert renew.status_code == 401  # nor does it get a new certificate
    finally:
        http.close()
        t.stop()
    fresh = dev.transport(client_id="gw-4-again").start()
    try:
        assert not fresh.wait_connected(3)
    finally:
        fresh.stop()


def test_agent_enrollment_keeps_its_key_and_learns_its_broker(setup: Setup) -> None:
    """`device_agent.enroll` makes the key pair, sends the CSR and stores the certificate,
    the fleet CA and the MQTT endpoint: the image needs no hand-typed broker address."""
    from device_agent.config import AgentConfig
    from device_agent.enroll import enroll

    state = setup.tmp / "agent-state"
    cfg = AgentConfig.from_dict(
        {
            "device": {"device_class": "gw", "state_dir": str(state)},
            "server": {"url": setup.server.url, "ca_file": str(setup.ca_file)},
        }
    )
    token = setup.admin.post("/enrollment-tokens", json={"device_class": "gw"})["token"]
    done = enroll(cfg, token, requested_id="gw-agent")
    identity = json.loads(done.identity_file.read_text())
    mqtt = identity["mqtt"]
    assert mqtt["tls"] is True and Path(mqtt["ca_file"]).is_file()
    assert (state / "device.key").stat().st_mode & 0o777 == 0o600
    t = MqttTransport(
        "gw-agent",
        mqtt["host"],
        mqtt["port"],
        tls=TlsOptions(Path(mqtt["ca_file"]), Path(identity["certificate"]), Path(identity["key"])),
        mqtt_version=mqtt["mqtt_version"],
    ).start()
    try:
        assert t.wait_connected(10), t.last_error
        assert t.publish(telemetry_topic("gw-agent", "summary"), record("gw-agent", 1)).wait(10)
        assert wait_until(lambda: setup.health()["ingest"]["stored"] == 1, 15)
    finally:
        t.stop()


def test_mqtt_transport_presents_a_reloaded_certificate_on_its_next_handshake(
    setup: Setup,
) -> None:
    dev = enroll_device(setup, "gw-r")
    good = dev.cert.read_bytes()
    other = FleetCA.init(setup.tmp / "other-ca")  # a certificate the broker refuses
    dev.cert.write_bytes(other.sign_device_csr(dev.key.csr("gw-r"), "gw-r"))
    t = MqttTransport(
        "gw-r",
        dev.endpoint["host"],
        dev.endpoint["port"],
        tls=TlsOptions(dev.ca, dev.cert, dev.key.key_file()),
        mqtt_version=5,
        backoff=Backoff(initial=0.2, maximum=0.5),
    ).start()
    try:
        assert not t.wait_connected(2)
        dev.cert.write_bytes(good)  # what a renewal does to the file
        t.reload_client_certificate()
        assert t.wait_connected(10), t.last_error
    finally:
        t.stop()


def test_agent_daemon_talks_https_and_mqtts_with_its_certificate_and_renews_it(
    tmp_path: Path, sim: BundleSim
) -> None:
    """The daemon after `enroll`: no broker address and no credential in its config; it
    checks in over HTTPS and reports over MQTT with TLS, both with its certificate, and
    renews a short-lived certificate once less than renew_fraction of it remains."""
    from device_agent.config import AgentConfig
    from device_agent.daemon import AgentDaemon
    from device_agent.enroll import enroll
    from fleet_server.images.build import agent_config_text
    from fleet_server.images.recipe import load_class

    setup = start(tmp_path, sim, device_cert_seconds="60")
    try:
        # the agent.toml a provisioning image built with --fleet-ca installs
        dc = load_class("x86_64-gateway")
        etc, state = tmp_path / "etc", tmp_path / "agent-state"
        etc.mkdir()
        shutil.copy(setup.ca_file, etc / "fleet-ca.crt")
        shutil.copy(tmp_path / "trust.json", etc / "trust.json")
        text = agent_config_text(dc, setup.server.url, None, 1883, fleet_ca=True)
        assert "[mqtt]" not in text  # no hand-typed broker address
        conf = tmp_path / "agent.toml"
        conf.write_text(text.replace("@CONFIG_DIR@", str(etc)).replace("@STATE_DIR@", str(state)))
        env = {
            "EDGEFLEET_AGENT_SERVER_POLL_SECONDS": "0.5",
            "EDGEFLEET_AGENT_SERVER_RENEW_FRACTION": "0.5",
            "EDGEFLEET_AGENT_SERVING_ENABLED": "false",
        }
        token = setup.admin.post("/enrollment-tokens", json={"device_class": dc.name})["token"]
        done = enroll(AgentConfig.load(conf, env), token, requested_id="gw-d")
        assert done.credential_file is None
        assert not (etc / "device-credential").exists()
        cfg = AgentConfig.load(conf, env)
        assert cfg.mqtt.host and cfg.mqtt.tls and cfg.mqtt.cert_file and cfg.server.cert_file
        cert_file = cfg.server.cert_file
        first = cert_file.read_bytes()
        offset = [0.0]
        daemon = AgentDaemon(cfg, clock=lambda: time.time() + offset[0]).start()
        try:
            assert wait_until(lambda: setup.health()["broker"]["connected_devices"] == 1, 20)
            assert wait_until(lambda: setup.admin.get("/devices/gw-d")["last_seen_at"], 20)
            time.sleep(1.5)  # a few rounds: a fresh certificate is not renewed
            assert cert_file.read_bytes() == first
            offset[0] = 40.0  # 26 of 66 s left: below half
            assert wait_until(lambda: cert_file.read_bytes() != first, 20)
            offset[0] = 0.0
            renewed = cert_file.read_bytes()
            assert wait_until(lambda: daemon.rounds >= 3, 10)
            with setup.http(cfg.server.cert_file, cfg.server.key_file) as http:
                assert http.get("/device/v1/assignment").json()["device_id"] == "gw-d"
            t = MqttTransport(
                "gw-d-renewed",
                cfg.mqtt.host,
                cfg.mqtt.port,
                tls=TlsOptions(cfg.mqtt.ca_file, cfg.server.cert_file, cfg.server.key_file),
                mqtt_version=5,
            ).start()
            try:
                assert t.wait_connected(10), t.last_error
            finally:
                t.stop()
            assert daemon.updater.state.value  # still running its rounds
        finally:
            daemon.stop()
            daemon.join(10)
        audit = setup.admin.get("/audit", params={"action": "device.certificate.renew"})
        assert audit["items"], audit
        assert renewed != first
    finally:
        setup.server.stop()
