"""Errors of the ONNX -> TFLite converter (all under :class:`TFLiteConversionError`)."""

from __future__ import annotations

from collections.abc import Iterable

from converters.errors import ConverterError


class TFLiteConversionError(ConverterError):
    """Root of the TFLite converter's errors: the model could not be converted."""


class UnsupportedOperatorError(TFLiteConversionError):
    """An ONNX operator outside the supported subset. Names the operator and the node."""

    def __init__(self, op_type: str, node_name: str, supported: Iterable[str]) -> None:
        self.op_type = op_type
        self.node_name = node_name
        super().__init__(
            f"ONNX operator {op_type!r} (node {node_name!r}) is not supported by the TFLite "
            f"converter. Supported operators: {', '.join(sorted(supported))}. Export the model "
            "without it, or deploy it to an ONNX target instead."
        )


class UnsupportedAttributeError(TFLiteConversionError):
    """A supported operator used with attribute values the converter cannot express."""

    def __init__(self, op_type: str, node_name: str, detail: str) -> None:
        self.op_type = op_type
        self.node_name = node_name
        super().__init__(
            f"ONNX operator {op_type!r} (node {node_name!r}): {detail}. "
            "Deploy this model to an ONNX target instead."
        )


class UnsupportedShapeError(TFLiteConversionError):
    """Shapes the converter cannot make static (dynamic dimensions other than the batch)."""


class UnsupportedTypeError(TFLiteConversionError):
    """A model input of a type other than float32."""


class InvalidModelError(TFLiteConversionError):
    """The ONNX model is malformed or fails ONNX shape inference."""


class UnsupportedQuantizationError(TFLiteConversionError):
    """An unknown ``weights`` mode was requested."""
