"""Put the Uptane chain in front of an :class:`~device_agent.update.updater.Updater`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..config import AgentConfig, ConfigError
from ..update.fetch import HttpFetcher
from ..update.updater import Updater
from .client import Roots, UptaneClient
from .fetcher import UptaneFetcher


def attach(
    config: AgentConfig,
    updater: Updater,
    http: HttpFetcher,
    clock: Callable[[], float],
    roots_files: tuple[Path, Path] | None = None,
) -> UptaneFetcher:
    """Make ``updater`` take its assignments from verified Uptane metadata (``[uptane]``;
    ``roots_files`` overrides the configured roots, after a migration)."""
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

    def active_name() -> str | None:
        ptr = updater.slots.active()
        return ptr.name if ptr is not None else None

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
    fetcher = UptaneFetcher(client, http, active_name=active_name, clock=clock, mirrors=mirrors)
    updater.fetcher = fetcher
    updater.version_floor = False
    return fetcher


def attach_or_migrate(
    config: AgentConfig,
    updater: Updater,
    http: HttpFetcher,
    clock: Callable[[], float],
) -> None:
    """``[uptane] enabled``: the chain from the provisioned roots. Else, after a past
    migration: the chain from the migrated roots. Else with ``[uptane] migrate``: look for a
    signed migration at each check."""
    from .migration import MigratingFetcher, migrated_roots

    state_dir = Path(config.device.state_dir)
    if config.uptane.enabled:
        attach(config, updater, http, clock)
        return
    found = migrated_roots(state_dir)
    if found is not None:
        attach(config, updater, http, clock, roots_files=found)
        return
    if config.uptane.migrate:

        def migrated(image: Path, director: Path) -> UptaneFetcher:
            return attach(config, updater, http, clock, roots_files=(image, director))

        updater.fetcher = MigratingFetcher(http, updater.trust, state_dir, migrated)
