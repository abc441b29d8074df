"""The lowering context: which TFLite tensor holds each ONNX value, in which layout.

Operator lowerings in :mod:`converters.tflite.ops` and
:mod:`converters.tflite.ops_nn` read their inputs through :meth:`Context.input`
(which adds constants and layout transposes on demand) and register their
outputs with :meth:`Context.output`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import tflite
from onnx import helper

from converters.tflite.builder import ModelSpec
from converters.tflite.errors import UnsupportedAttributeError
from converters.tflite.graph import OnnxGraph
from converters.tflite.layout import NHWC, ONNX, TO_NCHW, TO_NHWC, constant_for, permute

Op = tflite.BuiltinOperator


def attrs(node: onnx.NodeProto) -> dict[str, Any]:
    """The node's attributes as plain Python values."""
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


@dataclass
class Context:
    """Maps ONNX value names to TFLite tensors while the graph is lowered."""

    graph: OnnxGraph
    spec: ModelSpec
    values: dict[str, tuple[int, str]] = field(default_factory=dict)
    _cache: dict[tuple[str, str], int] = field(default_factory=dict)

    # --- shapes -----------------------------------------------------------------
    def shape(self, name: str) -> tuple[int, ...]:
        """Static ONNX shape of ``name`` (batch fixed to 1), constants included."""
        if name in self.graph.constants:
            return tuple(self.graph.constants[name].shape)
        return self.graph.shapes[name]

    def is_constant(self, name: str) -> bool:
        return name in self.graph.constants

    def constant(self, name: str) -> np.ndarray:
        return self.graph.constants[name]

    def layout_of(self, name: str) -> str | None:
        """``ONNX``/``NHWC`` for activations, ``None`` for constants."""
        return None if self.is_constant(name) else self.values[name][1]

    # --- tensors ----------------------------------------------------------------
    def new_tensor(
        self,
        name: str,
        layout: str = ONNX,
        like: str | None = None,
        shape: tuple[int, ...] | None = None,
        dynamic: tuple[bool, ...] | None = None,
    ) -> int:
        """A fresh float32 activation tensor for ONNX value ``like`` (default ``name``).

        Shape and batch signature come from ``like`` unless given (in ONNX order).
        """
        src = like or name
        onnx_shape = shape if shape is not None else self.graph.shapes[src]
        dyn = (
            dynamic
            if dynamic is not None
            else self.graph.dynamic.get(src, (False,) * len(onnx_shape))
        )
        sig = tuple(-1 if d else s for s, d in zip(onnx_shape, dyn, strict=False))
        if layout == NHWC:
            onnx_shape, sig = permute(onnx_shape, TO_NHWC), permute(sig, TO_NHWC)
        label = name if layout == ONNX else f"{name}__nhwc"
        return self.spec.add_tensor(label, tuple(onnx_shape), signature=tuple(sig))

    def const(self, name: str, array: np.ndarray) -> int:
        """A constant tensor (float64 is narrowed to float32, int64 kept)."""
        if array.dtype == np.float64:
            array = array.astype(np.float32)
        return self.spec.add_constant(name, array)

    def int32(self, name: str, values: Any) -> int:
        return self.spec.add_constant(name, np.asarray(values, dtype=np.int32))

    def output(self, name: str, index: int, layout: str = ONNX) -> None:
        """Record that TFLite tensor ``index`` holds ONNX value ``name`` in ``layout``."""
        self.values[name] = (index, layout)
        self._cache[(name, layout)] = index

    def op(
        self,
        code: int,
        inputs: list[int],
        outputs: list[int],
        options: tuple[str, dict[str, Any]] | None = None,
        version: int = 1,
    ) -> None:
        self.spec.add_operator(code, inputs, outputs, options, version)

    def input(self, name: str, layout: str | None = None) -> int:
        """The tensor holding ``name`` in ``layout`` (default: wherever it is now).

        Constants become constant tensors (shaped to broadcast in NHWC when asked);
        activations are transposed once per needed layout and cached.
        """
        if self.is_constant(name):
            want = layout or ONNX
            key = (name, want)
            if key not in self._cache:
                arr = self.constant(name)
                if arr.dtype == np.float64:
                    arr = arr.astype(np.float32)
                self._cache[key] = self.const(name, constant_for(arr, want))
            return self._cache[key]
        index, current = self.values[name]
        want = layout or current
        if want == current:
            return index
        if (name, want) not in self._cache:
            rank = len(self.graph.shapes[name])
            if rank != 4:
                raise UnsupportedAttributeError(
                    "layout", name, f"cannot change the layout of a rank-{rank} tensor"
                )
            _, c, h, w = self.graph.shapes[name]
            sig = self.graph.signature(name)
            if (c == 1 or h == w == 1) and sig.count(-1) <= 1:
                # Same element order in both layouts: a RESHAPE moves no data.
                target = [int(d) for d in (permute(sig, TO_NHWC) if want == NHWC else sig)]
                out = self.new_tensor(name, want)
                self.op(
                    Op.RESHAPE,
                    [index, self.int32(f"{name}__shape", target)],
                    [out],
                    ("ReshapeOptions", {"NewShape": target}),
                )
            else:
                out = self.new_tensor(name, want)
                perm = TO_NHWC if want == NHWC else TO_NCHW
                self.op(Op.TRANSPOSE, [index, self.int32(f"{name}__perm", perm)], [out])
            self._cache[(name, want)] = out
        return self._cache[(name, want)]

    def reshape(
        self,
        src: int,
        name: str,
        signature: tuple[int, ...],
        shape: tuple[int, ...],
        dynamic: tuple[bool, ...],
    ) -> int:
        """A ``RESHAPE`` of tensor ``src`` to ``signature`` (at most one -1)."""
        out = self.new_tensor(name, ONNX, shape=shape, dynamic=dynamic)
        target = [int(s) for s in signature]
        self.op(
            Op.RESHAPE,
            [src, self.int32(f"{name}__shape", target)],
            [out],
            ("ReshapeOptions", {"NewShape": target}),
        )
        return out
