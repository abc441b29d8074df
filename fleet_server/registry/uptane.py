"""The server's Uptane state: the image repository it stores and serves, the director it
runs, and the one-time set-up that creates both.

Layout of ``uptane_dir`` (server setting)::

    image/               image repository: N.root.json, root.json, targets.json (from the
                         operator, signed by release keys), snapshot.json, timestamp.json
    director/root.json   the director's root (signed offline by the director root key)
    keys/                the server's ONLINE keys only: image-online, director-online
    device-roots/        image-root.json, director-root.json to provision on device images

The offline keys (image root, director root, release keys) are written to the operator's
key directory by :func:`init_uptane`, never to ``uptane_dir``. On one machine (the demo)
both directories are local; in production the operator's directory stays offline.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from fleet_server.db.models import Assignment, Bundle, Device
from fleet_server.registry.tufrepo import (
    DeviceInstruction,
    DirectorRepository,
    ImageRepository,
    director_root,
    make_root,
    new_targets,
    public_key,
    sign_all,
    signer_for,
)

IMAGE_ONLINE = "image-online"
DIRECTOR_ONLINE = "director-online"


@dataclass
class UptaneRepos:
    image: ImageRepository
    director: DirectorRepository

    @classmethod
    def open(cls, uptane_dir: Path) -> UptaneRepos:
        """Open the repositories in ``uptane_dir`` with the server's online keys."""
        from converters.keys import KeyStore

        keys = KeyStore(uptane_dir / "keys")
        image = ImageRepository(uptane_dir / "image", signer_for(keys.private_key(IMAGE_ONLINE)))
        if not image.exists():
            raise FileNotFoundError(
                f"{uptane_dir}/image has no root.json; run `edgefleet release init` first"
            )
        director = DirectorRepository(
            (uptane_dir / "director" / "root.json").read_bytes(),
            signer_for(keys.private_key(DIRECTOR_ONLINE)),
        )
        return cls(image, director)


def instructions_for(session: Session, device_id: str) -> tuple[str, list[DeviceInstruction]]:
    """The device's class and what the director signs for it: its assignment's bundles."""
    device = session.get(Device, device_id)
    if device is None:
        return "", []
    out: list[DeviceInstruction] = []
    # one desired (and shadow) target per model the device runs
    for a in session.scalars(
        select(Assignment).where(Assignment.device_id == device_id).order_by(Assignment.model)
    ):
        for role, bid in (("desired", a.desired_bundle_id), ("shadow", a.shadow_bundle_id)):
            b = session.get(Bundle, bid) if bid else None
            if b is not None:
                out.append(DeviceInstruction(role, b.name, b.sha256, b.size))
    return device.device_class, out


@dataclass(frozen=True)
class InitResult:
    release_keys: list[str]
    threshold: int
    device_roots: Path


def init_uptane(
    *,
    operator_keys: Path,
    uptane_dir: Path,
    release_keys: int = 3,
    threshold: int = 2,
) -> InitResult:
    """Create both repositories: offline keys in ``operator_keys`` (image-root, director-root,
    release1..n), online keys in ``uptane_dir/keys``, signed roots and empty targets."""
    from converters.keys import KeyStore

    if not 1 <= threshold <= release_keys:
        raise ValueError(f"threshold {threshold} must be between 1 and {release_keys}")
    op, online = KeyStore(operator_keys), KeyStore(uptane_dir / "keys")
    names = [f"release{i}" for i in range(1, release_keys + 1)]
    for n in ["image-root", "director-root", *names]:
        op.generate(n)
    for n in (IMAGE_ONLINE, DIRECTOR_ONLINE):
        online.generate(n)
    root = make_root(
        root_keys=[public_key(op.private_key("image-root"))],
        targets_keys=[public_key(op.private_key(n)) for n in names],
        online_keys=[public_key(online.private_key(IMAGE_ONLINE))],
        targets_threshold=threshold,
    )
    root.sign(signer_for(op.private_key("image-root")))
    targets = sign_all(new_targets(), [signer_for(op.private_key(n)) for n in names[:threshold]])
    ImageRepository(uptane_dir / "image").init(root, targets)
    droot = director_root(
        root_keys=[public_key(op.private_key("director-root"))],
        online_keys=[public_key(online.private_key(DIRECTOR_ONLINE))],
    )
    droot.sign(signer_for(op.private_key("director-root")))
    (uptane_dir / "director").mkdir(parents=True, exist_ok=True)
    (uptane_dir / "director" / "root.json").write_bytes(droot.to_bytes())
    roots = uptane_dir / "device-roots"
    roots.mkdir(parents=True, exist_ok=True)
    (roots / "image-root.json").write_bytes(root.to_bytes())
    (roots / "director-root.json").write_bytes(droot.to_bytes())
    return InitResult(names, threshold, roots)
