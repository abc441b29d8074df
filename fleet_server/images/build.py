"""Build a self-contained provisioning image for a device class.

An image is a directory (and the same as a ``.tar.gz``) holding:

``wheels/``            the agent and every dependency, for the class's platform and Python
``agent.toml``         the agent configuration (class defaults + endpoints)
``trust.json``         the keys the device checks a bundle's own signature against
``fleet-ca.crt``       the fleet CA (``--fleet-ca``): the device verifies the server and the
                       broker by it and enrolls by certificate
``uptane/``            the initial root metadata of the image and director repositories
                       (``--uptane-roots``): the device then installs only what the director
                       instructs and the release keys released (docs/uptane.md)
``edgefleet-agent.service``  a systemd unit
``install.sh``         installs from ``wheels/`` with ``pip --no-index`` (no package index)
``firstboot.sh``       enrolls the device with its one-time token, then starts the agent
``image.json``         what the image is: class, version, platform, the oldest glibc and the
                       Python it supports, sha256 of every file

Wheels for another platform (aarch64 on an x86-64 build host) come from
``pip download --platform ... --only-binary=:all:``. Every downloaded wheel is checked
against the recipe's oldest glibc and its Python (:mod:`fleet_server.images.compat`); a class
whose wheels need more is refused with the reason, and ``install.sh`` refuses a device whose
Python or glibc is not what the image was built for.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from cryptography import x509

from device_agent import __version__ as AGENT_VERSION
from device_agent.bundle.trust import TrustStore
from fleet_server.images.compat import check_wheels
from fleet_server.images.recipe import DeviceClass

ROOT = Path(__file__).resolve().parents[2]
_WHEEL_LOCK = threading.Lock()
Progress = Callable[[str], None]


class ImageBuildError(RuntimeError):
    """The image could not be built; the message says which step failed and why."""


@dataclass(frozen=True)
class ImageInfo:
    device_class: str
    version: str
    directory: Path
    archive: Path
    wheels: tuple[str, ...]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _pip(args: list[str], step: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PIP_REQUIRE_VIRTUALENV"}
    out = subprocess.run(
        [sys.executable, "-m", "pip", *args], capture_output=True, text=True, env=env, timeout=1800
    )
    if out.returncode != 0:
        tail = "\n".join((out.stderr or out.stdout).strip().splitlines()[-8:])
        raise ImageBuildError(f"{step} failed:\n{tail}")


def agent_config_text(
    dc: DeviceClass,
    server_url: str,
    mqtt_host: str | None,
    mqtt_port: int,
    *,
    uptane: bool = False,
    fleet_ca: bool = False,
) -> str:
    """The device's agent.toml; @CONFIG_DIR@ and @STATE_DIR@ are filled in by install.sh.

    With ``fleet_ca`` the image ships the fleet CA: the agent verifies the server by it,
    enrolls with a certificate and takes the broker endpoint from its enrollment, so no
    ``[mqtt]`` address is written unless ``mqtt_host`` is given."""
    lines = [
        "# edgefleet agent configuration, written by `edgefleet image build`",
        f"# device class {dc.name}: {dc.description}",
        'log_level = "INFO"',
        "",
        "[device]",
        "# the device id comes from enrollment (state_dir/identity.json)",
        f'device_class = "{dc.name}"',
        'state_dir = "@STATE_DIR@"',
        'trust_store = "@CONFIG_DIR@/trust.json"',
        *(["models = [" + ", ".join(f'"{m}"' for m in dc.models) + "]"] if dc.models else []),
        "",
        "[server]",
        f'url = "{server_url}"',
        'token_file = "@CONFIG_DIR@/device-credential"',
    ]
    if fleet_ca:
        lines += [
            "# the fleet CA the server's and the broker's certificates chain to; the client",
            "# certificate, key and broker endpoint come from enrollment (identity.json)",
            'ca_file = "@CONFIG_DIR@/fleet-ca.crt"',
        ]
        if mqtt_host:
            lines += ["", "[mqtt]", f'host = "{mqtt_host}"', f"port = {mqtt_port}", "tls = true"]
            lines.append('ca_file = "@CONFIG_DIR@/fleet-ca.crt"')
    elif mqtt_host:
        lines += [
            "",
            "[mqtt]",
            f'host = "{mqtt_host}"',
            f"port = {mqtt_port}",
            'password_file = "@CONFIG_DIR@/device-credential"',
        ]
    if uptane:
        lines += [
            "",
            "[uptane]",
            "# install only what the director instructs and the release keys released",
            "enabled = true",
            'image_root = "@CONFIG_DIR@/uptane/image-root.json"',
            'director_root = "@CONFIG_DIR@/uptane/director-root.json"',
        ]
    for section in ("telemetry", "update"):
        values = dict(dc.agent_defaults.get(section, {}))
        if section == "update":
            values.setdefault("max_bundle_bytes", dc.max_bundle_mb * 1024 * 1024)
        if values:
            lines += ["", f"[{section}]"]
            lines += [f"{k} = {json.dumps(v)}" for k, v in sorted(values.items())]
    return "\n".join(lines) + "\n"


SYSTEMD_UNIT = """\
[Unit]
Description=edgefleet device agent
Documentation=https://example.invalid/edgefleet
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
ExecStartPre=@PREFIX@/firstboot.sh
ExecStart=@PREFIX@/venv/bin/edgefleet-agent --config @CONFIG_DIR@/agent.toml run
Restart=always
RestartSec=5
StateDirectory=edgefleet-agent
NoNewPrivileges=true
ProtectSystem=full

