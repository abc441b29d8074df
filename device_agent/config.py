"""Agent configuration: a TOML file plus environment overrides, validated once.

Precedence: defaults < file < environment. Environment variables are named
``EDGEFLEET_AGENT_<SECTION>_<KEY>`` (for example
``EDGEFLEET_AGENT_MQTT_PORT=1884``). Only the entry point reads the
environment; everything below takes an :class:`AgentConfig`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ENV_PREFIX = "EDGEFLEET_AGENT_"


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key and the fix."""


@dataclass
class DeviceConfig:
    id: str = "device-0"
    device_class: str = "generic"
    state_dir: Path = Path("/var/lib/edgefleet-agent")
    trust_store: Path = Path("/etc/edgefleet/trust.json")
    labels: dict[str, str] = field(default_factory=dict)
    #: the model names this device runs, each with its own A/B slots, update state,
    #: anti-rollback floor, assignment and telemetry (under ``<state_dir>/models/<name>``);
    #: empty: one model, whichever the first assignment names (``<state_dir>`` itself)
    models: list[str] = field(default_factory=list)


@dataclass
class ServerConfig:
    url: str = ""  # empty: no server; install bundles from files
    token_file: Path | None = None  # per-device credential issued at enrollment
    poll_seconds: float = 300.0
    timeout_seconds: float = 30.0
    #: the fleet CA the server's HTTPS certificate chains to (shipped in the image; after
    #: enrollment the one the server handed over); None: the system trust store
    ca_file: Path | None = None
    #: the device's client certificate and key (set by enrollment: identity.json)
    cert_file: Path | None = None
    key_file: Path | None = None
    #: renew the certificate when less than this fraction of its validity remains
    renew_fraction: float = 0.33


@dataclass
class MqttConfig:
    host: str = ""  # empty: telemetry stays in SQLite until a broker is configured
    port: int = 1883
    username: str = ""
    password_file: Path | None = None
    tls: bool = False
    ca_file: Path | None = None
    #: client certificate and key for TLS (set by enrollment: identity.json)
    cert_file: Path | None = None
    key_file: Path | None = None
    #: 4 (MQTT 3.1.1) or 5; enrollment sets what the server's broker speaks
    mqtt_version: int = 4
    keepalive: int = 60
    batch_size: int = 200
    inflight: int = 100


@dataclass
class TelemetryConfig:
    window_seconds: float = 60.0
    sample_rate: float = 0.01
    drop_fields: list[str] = field(default_factory=list)
    hash_fields: list[str] = field(default_factory=list)
    max_db_bytes: int = 64 * 1024 * 1024
    flush_interval_seconds: float = 1.0
    #: share of the kept inputs on which the model an update replaced runs too, so the
    #: new model's agreement with it is measured (0: off, and it is not kept loaded)
    compare_previous_rate: float = 0.1
    #: share of one core that comparison may take (of each flush interval)
    compare_previous_budget: float = 0.05


@dataclass
class UpdateConfig:
    max_bundle_bytes: int = 512 * 1024 * 1024
    probation_seconds: float = 300.0
    probation_max_error_rate: float = 0.05
    probation_min_predictions: int = 20
    download_chunk_bytes: int = 256 * 1024
    runtime_threads: int = 1
    #: starts in the same update state after which the update is failed (state_loop)
    max_restarts_per_state: int = 3


@dataclass
class ServingConfig:
    """The local inference endpoint of ``edgefleet-agent run`` (see device_agent.serving)."""

    enabled: bool = True
    socket: Path | None = None  # None: <state_dir>/serving.sock (mode 0660)
    socket_group: str = ""  # group allowed to connect (empty: the agent's own group)
    tcp_port: int = 0  # 0: no TCP; else 127.0.0.1:<port>, every request carries the token
    token_file: Path | None = None  # None: <state_dir>/serving.token, made 0600 at start
    max_request_bytes: int = 32 * 1024 * 1024
    max_json_bytes: int = 4 * 1024 * 1024
    max_connections: int = 64
    timeout_seconds: float = 30.0


