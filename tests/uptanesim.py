"""An Uptane repository simulator for the attack tests: an image repository (release keys
offline, here in the test) and a director (online key), served over a real HTTP server
that can serve anything an attacker on the wire or holding the server would: replayed,
tampered, withheld or foreign metadata, and other bundles.

The metadata is built with the same code the server runs (:mod:`fleet_server.registry.tufrepo`).
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from tuf.api.metadata import Metadata, Targets

from device_agent.protocol import DEVICE_API_PREFIX, REPORTS_PATH
from device_agent.uptane.client import DIRECTOR_PATH, IMAGE_PATH
from fleet_server.registry.tufrepo import (
    DeviceInstruction,
    DirectorRepository,
    ImageRepository,
    director_root,
    make_root,
    new_targets,
    public_key,
    release_target,
    sign_all,
    signer_for,
)

BUNDLES = f"{DEVICE_API_PREFIX}/bundles/"


@dataclass
class Released:
    path: Path
    name: str
    version: int
    sha256: str
    length: int
    counter: int


@dataclass
class UptaneSim:
    """Keys, both repositories and the device-facing HTTP server."""

    root: Path
    release_threshold: int = 2
    keys: dict[str, Ed25519PrivateKey] = field(default_factory=dict)
    #: device credential -> (device id, device class)
    devices: dict[str, tuple[str, str]] = field(default_factory=dict)
    #: device id -> instructions the director signs for it
    instructions: dict[str, list[DeviceInstruction]] = field(default_factory=dict)
    bundles: dict[str, Path] = field(default_factory=dict)
    reports: list[dict[str, Any]] = field(default_factory=list)
    #: (repo, file name) -> bytes served instead (an attacker on the wire)
    override: dict[tuple[str, str], bytes] = field(default_factory=dict)
    #: (repo, file name) answered 503 (withheld: a freeze)
    withheld: set[tuple[str, str]] = field(default_factory=set)
    #: served metadata: (repo, device id, file name) -> bytes, for replays
    served: dict[tuple[str, str, str], bytes] = field(default_factory=dict)
    now: datetime | None = None  # the server's clock (None: real time)

    def key(self, name: str) -> Ed25519PrivateKey:
        if name not in self.keys:
            self.keys[name] = Ed25519PrivateKey.generate()
        return self.keys[name]

    def setup(self) -> UptaneSim:
        rel = [public_key(self.key(f"release{i}")) for i in (1, 2, 3)]
        root = make_root(
            root_keys=[public_key(self.key("image-root"))],
            targets_keys=rel,
            online_keys=[public_key(self.key("image-online"))],
            targets_threshold=self.release_threshold,
        )
        root.sign(signer_for(self.key("image-root")))
        targets = sign_all(
            new_targets(),
            [signer_for(self.key(f"release{i}")) for i in range(1, self.release_threshold + 1)],
        )
        self.image = ImageRepository(self.root / "image", signer_for(self.key("image-online")))
        self.image.init(root, targets)
        droot = director_root(
            root_keys=[public_key(self.key("director-root"))],
            online_keys=[public_key(self.key("director-online"))],
        )
        droot.sign(signer_for(self.key("director-root")))
        self.director = DirectorRepository(
            droot.to_bytes(), signer_for(self.key("director-online"))
        )
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "image-root.json").write_bytes(root.to_bytes())
        (self.root / "director-root.json").write_bytes(droot.to_bytes())
        return self

    @property
    def image_root_file(self) -> Path:
        return self.root / "image-root.json"

    @property
    def director_root_file(self) -> Path:
        return self.root / "director-root.json"

    # -- releasing (offline, release keys) and directing (online) ----------------------
    def release(
        self,
        bundle: Path,
        *,
        name: str,
        version: int,
        counter: int | None = None,
        classes: tuple[str, ...] = (),
        signers: tuple[str, ...] = ("release1", "release2"),
    ) -> Released:
        data = bundle.read_bytes()
        sha, n = hashlib.sha256(data).hexdigest(), len(data)
        md = self.image.targets()
        t = release_target(
            name=name,
            version=version,
            sha256=sha,
            length=n,
            release_counter=version if counter is None else counter,
            device_classes=classes,
        )
        md.signed.targets[t.path] = t
        md.signed.version += 1
        md.signatures.clear()
        sign_all(md, [signer_for(self.key(s)) for s in signers])
        self.image.put_targets(md.to_bytes())
        self.bundles[f"b-{sha[:16]}"] = bundle
        return Released(
            bundle,
            name,
            version,
            sha,
            n,
            t.unrecognized_fields["custom"]["edgefleet"]["release_counter"],
        )

    def serve_bundle(self, bundle: Path) -> tuple[str, int]:
        data = bundle.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        self.bundles[f"b-{sha[:16]}"] = bundle
        return sha, len(data)

    def direct(self, device_id: str, *refs: tuple[str, str, int, str]) -> None:
        """Instruct ``device_id``: (name, sha256, length, role) per model."""
        self.instructions[device_id] = [DeviceInstruction(r, n, s, ln) for n, s, ln, r in refs]

    def direct_release(self, device_id: str, rel: Released, role: str = "desired") -> None:
        self.direct(device_id, (rel.name, rel.sha256, rel.length, role))

    def targets_signed_by(self, signers: tuple[str, ...], **edit: Any) -> bytes:
        md: Metadata[Targets] = self.image.targets()
        md.signed.version += 1
        md.signatures.clear()
        return sign_all(md, [signer_for(self.key(s)) for s in signers]).to_bytes()

    def forge_image(self, targets: Metadata[Targets], online: str = "image-online") -> None:
        """Serve ``targets`` with a snapshot and timestamp signed by key ``online`` (the
        image repository's online key, as an attacker holding the server has it)."""
        from tuf.api.metadata import MetaFile, Snapshot, Timestamp

        now = self.now or datetime.now(timezone.utc)
        old_snap: Metadata[Snapshot] = Metadata.from_bytes(
            self.image.file("snapshot.json", now) or b""
        )
        old_ts: Metadata[Timestamp] = Metadata.from_bytes(
            self.image.file("timestamp.json", now) or b""
        )
        snap = Metadata(
            Snapshot(
                version=old_snap.signed.version + 1,
                expires=old_snap.signed.expires,
                meta={"targets.json": MetaFile(version=targets.signed.version)},
            )
        )
        snap.sign(signer_for(self.key(online)))
        ts = Metadata(
            Timestamp(
                version=old_ts.signed.version + 1,
                expires=old_ts.signed.expires,
                snapshot_meta=MetaFile(version=snap.signed.version),
            )
        )
        ts.sign(signer_for(self.key(online)))
        self.override[("image", "targets.json")] = targets.to_bytes()
        self.override[("image", "snapshot.json")] = snap.to_bytes()
        self.override[("image", "timestamp.json")] = ts.to_bytes()

    # -- the HTTP server ------------------------------------------------------------------
    def start(self) -> UptaneSim:
        sim = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

            def do_GET(self) -> None:  # noqa: N802
                sim._get(self)

            def do_POST(self) -> None:  # noqa: N802
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n)
                if self.path == REPORTS_PATH:
                    sim.reports.extend(json.loads(body)["reports"])
                sim._send(self, 204, b"")

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def _send(self, h: BaseHTTPRequestHandler, status: int, body: bytes) -> None:
        h.send_response(status)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if body:
            h.wfile.write(body)

    def _device(self, h: BaseHTTPRequestHandler) -> tuple[str, str] | None:
        token = (h.headers.get("Authorization") or "").removeprefix("Bearer ")
        return self.devices.get(token)

    def _get(self, h: BaseHTTPRequestHandler) -> None:
        dev = self._device(h)
        if dev is None:
            self._send(h, 401, b"")
            return
        path = h.path
        now = self.now or datetime.now(timezone.utc)
        for repo, prefix in (("image", IMAGE_PATH), ("director", DIRECTOR_PATH)):
            if not path.startswith(prefix):
                continue
            name = path[len(prefix) :]
            if (repo, name) in self.withheld:
                self._send(h, 503, b"")
                return
            data = self.override.get((repo, name))
            if data is None:
                if repo == "image":
                    data = self.image.file(name, now)
                else:
                    data = self.director.file(
                        name,
                        device_id=dev[0],
                        device_class=dev[1],
                        instructions=self.instructions.get(dev[0], []),
                        now=now,
                    )
            if data is None:
                self._send(h, 404, b"")
                return
            self.served[(repo, dev[0], name)] = data
            self._send(h, 200, data)
            return
        if path.startswith(BUNDLES):
            p = self.bundles.get(path[len(BUNDLES) :])
            self._send(h, 200, p.read_bytes()) if p else self._send(h, 404, b"")
            return
        self._send(h, 404, b"")
