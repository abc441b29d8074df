"""Server settings: a TOML file plus ``EDGEFLEET_SERVER_*`` environment variables.

Settings are validated once, at start-up. Outside ``environment = "development"``
the server refuses to start with a default or missing secret (token pepper,
bootstrap admin token), so a demo configuration cannot reach production.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import tomllib
from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

#: the development defaults; any of these outside development is refused
DEV_TOKEN_PEPPER = "edgefleet-development-pepper"


class SettingsError(ValueError):
    """The server configuration is invalid; the message names the setting and the fix."""


class ServerSettings(BaseSettings):
    """Everything the server needs to start. Construct directly in tests."""

    model_config = SettingsConfigDict(env_prefix="EDGEFLEET_SERVER_", extra="forbid")

    environment: Literal["development", "production"] = "development"
    database_url: str = "sqlite:///./edgefleet.db"
    bundle_dir: Path = Path("./edgefleet-bundles")
    #: release signing keys the server may sign converted bundles with
    signing_key_dir: Path | None = None
    #: key id or name in ``signing_key_dir`` used for server-side signing
    signing_key: str | None = None
    #: the Uptane repositories made by `edgefleet release init` (image repository, director
    #: root, the server's online keys); None: no Uptane routes
    uptane_dir: Path | None = None
    #: the trust store uploaded bundles are verified against (JSON, device_agent format)
    trust_store: Path | None = None
    #: pepper mixed into every token hash (HMAC-SHA256 key)
    token_pepper: str = DEV_TOKEN_PEPPER
    #: a token that is accepted as an admin token; hashed into the database at start-up
    admin_bootstrap_token: str | None = None
    mqtt_host: str = ""
    mqtt_port: int = Field(default=1883, ge=1, le=65535)
    mqtt_username: str = ""
    mqtt_password: str = ""
    #: 5, or 4 (MQTT 3.1.1) for brokers without MQTT 5: then no shared subscription, so
    #: run ingestion in one replica only
    mqtt_version: int = Field(default=5, ge=4, le=5)
    #: start a broker beside the server: "mosquitto", "embedded" (MQTT 3.1.1), or "none";
    #: it then sets mqtt_host/port/credentials itself and admits devices as they enroll
    broker: str = Field(default="none", pattern="^(none|mosquitto|embedded)$")
    broker_dir: Path = Path("./edgefleet-broker")
    #: port of the broker beside the server; 0: the port it had last time (recorded in
    #: broker_dir/broker.json), first chosen free
    broker_port: int = Field(default=0, ge=0, le=65535)
    #: the fleet CA (`edgefleet ca init`): with it the broker beside the server takes
    #: devices only over TLS with client certificates, and enrollment signs each device's
    #: certificate request; without it devices use passwords over plain TCP (development)
    ca_dir: Path | None = None
    #: where `edgefleet server` keeps the HTTPS key and certificate it issues itself from
    #: the fleet CA (with ca_dir, the device and admin API are served over TLS only)
    tls_dir: Path = Path("./edgefleet-tls")
    #: host names and addresses devices use to reach this server (HTTPS certificate);
    #: the listen address, localhost and 127.0.0.1 are added
    tls_names: list[str] = Field(default_factory=list)
    #: lifetime of the device certificates enrollment and renewal issue (seconds)
    device_cert_seconds: int = Field(default=90 * 86400, ge=60)
    #: port of the broker's TLS listener for devices; 0: as last time, first chosen free
    broker_tls_port: int = Field(default=0, ge=0, le=65535)
    #: the MQTT host name enrollment hands to devices; empty: the host name the device
    #: used to reach this server
    mqtt_public_host: str = ""
    #: run the telemetry ingestion worker (MQTT 5 shared subscription) when a broker is set
    ingest: bool = True
    ingest_share_group: str = "edgefleet-ingest"
    #: MQTT client id of this replica's ingestion session; keep it stable across restarts
    #: so the broker hands the restarted replica what it queued meanwhile (empty: host
    #: name and process id; "edgefleet-ingest-beside" with a broker beside the server)
    ingest_client_id: str = ""
    #: serve the read-only telemetry review at /dashboard
    dashboard: bool = True
    #: seconds an in-memory assignment ETag is trusted before re-reading the database
    assignment_cache_seconds: float = Field(default=2.0, ge=0)
    #: how many device credentials the auth cache holds
    device_auth_cache_size: int = Field(default=100_000, ge=0)
    #: seconds between flushes of buffered ``last_seen`` times
    last_seen_flush_seconds: float = Field(default=5.0, gt=0)
    enrollment_token_ttl_seconds: int = Field(default=24 * 3600, gt=0)
    max_upload_bytes: int = Field(default=2 * 1024**3, gt=0)
    telemetry_sample_rate: float = Field(default=0.01, ge=0, le=1)
    telemetry_window_seconds: float = Field(default=60.0, gt=0)
    run_migrations: bool = True
    #: evaluate rollouts in this process (one replica at a time holds the leader lock)
    run_scheduler: bool = True
    rollout_interval_seconds: float = Field(default=10.0, gt=0)
    #: evaluate alert rules in this process (replicas agree through the alert state's
    #: revision, so each alert is recorded and delivered once)
    run_alerts: bool = True
    alert_interval_seconds: float = Field(default=30.0, gt=0)
    #: telemetry retention (docs/scale.md, "Telemetry retention"): raw window summaries,
    #: sampled inference logs and hourly roll-ups are kept this many days; older hours of
    #: summaries are read from the roll-ups
    telemetry_raw_days: int = Field(default=14, ge=1, le=3650)
    telemetry_samples_days: int = Field(default=7, ge=1, le=3650)
    telemetry_rollup_days: int = Field(default=400, ge=1, le=36500)
    #: run `edgefleet telemetry maintain`'s step (partitions, roll-ups, retention) in this
    #: process every so many seconds (replicas take turns on PostgreSQL); 0: never
    telemetry_maintenance_seconds: float = Field(default=600.0, ge=0)
    #: the URL operators reach this server at, for the sample-export links in alerts
    #: (empty: the links carry the path only)
    public_url: str = ""

    @model_validator(mode="after")
    def _refuse_embedded_broker_with_tls(self) -> ServerSettings:
        # the embedded broker (amqtt) has no TLS listener that checks client certificates:
        # devices told to use mqtts would never connect, and plain MQTT is what ca_dir refuses
        if self.broker == "embedded" and self.ca_dir is not None:
            raise ValueError(
                "broker = embedded cannot serve devices with client certificates (ca_dir): "
                "use broker = mosquitto (Debian's mosquitto package) with the fleet CA, or "
                "leave ca_dir unset for development"
            )
        return self

    @model_validator(mode="after")
    def _rollups_outlive_raw_summaries(self) -> ServerSettings:
        if self.telemetry_rollup_days < self.telemetry_raw_days:
            raise ValueError(
                f"telemetry_rollup_days ({self.telemetry_rollup_days}) is shorter than "
                f"telemetry_raw_days ({self.telemetry_raw_days}): roll-ups stand in for raw "
                "summaries once those are removed, so keep them at least as long"
            )
        return self

    @model_validator(mode="after")
    def _refuse_default_secrets(self) -> ServerSettings:
        if self.environment == "development":
            return self
        problems = []
        if self.token_pepper == DEV_TOKEN_PEPPER or len(self.token_pepper) < 16:
            problems.append(
                "token_pepper is the development default or shorter than 16 characters; "
                "set EDGEFLEET_SERVER_TOKEN_PEPPER to a long random string"
            )
        if self.admin_bootstrap_token is not None and len(self.admin_bootstrap_token) < 24:
            problems.append(
                "admin_bootstrap_token is shorter than 24 characters; generate one with "
                "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`"
            )
        if self.mqtt_host and not self.mqtt_password:
            problems.append("mqtt_host is set but mqtt_password is empty")
        if self.ca_dir is None:
            problems.append(
                "no fleet CA (ca_dir): devices would authenticate by bearer tokens and "
                "passwords over plain HTTP and MQTT; create one with `edgefleet ca init "
                "--dir DIR` and set EDGEFLEET_SERVER_CA_DIR=DIR"
            )
        if problems:
            raise ValueError("refusing to start in production: " + "; ".join(problems))
        return self

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


def load_settings(path: str | os.PathLike[str] | None = None, **overrides: Any) -> ServerSettings:
    """Read settings from a TOML file (optional), then the environment, then ``overrides``.

    The environment wins over the file; explicit overrides win over both.
    """
    data: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except FileNotFoundError as e:
            raise SettingsError(f"settings file {path} does not exist") from e
        except tomllib.TOMLDecodeError as e:
            raise SettingsError(f"settings file {path} is not valid TOML: {e}") from e
        data = dict(raw.get("server", raw))
    prefix = "EDGEFLEET_SERVER_"
    env_keys = {k[len(prefix) :].lower() for k in os.environ if k.startswith(prefix)}
    for key in env_keys:
        data.pop(key, None)  # let pydantic-settings read it from the environment
    data.update(overrides)
    try:
        return ServerSettings(**data)
    except ValueError as e:
        raise SettingsError(str(e)) from e
