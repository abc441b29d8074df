"""Put the Uptane chain in front of an :class:`~device_agent.update.updater.Updater`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from ..config import AgentConfig, ConfigError
from ..update.fetch import HttpFetcher
from ..update.floors import Floors
from ..update.updater import Updater
from .client import Roots, UptaneClient
from .fetcher import UptaneFetcher


def attach(
    config: AgentConfig,
    updaters: Updater | Mapping[str, Updater],
    http: HttpFetcher,
    clock: Callable[[], float],
    roots_files: tuple[Path, Path] | None = None,
) -> UptaneFetcher:
    """Make each updater take its assignments from verified Uptane metadata (``[uptane]``;
    ``roots_files`` overrides the configured roots, after a migration). ``updaters``: the
    device's one updater, or one per model name on a device running several (one client
    and one set of release-counter floors, a fetcher per model). Returns the first
    fetcher."""
    u = config.uptane
    if roots_files is None:
        if u.image_root is None or u.director_root is None:
            raise ConfigError(
                "[uptane] enabled needs image_root and director_root: the initial root.json "
                "of each repository, provisioned in the device image"
            )
        roots_files = (Path(u.image_root), Path(u.director_root))
    try:
        roots = Roots.load(*roots_files)
    except OSError as e:
        raise ConfigError(f"cannot read the provisioned Uptane roots: {e}") from e
    client = UptaneClient(
        Path(config.device.state_dir),
        roots,
        http,
        device_id=config.device.id,
        device_class=config.device.device_class,
        stale_after_seconds=u.stale_after_seconds,
        clock=clock,
    )
    mirrors = [
        HttpFetcher(
            m,
            timeout=http.timeout,
            chunk_bytes=http.chunk_bytes,
            retries=http.retries,
            sleep=http.sleep,
        )
        for m in u.mirrors
    ]
    by_model: dict[str | None, Updater] = {}
    if isinstance(updaters, Updater):
        by_model[None] = updaters
    else:
        by_model.update(updaters)
    models = [m for m in by_model if m is not None]
    floors = Floors(Path(client.dir), repair=True)
    fetchers = []
    for model, updater in by_model.items():

        def active_name(updater: Updater = updater) -> str | None:
            ptr = updater.slots.active()
            return ptr.name if ptr is not None else None

        fetcher = UptaneFetcher(
            client,
            http,
            active_name=active_name,
            clock=clock,
            mirrors=mirrors,
            model=model,
            models=models,
            floors=floors,
        )
        updater.fetcher = fetcher
        updater.version_floor = False
        fetchers.append(fetcher)
    return fetchers[0]


def attach_or_migrate(
    config: AgentConfig,
    updaters: Updater | Mapping[str, Updater],
    http: HttpFetcher,
    clock: Callable[[], float],
) -> None:
    """``[uptane] enabled``: the chain from the provisioned roots. Else, after a past
    migration: the chain from the migrated roots. Else with ``[uptane] migrate``: look for a
    signed migration at each check (a device running one model)."""
    from .migration import MigratingFetcher, migrated_roots

    state_dir = Path(config.device.state_dir)
    if config.uptane.enabled:
        attach(config, updaters, http, clock)
        return
    found = migrated_roots(state_dir)
    if found is not None:
        attach(config, updaters, http, clock, roots_files=found)
        return
    if config.uptane.migrate:
        if not isinstance(updaters, Updater):
            raise ConfigError(
                "[uptane] migrate is for devices running one model; a device with "
                "[device] models gets the Uptane roots in its image ([uptane] enabled)"
            )
        updater = updaters

        def migrated(image: Path, director: Path) -> UptaneFetcher:
            return attach(config, updater, http, clock, roots_files=(image, director))

        updater.fetcher = MigratingFetcher(http, updater.trust, state_dir, migrated)
