"""NCHW (ONNX) <-> NHWC (TFLite) bookkeeping.

ONNX convolutions and pools read NCHW; TFLite's read NHWC. The converter keeps
each 4-D activation in whichever layout its producer wrote, tagged
:data:`ONNX` or :data:`NHWC`, and inserts a ``TRANSPOSE`` only when a consumer
needs the other one. So:

* model inputs and outputs stay in the ONNX layout: callers feed the TFLite
  model exactly the arrays they feed the ONNX model (NCHW images), and a
  transpose to NHWC follows the input inside the model;
* a run of conv / pool / batch-norm / elementwise ops stays NHWC throughout;
* ``Flatten``/``Reshape``/``Gemm`` after a convolution first transposes back to
  NCHW, so the flattened feature order is ONNX's (channel-major) order and the
  following weights apply unchanged;
* a ``Transpose`` of an NHWC tensor is composed into a single ``TRANSPOSE``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

ONNX = "onnx"
NHWC = "nhwc"

TO_NHWC = (0, 2, 3, 1)
TO_NCHW = (0, 3, 1, 2)


def permute(values: Sequence[int] | Sequence[bool], perm: Sequence[int]) -> tuple:
    """``values`` reordered by ``perm`` (``out[i] = values[perm[i]]``)."""
    return tuple(values[p] for p in perm)


def stored_shape(shape: Sequence[int], layout: str) -> tuple[int, ...]:
    """The shape of the TFLite tensor holding an ONNX tensor of ``shape``."""
    return permute(shape, TO_NHWC) if layout == NHWC else tuple(shape)


def nhwc_axis(axis: int, rank: int = 4) -> int:
    """Where ONNX axis ``axis`` of a 4-D tensor lives in its NHWC copy."""
    return TO_NCHW[axis % rank]


def constant_for(array: np.ndarray, layout: str) -> np.ndarray:
    """A constant operand broadcasting against a 4-D activation stored in ``layout``."""
    if layout != NHWC:
        return array
    if array.ndim > 4:
        raise ValueError("a constant of rank > 4 cannot broadcast against a 4-D tensor")
    full = array.reshape((1,) * (4 - array.ndim) + array.shape)
    return np.ascontiguousarray(full.transpose(TO_NHWC))


def compose_from_nhwc(perm: Sequence[int]) -> tuple[int, ...]:
    """Permutation applying ONNX ``Transpose(perm)`` directly to an NHWC copy."""
    return tuple(TO_NCHW[p] for p in perm)
