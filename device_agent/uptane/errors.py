"""Refusals of the Uptane check, each with a stable code (reports, telemetry, CLI)."""

from __future__ import annotations

from ..update.errors import AssignmentError


class UptaneError(AssignmentError):
    """The signed instructions cannot be acted on; nothing changes on the device.

    ``about`` names the release an instruction asked for (``name``, ``version``,
    ``sha256``) when the refusal is of one instruction, so the device can report it as
    a refused install of that release: the rollout that assigned it counts the refusal
    in its install gate and shows the reason.
    """

    code = "uptane_refused"

    def __init__(self, message: str, *, about: dict[str, object] | None = None) -> None:
        super().__init__(message)
        self.about = about


class StaleMetadataError(UptaneError):
    """No fresh timestamp or director metadata for longer than the configured period
    (a freeze attack, or the server is unreachable)."""

    code = "stale_metadata"


class MetadataUnavailableError(UptaneError):
    """Fresh metadata could not be fetched now (within the stale period: retried)."""

    code = "metadata_unavailable"


class MetadataRefusedError(UptaneError):
    """TUF refused the metadata (bad signature, below threshold, rolled back, expired,
    length or hash of a metadata file wrong)."""

    code = "metadata_refused"


class WrongDeviceError(UptaneError):
    """A director instruction bound to another device (replayed from one device to another)."""

    code = "wrong_device"


class WrongDeviceClassInstructionError(UptaneError):
    """The instruction or the release is not for this device's class."""

    code = "wrong_device_class"


class WrongModelInstructionError(UptaneError):
    """The instruction moves a slot to another model name."""

    code = "wrong_model"


class NotReleasedError(UptaneError):
    """The director names a bundle the image repository (release keys) does not list."""

    code = "not_released"


class DirectorImageMismatchError(UptaneError):
    """Director and image repository disagree on a target's hash or length."""

    code = "director_image_mismatch"


class ReleaseRollbackError(UptaneError):
    """The release counter is below the device's floor for that model name."""

    code = "rollback"


class BadInstructionError(UptaneError):
    """A target's custom fields are missing or malformed."""

    code = "bad_instruction"