[Install]
WantedBy=multi-user.target
"""

INSTALL_SH = """\
#!/bin/sh
# Install this edgefleet image without any package index.
#   sh install.sh [PREFIX] [CONFIG_DIR] [STATE_DIR]
set -eu
HERE="$(cd "$(dirname "$0")" && pwd)"
PREFIX="${1:-/opt/edgefleet}"
CONFIG_DIR="${2:-/etc/edgefleet}"
STATE_DIR="${3:-/var/lib/edgefleet-agent}"
PYTHON="${PYTHON:-python3}"
EXTRA="@EXTRA@"
# the image's wheels need this Python and at least this glibc (image.json "requires")
"$PYTHON" - "@PYTHON@" "@GLIBC@" <<'CHECK'
import os
import sys

python, glibc = sys.argv[1], sys.argv[2]
have = "%d.%d" % sys.version_info[:2]
if have != python:
    sys.exit(f"this image is for Python {python}; {sys.executable} is Python {have}")
try:
    libc = os.confstr("CS_GNU_LIBC_VERSION") or ""
except (ValueError, OSError):
    libc = ""
name, _, version = libc.partition(" ")
if name != "glibc":
    sys.exit(f"this image needs glibc {glibc} or newer; this system has no glibc ({libc!r})")
if tuple(map(int, version.split(".")[:2])) < tuple(map(int, glibc.split("."))):
    sys.exit(f"this image needs glibc {glibc} or newer; this system has glibc {version}")
CHECK
mkdir -p "$PREFIX" "$CONFIG_DIR" "$STATE_DIR"
"$PYTHON" -m venv "$PREFIX/venv"
PIP_CONFIG_FILE=/dev/null "$PREFIX/venv/bin/pip" install --no-index --find-links "$HERE/wheels" \\
    --disable-pip-version-check -q "edgefleet[$EXTRA]"
subst() {
  sed -e "s#@PREFIX@#$PREFIX#g" -e "s#@CONFIG_DIR@#$CONFIG_DIR#g" \\
      -e "s#@STATE_DIR@#$STATE_DIR#g" "$1"
}
subst "$HERE/agent.toml" > "$CONFIG_DIR/agent.toml"
cp "$HERE/trust.json" "$CONFIG_DIR/trust.json"
if [ -f "$HERE/fleet-ca.crt" ]; then
  cp "$HERE/fleet-ca.crt" "$CONFIG_DIR/fleet-ca.crt"
fi
if [ -d "$HERE/uptane" ]; then
  mkdir -p "$CONFIG_DIR/uptane"
  cp "$HERE/uptane/image-root.json" "$HERE/uptane/director-root.json" "$CONFIG_DIR/uptane/"
fi
subst "$HERE/firstboot.sh" > "$PREFIX/firstboot.sh" && chmod 0755 "$PREFIX/firstboot.sh"
cp "$HERE/image.json" "$PREFIX/image.json"
if [ -d /etc/systemd/system ] && [ "$(id -u)" = 0 ] && [ "${EDGEFLEET_NO_SYSTEMD:-}" = "" ]; then
  subst "$HERE/edgefleet-agent.service" > /etc/systemd/system/edgefleet-agent.service
