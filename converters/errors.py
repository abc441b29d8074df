"""Errors raised by the converters package (one root, named subclasses)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .parity import ParityReport


class ConverterError(Exception):
    """Root of converter errors."""


class KeyStoreError(ConverterError):
    """A signing key is missing, unreadable, or its passphrase is wrong."""


class PackError(ConverterError):
    """A bundle could not be packed from the given files."""


class IntakeError(ConverterError):
    """The source model could not be read, exported or validated."""


class TargetError(ConverterError):
    """A target description is invalid (unknown format, precision or runtime)."""


class LoweringError(ConverterError):
    """The model cannot be brought down to the IR version/opset the target runtime accepts."""


class QuantizationError(ConverterError):
    """Quantizing the model failed (for example, calibration samples do not fit it)."""


class TargetUnavailableError(ConverterError):
    """The converter for this target format is not available in this installation."""


class SampleError(ConverterError):
    """Calibration samples do not match the model's input signature."""


class ParityError(ConverterError):
    """A produced artifact does not compute what the source computes, within tolerance.

    ``report`` holds the full parity report (per output errors and the tolerance).
    """

    def __init__(self, message: str, report: ParityReport) -> None:
        super().__init__(message)
        self.report = report


class TrainingModeError(ConverterError):
    """The model does something only training does (dropout in training mode): its
    outputs would be random on devices. Export it in inference mode."""


class NothingQuantizedError(QuantizationError):
    """A quantized precision was asked for, but the quantizer changed no weight and no
    operator: the artifact would be the float32 model under another label.

    ``summary`` is the :class:`~converters.quantization_report.QuantizationSummary`.
    """

    def __init__(self, message: str, summary: object) -> None:
        super().__init__(message)
        self.summary = summary


class ArtifactLoadError(ConverterError):
    """The runtime a device would use refuses (or fails to run) the produced model file."""


class UnexpectedConverterError(ConverterError):
    """A library failed in a way the converter does not name (a bug to report)."""


def error_code(error: BaseException) -> str:
    """Short code of an error for tables and APIs: ``ParityError`` -> ``parity``."""
    import re

    name = type(error).__name__
    name = name[: -len("Error")] if name.endswith("Error") and name != "Error" else name
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()
