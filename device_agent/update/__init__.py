"""Crash-safe verified updates: the state machine, A/B slots, the fetcher and the updater.

updater = Updater(state_dir, trust, agent, config=cfg.update,
                  fetcher=HttpFetcher(cfg.server.url), events=store,
                  error_rate_since=...)
updater.boot()                 # serve the active slot, resume after a crash
updater.check()                # check in, download, verify, stage, smoke, switch
updater.tick()                 # continue probation
updater.install_file(path)     # no server
updater.rollback()             # back to the previous verified slot
"""

from .errors import (
    AssignmentError,
    DownloadDigestError,
    DownloadError,
    DownloadTooLargeError,
    RollbackUnavailableError,
    ServerUnavailableError,
    UpdateBusyError,
    UpdateError,
)
from .fetch import Fetcher, HttpFetcher
from .floors import Floors
from .machine import TRANSITIONS, Action, Event, State, TransitionError, transition
from .slots import ActivePointer, Slots
from .state import Assignment, BundleRef, UpdateRecord
from .updater import ModelHost, Updater, read_status

__all__ = [
    "TRANSITIONS",
    "Action",
    "ActivePointer",
    "Assignment",
    "AssignmentError",
    "BundleRef",
    "DownloadDigestError",
    "DownloadError",
    "DownloadTooLargeError",
    "Event",
    "Fetcher",
    "Floors",
    "HttpFetcher",
    "ModelHost",
    "RollbackUnavailableError",
    "ServerUnavailableError",
    "Slots",
    "State",
    "TransitionError",
    "UpdateBusyError",
    "UpdateError",
    "UpdateRecord",
    "Updater",
    "read_status",
    "transition",
]