fi
echo "installed edgefleet image @CLASS@ @VERSION@ into $PREFIX (config $CONFIG_DIR)"
echo "next: put the one-time enrollment token into $CONFIG_DIR/enrollment-token"
echo "      and run $PREFIX/firstboot.sh"
"""

FIRSTBOOT_SH = """\
#!/bin/sh
# First boot: enroll with the one-time token (once), then the agent can start.
set -eu
CONFIG="@CONFIG_DIR@/agent.toml"
# enrolled: identity.json holds the device id (and its certificate, with a fleet CA)
if [ ! -s "@STATE_DIR@/identity.json" ]; then
  if [ ! -s "@CONFIG_DIR@/enrollment-token" ]; then
    echo "no enrollment token in @CONFIG_DIR@/enrollment-token; ask the operator for one" >&2
    exit 1
  fi
  "@PREFIX@/venv/bin/edgefleet-agent" --config "$CONFIG" enroll \\
      --token-file "@CONFIG_DIR@/enrollment-token"
  rm -f "@CONFIG_DIR@/enrollment-token"
fi
"""


def build_image(
    dc: DeviceClass,
    *,
    out_dir: Path,
    trust_store: Path | None = None,
    server_url: str | None = None,
    mqtt_host: str | None = None,
    mqtt_port: int | None = None,
    image_version: str | None = None,
    uptane_roots: Path | None = None,
    fleet_ca: Path | None = None,
    project_root: Path = ROOT,
    progress: Progress | None = None,
) -> ImageInfo:
    """Build the image for ``dc`` into ``out_dir``; returns where it is.

    ``fleet_ca``: the fleet CA certificate (``ca.crt`` of `edgefleet ca init`) to ship;
    devices then enroll by certificate and learn the broker from their enrollment."""
    say = progress or (lambda _msg: None)
    if fleet_ca is not None:
        try:
            x509.load_pem_x509_certificate(Path(fleet_ca).read_bytes())
        except (OSError, ValueError) as e:
            raise ImageBuildError(
                f"fleet CA {fleet_ca} is not a PEM certificate ({e}); give the ca.crt that "
                "`edgefleet ca init` wrote"
            ) from e
    trust_path = trust_store or dc.trust_root
    if trust_path is None or not Path(trust_path).exists():
        raise ImageBuildError(
            f"no trust store for class {dc.name}: give --trust-store (create one with "
            "`edgefleet trust add KEY --store trust.json`)"
        )
    try:
        trust = TrustStore.load(trust_path)
    except (OSError, ValueError) as e:
        raise ImageBuildError(str(e)) from e
    if not trust.keys:
        raise ImageBuildError(
            f"trust store {trust_path} holds no keys; devices would trust nothing"
        )

    roots = _uptane_roots(uptane_roots) if uptane_roots is not None else None

    out_dir = Path(out_dir)
    stage = out_dir / f".{dc.name}.building"
    if stage.exists():
        shutil.rmtree(stage)
    wheels = stage / "wheels"
    wheels.mkdir(parents=True)

    say(f"building the edgefleet {AGENT_VERSION} wheel")
    # setuptools builds in the project's build/ directory: one build at a time
    lock_dir = project_root / "build"
    lock_dir.mkdir(exist_ok=True)
    with _WHEEL_LOCK, open(lock_dir / ".wheel.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _pip(
            [
                "wheel",
                "--no-deps",
                "--no-build-isolation",
                "-q",
                "-w",
                str(wheels),
                str(project_root),
            ],
            "building the edgefleet wheel",
        )
    (own,) = wheels.glob("edgefleet-*.whl")

    say(f"downloading {dc.extra} dependencies for {dc.architecture} / Python {dc.python}")
    plat: list[str] = []
    for p in dc.platforms:
        plat += ["--platform", p]
    _pip(
        [
            "download",
            "-q",
            "--only-binary=:all:",
            *plat,
            "--python-version",
            dc.python,
            "--implementation",
            "cp",
            "--abi",
            dc.abi,
            "-d",
            str(wheels),
            f"edgefleet[{dc.extra}] @ {own.resolve().as_uri()}",
        ],
        f"downloading wheels for {dc.name} (Python {dc.python}, {dc.architecture})",
    )
    problems, glibc_needs = check_wheels(
        (p.name for p in wheels.glob("*.whl")), glibc=dc.glibc, python=dc.python
    )
    if problems:
        shutil.rmtree(stage, ignore_errors=True)
        reasons = "\n".join(f"  - {p.reason}" for p in problems)
        raise ImageBuildError(
            f"class {dc.name} refused: its wheels need more than its recipe "
            f"({dc.source or dc.name}) declares:\n{reasons}\n"
            "raise [class] glibc / python in the recipe if every board of the class has them, "
            "or pin a release of the package built for the declared system"
        )

    say("writing configuration, trust root, systemd unit and scripts")
    (stage / "agent.toml").write_text(
        agent_config_text(
            dc,
            server_url or dc.server_url,
            # with a fleet CA the broker comes from enrollment, not the recipe's default
            mqtt_host if fleet_ca is not None else (mqtt_host or dc.mqtt_host),
            mqtt_port or dc.mqtt_port,
            uptane=roots is not None,
            fleet_ca=fleet_ca is not None,
        )
    )
    shutil.copy(trust_path, stage / "trust.json")
    if fleet_ca is not None:
        shutil.copy(fleet_ca, stage / "fleet-ca.crt")
    if roots is not None:
        (stage / "uptane").mkdir()
        for name, data in roots.items():
            (stage / "uptane" / f"{name}.json").write_bytes(data)
    (stage / "edgefleet-agent.service").write_text(SYSTEMD_UNIT)
    wheel_names = sorted(p.name for p in wheels.glob("*.whl"))
    digest = hashlib.sha256()
    for name in wheel_names:
        digest.update(_sha256(wheels / name).encode())
    digest.update((stage / "agent.toml").read_bytes() + (stage / "trust.json").read_bytes())
    if fleet_ca is not None:
        digest.update((stage / "fleet-ca.crt").read_bytes())
    for data in (roots or {}).values():
        digest.update(data)
    version = image_version or f"{AGENT_VERSION}-{digest.hexdigest()[:10]}"
    for name, text in (("install.sh", INSTALL_SH), ("firstboot.sh", FIRSTBOOT_SH)):
        body = (
            text.replace("@EXTRA@", dc.extra)
            .replace("@CLASS@", dc.name)
            .replace("@VERSION@", version)
            .replace("@PYTHON@", dc.python)
            .replace("@GLIBC@", dc.glibc)
        )
        (stage / name).write_text(body)
        (stage / name).chmod(0o755)

    files = sorted(p for p in stage.rglob("*") if p.is_file())
    meta = {
        "image_version": version,
        "device_class": dc.name,
        "architecture": dc.architecture,
        "python": dc.python,
        "requires": {
            "python": dc.python,
            "glibc": dc.glibc,
            "glibc_needed_by_wheels": max(
                glibc_needs.values(), key=lambda v: tuple(map(int, v.split("."))), default=None
            ),
        },
        "wheel_glibc": dict(sorted(glibc_needs.items())),
        "platforms": list(dc.platforms),
        "extra": dc.extra,
        "model": dc.model,
        "limits": {
            "memory_mb": dc.memory_mb,
            "storage_mb": dc.storage_mb,
            "max_bundle_mb": dc.max_bundle_mb,
        },
        "edgefleet_version": AGENT_VERSION,
        "trusted_keys": sorted(trust.keys),
        "uptane": None
        if roots is None
        else {name: _root_summary(data) for name, data in sorted(roots.items())},
        "built_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "files": {str(p.relative_to(stage)): _sha256(p) for p in files},
    }
    (stage / "image.json").write_text(json.dumps(meta, indent=2) + "\n")

    final = out_dir / dc.name / version
    if final.exists():
        shutil.rmtree(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(stage, final)
    archive = out_dir / f"edgefleet-image-{dc.name}-{version}.tar.gz"
    say(f"packing {archive.name}")
    tmp_archive = archive.with_suffix(".tmp")
    with tarfile.open(tmp_archive, "w:gz") as tar:
        tar.add(final, arcname=f"edgefleet-image-{dc.name}-{version}")
    os.replace(tmp_archive, archive)
    return ImageInfo(dc.name, version, final, archive, tuple(wheel_names))


def _uptane_roots(directory: Path) -> dict[str, bytes]:
    """The two initial roots from ``directory`` (``edgefleet release init``'s device-roots)."""
    from tuf.api.metadata import Metadata, Root

    out: dict[str, bytes] = {}
    for name in ("image-root", "director-root"):
        path = Path(directory) / f"{name}.json"
        try:
            data = path.read_bytes()
            md = Metadata.from_bytes(data)
        except OSError as e:
            raise ImageBuildError(
                f"no {name}.json in {directory} ({e.strerror}); give the device-roots "
                "directory that `edgefleet release init` wrote (SERVER/uptane/device-roots)"
            ) from e
        except Exception as e:  # tuf raises several types for a malformed document
            raise ImageBuildError(f"{path} is not TUF root metadata ({e})") from e
        if not isinstance(md.signed, Root):
            raise ImageBuildError(f"{path} holds {md.signed.type} metadata, not a root")
        out[name] = data
    return out


def _root_summary(data: bytes) -> dict[str, object]:
    """What image.json says of a shipped root: version, expiry and each role's key ids."""
    from tuf.api.metadata import Metadata

    root = Metadata.from_bytes(data).signed
    return {
        "version": root.version,
        "expires": root.expires.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "roles": {r: sorted(role.keyids) for r, role in sorted(root.roles.items())},
    }