@dataclass
class UptaneConfig:
    """The Uptane trust chain (device_agent.uptane): off by default; when enabled the
    device installs only what the director instructs and the image repository released."""

    enabled: bool = False
    image_root: Path | None = None  # initial root.json of the image repository
    director_root: Path | None = None  # initial root.json of the director repository
    stale_after_seconds: float = 86400.0  # report stale_metadata after this long
    #: without the chain: accept a migration to it signed under today's trust store
    migrate: bool = False
    #: base URLs that serve released bundles by their target path (``<name>/<sha256>.efb``),
    #: tried in order before the server; no credential is ever sent to them, and what they
    #: serve must match the signed hash and length
    mirrors: list[str] = field(default_factory=list)


@dataclass
class AgentConfig:
    device: DeviceConfig = field(default_factory=DeviceConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    update: UpdateConfig = field(default_factory=UpdateConfig)
    serving: ServingConfig = field(default_factory=ServingConfig)
    uptane: UptaneConfig = field(default_factory=UptaneConfig)
    log_level: str = "INFO"

    @classmethod
    def load(
        cls, path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
    ) -> AgentConfig:
        """Build a config from a TOML file (optional) and an environment mapping."""
        data: dict[str, Any] = {}
        if path is not None:
            p = Path(path)
            try:
                data = tomllib.loads(p.read_text())
            except FileNotFoundError as e:
                raise ConfigError(f"config file {p} does not exist") from e
            except tomllib.TOMLDecodeError as e:
                raise ConfigError(f"config file {p} is not valid TOML: {e}") from e
            except (OSError, UnicodeDecodeError) as e:
                raise ConfigError(f"config file {p} cannot be read: {e}") from e
        cfg = cls.from_dict(data)
        if env is not None:
            cfg.apply_env(env)
        explicit_id = "id" in data.get("device", {}) or (
            env is not None and f"{ENV_PREFIX}DEVICE_ID" in env
        )
        if not explicit_id:
            enrolled = read_identity(cfg.device.state_dir)
            if enrolled:
                cfg.device.id = enrolled
        cfg.apply_enrollment(read_enrollment(cfg.device.state_dir))
        cfg.validate()
        return cfg

    def apply_enrollment(self, record: Mapping[str, Any] | None) -> None:
        """Use what enrollment stored (identity.json) where the file and environment set
        nothing: the broker endpoint, the fleet CA, the client certificate and key. The
        image then needs no hand-typed broker address."""
        if not record:
            return
        cert, key = record.get("certificate"), record.get("key")
        ca = record.get("ca_file")
        if isinstance(cert, str) and isinstance(key, str) and self.server.cert_file is None:
            self.server.cert_file, self.server.key_file = Path(cert), Path(key)
        if isinstance(ca, str) and self.server.ca_file is None:
            self.server.ca_file = Path(ca)
        m = self.mqtt
        mqtt = record.get("mqtt")
        if isinstance(mqtt, Mapping) and not m.host:
            host, port = mqtt.get("host"), mqtt.get("port")
            if isinstance(host, str) and host and isinstance(port, int):
                m.host, m.port = host, port
                if mqtt.get("mqtt_version") in (4, 5):
                    m.mqtt_version = int(mqtt["mqtt_version"])
                m.tls = mqtt.get("tls") is True
                if isinstance(mqtt.get("ca_file"), str) and m.ca_file is None:
                    m.ca_file = Path(mqtt["ca_file"])
        if m.tls:  # a broker over TLS (enrolled or configured): the device's certificate
            if m.ca_file is None and isinstance(ca, str):
                m.ca_file = Path(ca)
            if isinstance(cert, str) and isinstance(key, str) and m.cert_file is None:
                m.cert_file, m.key_file = Path(cert), Path(key)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AgentConfig:
        cfg = cls()
        for key, value in data.items():
            if key == "log_level":
                if not isinstance(value, str):
                    raise ConfigError(f"log_level = {value!r}: expected a string")
                cfg.log_level = value
                continue
            section = getattr(cfg, key, None)
            if section is None or not dataclasses.is_dataclass(section):
                raise ConfigError(f"unknown config section [{key}]")
            if not isinstance(value, Mapping):
                raise ConfigError(f"[{key}] must be a table")
            for k, v in value.items():
                _set(section, key, k, v)
        return cfg

    def apply_env(self, env: Mapping[str, str]) -> None:
        for name, raw in env.items():
            if not name.startswith(ENV_PREFIX):
                continue
            rest = name[len(ENV_PREFIX) :].lower()
            if rest == "log_level":
                self.log_level = raw
                continue
            section_name, _, key = rest.partition("_")
            section = getattr(self, section_name, None)
            if section is None or not dataclasses.is_dataclass(section) or not key:
                raise ConfigError(f"environment variable {name} names no config key")
            _set(section, section_name, key, raw, from_env=True)

    def validate(self) -> None:
        """Range checks; :class:`ConfigError` names the key, the value and the range."""
        for (section, key), (lo, hi) in RANGES.items():
            value = getattr(getattr(self, section), key)
            if (lo is not None and value < lo) or (hi is not None and value > hi):
                bounds = f"at least {lo}" if hi is None else f"between {lo} and {hi}"
                raise ConfigError(f"{section}.{key} = {value!r}: expected a number {bounds}")
        if str(self.log_level).upper() not in LOG_LEVELS:
            raise ConfigError(f"log_level = {self.log_level!r}: expected one of {LOG_LEVELS}")
        t = self.telemetry
        if not 0.0 <= t.sample_rate <= 1.0:
            raise ConfigError("telemetry.sample_rate must be between 0 and 1")
        if t.window_seconds <= 0:
            raise ConfigError("telemetry.window_seconds must be positive")
        if t.max_db_bytes < 1024 * 1024:
            raise ConfigError("telemetry.max_db_bytes must be at least 1 MiB")
        if not 0.0 <= self.update.probation_max_error_rate <= 1.0:
            raise ConfigError("update.probation_max_error_rate must be between 0 and 1")
        for m in self.uptane.mirrors:
            if not m.startswith(("http://", "https://")):
                raise ConfigError(f"uptane.mirrors: {m!r:.100} must start with http:// or https://")
        sv = self.serving
        if not 0 <= sv.tcp_port <= 65535:
            raise ConfigError("serving.tcp_port must be between 0 (no TCP) and 65535")
        if not 1024 <= sv.max_json_bytes <= sv.max_request_bytes:
            raise ConfigError(
                "serving.max_json_bytes must be at least 1024 and at most serving.max_request_bytes"
            )
        if sv.max_connections < 1 or sv.timeout_seconds <= 0:
            raise ConfigError(
                "serving.max_connections must be at least 1 and serving.timeout_seconds positive"
            )
        if (
            not self.device.id
            or "/" in self.device.id
            or "+" in self.device.id
            or "#" in self.device.id
        ):
            raise ConfigError("device.id must be non-empty and contain no '/', '+' or '#'")
        from .bundle.manifest import MODEL_NAME

        models = self.device.models
        bad = [m for m in models if not MODEL_NAME.fullmatch(m)]
        if bad or len(set(models)) != len(models) or len(models) > MAX_MODELS:
            raise ConfigError(
                f"device.models = {models!r:.200}: expected at most {MAX_MODELS} distinct model "
                "names (letters, digits, '._-', starting with a letter or digit)"
            )


#: most models one device runs (each costs a check-in per poll and its own slots)
MAX_MODELS = 16

IDENTITY_FILE = "identity.json"


def read_identity(state_dir: Path) -> str | None:
    """The device id that enrollment stored in ``state_dir``, if any."""
    import json

    path = Path(state_dir) / IDENTITY_FILE
    try:
        return str(json.loads(path.read_text())["device_id"])
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise ConfigError(f"{path} is damaged ({e}); enroll the device again") from e


def read_enrollment(state_dir: Path) -> dict[str, Any] | None:
    """Everything enrollment stored in ``state_dir/identity.json``, if anything."""
    import json

    path = Path(state_dir) / IDENTITY_FILE
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (ValueError, OSError) as e:
        raise ConfigError(f"{path} is damaged ({e}); enroll the device again") from e
    return record if isinstance(record, dict) else None


def _set(section: Any, section_name: str, key: str, value: Any, from_env: bool = False) -> None:
    fields = {f.name: f for f in dataclasses.fields(section)}
    if key not in fields:
        raise ConfigError(f"unknown key {key!r} in [{section_name}]; known: {sorted(fields)}")
    current = getattr(section, key)
    typ = str(fields[key].type)
    try:
        if from_env:
            value = _from_text(value, current, typ)
        value = _typed(value, current, typ)
    except (TypeError, ValueError) as e:
        raise ConfigError(
            f"{section_name}.{key} = {value!r:.100}{' (from the environment)' if from_env else ''}"
            f": {e}"
        ) from e
    setattr(section, key, value)


def _typed(value: Any, current: Any, typ: str) -> Any:
    """``value`` checked against the field's declared type (as TOML gives it);
    :class:`TypeError` names the expected type."""
    optional = "None" in typ
    if value is None:
        if optional:
            return None
        raise TypeError(f"expected {_type_name(typ)}, not null")
    base = typ.replace("| None", "").replace("None |", "").strip()
    if base == "bool":
        if not isinstance(value, bool):
            raise TypeError(f"expected a boolean (true or false), not {type(value).__name__}")
        return value
    if base == "int":
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"expected an integer, not {type(value).__name__}")
        return value
    if base == "float":
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise TypeError(f"expected a number, not {type(value).__name__}")
        if not math.isfinite(value):
            raise ValueError("expected a finite number")
        return float(value)
    if base == "str":
        if not isinstance(value, str):
            raise TypeError(f"expected a string, not {type(value).__name__}")
        return value
    if base == "Path":
        if not isinstance(value, (str, Path)) or not str(value):
            raise TypeError(f"expected a file path (a non-empty string), not {value!r:.60}")
        if "\0" in str(value):
            raise ValueError("a path cannot contain NUL")
        return Path(value)
    if base.startswith("dict"):
        if not isinstance(value, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            raise TypeError("expected a table of strings to strings")
        return dict(value)
    if base.startswith("list"):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise TypeError("expected a list of strings")
        return list(value)
    if current is not None and not isinstance(value, type(current)):  # any other type
        raise TypeError(f"expected {type(current).__name__}, not {type(value).__name__}")
    return value


def _type_name(typ: str) -> str:
    return typ.replace("| None", "").strip()


#: (section, key) -> (lowest, highest) accepted value; None: unbounded on that side
RANGES: dict[tuple[str, str], tuple[float | None, float | None]] = {
    ("server", "poll_seconds"): (0.05, 7 * 86400),
    ("server", "timeout_seconds"): (0.1, 3600),
    ("server", "renew_fraction"): (0.01, 0.99),
    ("mqtt", "mqtt_version"): (4, 5),
    ("mqtt", "port"): (1, 65535),
    ("mqtt", "keepalive"): (1, 65535),
    ("mqtt", "batch_size"): (1, 100_000),
    ("mqtt", "inflight"): (1, 65535),
    ("telemetry", "window_seconds"): (0.001, 86400),
    ("telemetry", "sample_rate"): (0.0, 1.0),
    ("telemetry", "max_db_bytes"): (1024 * 1024, None),
    ("telemetry", "flush_interval_seconds"): (0.001, 3600),
    ("telemetry", "compare_previous_rate"): (0.0, 1.0),
    ("telemetry", "compare_previous_budget"): (0.0, 1.0),
    ("update", "max_bundle_bytes"): (1, None),
    ("update", "probation_seconds"): (0.0, 30 * 86400),
    ("update", "probation_max_error_rate"): (0.0, 1.0),
    ("update", "probation_min_predictions"): (0, None),
    ("update", "download_chunk_bytes"): (1024, 64 * 1024 * 1024),
    ("update", "runtime_threads"): (1, 1024),
    ("update", "max_restarts_per_state"): (1, 1000),
}

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _from_text(raw: str, current: Any, typ: str) -> Any:
    if isinstance(current, bool):
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError("expected true or false")
    if isinstance(current, int):
        return int(raw)
    if isinstance(current, float):
        return float(raw)
    if isinstance(current, list):
        return [s.strip() for s in raw.split(",") if s.strip()]
    if isinstance(current, dict):
        return dict(p.split("=", 1) for p in raw.split(",") if "=" in p)
    if "Path" in typ:
        return Path(raw) if raw else None
    return raw
