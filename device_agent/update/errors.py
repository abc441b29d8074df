"""Errors of the update path. Bundle refusals keep their own :class:`BundleError` codes."""

from __future__ import annotations


class UpdateError(Exception):
    """Root of update-path errors (other than bundle refusals)."""

    code = "update_error"


class AssignmentError(UpdateError):
    """The assignment document is not what the device protocol describes."""

    code = "bad_assignment"


class ServerUnavailableError(UpdateError):
    """The server could not be reached or answered with an error status."""

    code = "server_unavailable"


class DownloadError(UpdateError):
    """The bundle download failed (network, server status); it may be resumed later."""

    code = "download_failed"


class DownloadTooLargeError(DownloadError):
    """The download exceeded the announced size or the configured cap (endless data)."""

    code = "oversized_download"


class DownloadDigestError(DownloadError):
    """The downloaded file's sha256 differs from the one in the assignment."""

    code = "download_hash_mismatch"


class RollbackUnavailableError(UpdateError):
    """There is no previous slot holding a verified bundle to roll back to."""

    code = "no_previous_slot"


class UpdateBusyError(UpdateError):
    """Another update is in progress; wait for it to finish."""

    code = "busy"
