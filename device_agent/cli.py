"""The device CLI, ``edgefleet-agent``. It parses arguments and calls the library.

Configuration: ``--config FILE`` (or ``EDGEFLEET_AGENT_CONFIG``), then the
``EDGEFLEET_AGENT_<SECTION>_<KEY>`` environment (see :mod:`device_agent.config`).
Logs go to stderr as JSON lines; results go to stdout.

Exit codes: 0 done, 1 refused (the bundle or the rollback), 2 bad configuration
or input, 3 another agent process holds the state directory.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from datetime import datetime, timezone
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import click

from .bundle import BundleError, TrustStore, verify_file
from .config import AgentConfig, ConfigError

CONFIG_ENV = "EDGEFLEET_AGENT_CONFIG"
#: test hook: the update path SIGKILLs the process at this state (see device_agent.update)
CRASH_ENV = "EDGEFLEET_AGENT_CRASH_AT"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edgefleet")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar=CONFIG_ENV,
    help="Agent config file, TOML (env EDGEFLEET_AGENT_CONFIG). Environment "
    "variables EDGEFLEET_AGENT_<SECTION>_<KEY> override it.",
)
@click.pass_context
def main(ctx: click.Context, config_path: Path | None) -> None:
    """edgefleet-agent: run verified models on this device and report on them."""
    ctx.obj = {"config_path": config_path}


def _config(ctx: click.Context) -> AgentConfig:
    try:
        env = {k: v for k, v in os.environ.items() if k not in (CONFIG_ENV, CRASH_ENV)}
        return AgentConfig.load(ctx.obj["config_path"], env=env)
    except ConfigError as e:
        _die(f"config error: {e}", 2)


def _die(message: str, code: int) -> NoReturn:
    click.secho(message, fg="red", err=True)
    sys.exit(code)


def _logging(cfg: AgentConfig) -> None:
    from .logs import setup_logging

    try:
        setup_logging(cfg.log_level)
    except ValueError as e:
        _die(f"config error: {e}", 2)


def _model_dirs(cfg: AgentConfig) -> dict[str | None, Path]:
    """Each model's state directory: the device's own for a one-model device."""
    from .daemon import model_dir

    state_dir = Path(cfg.device.state_dir)
    if not cfg.device.models:
        return {None: state_dir}
    return {m: model_dir(state_dir, m) for m in cfg.device.models}


def _updater(cfg: AgentConfig, model: str | None = None) -> tuple[Any, Any]:
    """An updater on the (model's) state directory for one-shot commands, and its store."""
    from .daemon import load_trust
    from .store import TelemetryStore
    from .update import Updater

    try:
        trust = load_trust(cfg)
    except ConfigError as e:
        _die(f"config error: {e}", 2)
    dirs = _model_dirs(cfg)
    if model not in dirs:
        known = ", ".join(m for m in dirs if m) or "none: this device runs one model"
        _die(f"--model {model}: name one of the device's models ({known})", 2)
    state_dir = Path(cfg.device.state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    store = TelemetryStore(
        state_dir / "telemetry.db", max_bytes=cfg.telemetry.max_db_bytes, resilient=True
    )
    return Updater(
        dirs[model],
        trust,
        _NoHost(),
        config=cfg.update,
        events=store,
        crash_at=os.environ.get(CRASH_ENV) or None,
        model_name=model,
    ), store


_MODEL_OPTION = click.option(
    "--model",
    "model",
    default=None,
    metavar="NAME",
    help="On a device running several models ([device] models): the model to act on.",
)


class _NoHost:
    """One-shot commands serve nothing; the updater still loads and smoke-tests models."""

    def swap(self, model: Any) -> None:
        pass

    def set_shadow(self, model: Any) -> None:
        pass


@main.command("enroll")
@click.option(
    "--token-file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="File holding the one-time enrollment token from the operator.",
)
@click.option(
    "--token",
    envvar="EDGEFLEET_ENROLLMENT_TOKEN",
    help="The enrollment token itself (env EDGEFLEET_ENROLLMENT_TOKEN).",
)
@click.option("--device-id", help="Ask for this device id (default: the server picks one).")
@click.pass_context
def enroll_cmd(
    ctx: click.Context, token_file: Path | None, token: str | None, device_id: str | None
) -> None:
    """Enroll with the fleet server: trade a one-time token for this device's identity.

    The device makes its key pair (<state_dir>/device.key, never sent) and sends a
    certificate request; a server with a fleet CA answers with the device's certificate,
    the CA and the MQTT endpoint, all named in <state_dir>/identity.json, where the agent
    finds them from then on. A server without a CA (development) answers with a bearer
    credential, written (mode 0600) to [server] token_file.
    """
    from .enroll import EnrollmentError, enroll

    cfg = _config(ctx)
    if (token_file is None) == (token is None):
        _die("give the enrollment token with --token-file or --token (one of them)", 2)
    secret = token_file.read_text().strip() if token_file is not None else str(token)
    try:
        done = enroll(cfg, secret, requested_id=device_id)
    except EnrollmentError as e:
        _die(f"enrollment failed: {e}", 1)
    if done.credential_file is None:
        click.echo(
            f"enrolled as {done.device_id}; certificate and endpoints in {done.identity_file}"
        )
    else:
        click.echo(f"enrolled as {done.device_id}; credential in {done.credential_file}")


@main.command("verify")
@click.argument("bundle", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option(
    "--trust-store",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="EDGEFLEET_TRUST_STORE",
    help="Trust store file (env EDGEFLEET_TRUST_STORE).",
)
@click.option(
    "--installed-version",
    type=click.IntRange(min=0),
    help="Refuse bundles older than this version.",
)
def verify(bundle: Path, trust_store: Path, installed_version: int | None) -> None:
    """Verify BUNDLE against this device's trust store without installing it."""
    try:
        v = verify_file(
            bundle,
            TrustStore.load(trust_store),
            now=datetime.now(timezone.utc),
            installed_version=installed_version,
        )
    except BundleError as e:
        click.secho(f"refused: {type(e).__name__} [{e.code}]: {e}", fg="red", err=True)
        sys.exit(1)
    except (FileNotFoundError, ValueError) as e:
        click.secho(f"error: {e}", fg="red", err=True)
        sys.exit(2)
    m = v.manifest
    click.echo(f"verified: {m.name} v{m.version} ({m.format}), signed by {', '.join(v.signed_by)}")


@main.command("run")
@click.pass_context
def run(ctx: click.Context) -> None:
    """Run the agent: serve the active model, check in for updates, report telemetry.

    Checks in every [server] poll_seconds and at once when the server publishes on
    the device's MQTT notify topic. Stops cleanly on SIGTERM or Ctrl-C.
    """
    from .daemon import AgentDaemon
    from .update import UpdateBusyError

    cfg = _config(ctx)
    _logging(cfg)
    try:
        daemon = AgentDaemon(cfg, crash_at=os.environ.get(CRASH_ENV) or None)
    except ConfigError as e:
        _die(f"config error: {e}", 2)

    def _stop(signum: int, frame: FrameType | None) -> None:
        daemon.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        daemon.run()
    except UpdateBusyError as e:
        _die(f"busy: {e}", 3)


@main.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Show the active slot, installed versions, update state and telemetry backlog."""
    import sqlite3

    from .store import TelemetryStore, TelemetryStoreError
    from .update import read_status

    cfg = _config(ctx)
    state_dir = Path(cfg.device.state_dir)
    dirs = _model_dirs(cfg)
    info = read_status(dirs[None]) if None in dirs else {}
    models: dict[str | None, dict[str, Any]] = {
        m: read_status(d) for m, d in dirs.items() if m is not None
    }
    if models:
        info["models"] = models
    db = state_dir / "telemetry.db"
    backlog: dict[str, Any] | None = None
    if db.exists():
        try:  # status changes nothing: a damaged store is the running agent's to replace
            with TelemetryStore(db, max_bytes=cfg.telemetry.max_db_bytes) as store:
                stats = store.stats()
            backlog = {"rows": stats["rows"], "bytes": stats["bytes"], "dropped": stats["dropped"]}
        except (TelemetryStoreError, sqlite3.Error, OSError) as e:
            backlog = {"error": f"{e}"[:300]}
    info["telemetry_backlog"] = backlog
    info["device_id"] = cfg.device.id
    if as_json:
        click.echo(json.dumps(info, sort_keys=True))
        return
    click.echo(f"device:       {cfg.device.id}")
    for name, one in (models or {None: info}).items():
        if name is not None:
            click.echo(f"model {name}:")
        _echo_status(one)
    if backlog is not None and "error" in backlog:
        click.echo(f"telemetry:    unreadable ({backlog['error']}); the agent replaces it")
    elif backlog is not None:
        rows = ", ".join(f"{k} {v}" for k, v in backlog["rows"].items())
        click.echo(f"telemetry:    {rows} waiting ({backlog['bytes']} bytes)")


def _echo_status(info: dict[str, Any]) -> None:
    a = info["active"]
    click.echo(
        "active:       "
        + (f"slot {a['slot']}: {a['name']} v{a['version']}" if a else "none (install a bundle)")
    )
    for s, m in info["slots"].items():
        click.echo(f"slot {s}:       " + (f"{m['name']} v{m['version']}" if m else "empty"))
    if a and a.get("previous"):
        click.echo(f"previous:     slot {a['previous']} (edgefleet-agent rollback)")
    click.echo(f"update state: {info['state']}")
    if info["error"]:
        click.echo(f"last error:   [{info['error']['code']}] {info['error']['message']}")
    if info["shadow"]:
        sh = info["shadow"]
        click.echo(f"shadow:       slot {sh['slot']}: {sh['name']} v{sh['version']}")


@main.command("install")
@click.argument("bundle", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@_MODEL_OPTION
@click.pass_context
def install(ctx: click.Context, bundle: Path, model: str | None) -> None:
    """Install BUNDLE from a file, without a server: verify, stage, smoke-test, switch.

    A bundle that fails verification (tampered, unsigned, older than the installed
    version, expired) or its smoke test is refused; the active model is untouched.
    The outcome is recorded as a telemetry event.
    """
    from .update import UpdateBusyError

    cfg = _config(ctx)
    _logging(cfg)
    updater, store = _updater(cfg, model)
    try:
        updater.boot()  # finish or undo what an interrupted command left
        updater.install_file(bundle, probation=False)
    except UpdateBusyError as e:
        _die(f"busy: {e}", 3)
    finally:
        updater.unlock()
        store.close()
    report = updater.reports[-1] if updater.reports else {}
    if report.get("outcome") == "installed":
        click.echo(
            f"installed: {report['name']} v{report['version']} into slot "
            f"{updater.slots.active().slot}"
        )
        return
    _die(
        f"refused: [{report.get('error_code')}] {report.get('message')}; the active model "
        "is unchanged",
        1,
    )


@main.command("rollback")
@_MODEL_OPTION
@click.pass_context
def rollback(ctx: click.Context, model: str | None) -> None:
    """Switch back to the previous slot, if it still holds a verified bundle."""
    from .update import RollbackUnavailableError, UpdateBusyError

    cfg = _config(ctx)
    _logging(cfg)
    updater, store = _updater(cfg, model)
    try:
        updater.boot()
        updater.rollback()
    except RollbackUnavailableError as e:
        _die(f"refused: {e}", 1)
    except UpdateBusyError as e:
        _die(f"busy: {e}", 3)
    finally:
        updater.unlock()
        store.close()
    ptr = updater.slots.active()
    click.echo(f"rolled back: now serving {ptr.name} v{ptr.version} from slot {ptr.slot}")
