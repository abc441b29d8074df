"""An in-memory TFLite model (:class:`ModelSpec`) and its flatbuffer writer.

The lowering in :mod:`converters.tflite.ops` appends tensors and operators to a
:class:`ModelSpec`; the passes in :mod:`converters.tflite.quantize` rewrite it;
:func:`serialize` turns it into schema-version-3 flatbuffer bytes using the
generated builder functions of the ``tflite`` package.

Invariants of the written file:

* file identifier ``TFL3``, ``version`` 3, buffer 0 empty (the sentinel every
  tensor without data points at), one buffer per distinct constant content
  (constant tensors with equal bytes share it; constants are read-only), data
  aligned to 16 bytes;
* operator codes carry both ``builtin_code`` and ``deprecated_builtin_code``
  (127, the placeholder, for codes above 127), so old and new readers agree;
* one ``serving_default`` signature over the subgraph's inputs and outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import flatbuffers
import numpy as np
import tflite

SCHEMA_VERSION = 3
PLACEHOLDER_FOR_GREATER_OP_CODES = 127
SIGNATURE_KEY = "serving_default"
_ALIGN = 16

_NP_TO_TFL = {
    np.dtype(np.float32): tflite.TensorType.FLOAT32,
    np.dtype(np.float16): tflite.TensorType.FLOAT16,
    np.dtype(np.int32): tflite.TensorType.INT32,
    np.dtype(np.int64): tflite.TensorType.INT64,
    np.dtype(np.int8): tflite.TensorType.INT8,
    np.dtype(np.uint8): tflite.TensorType.UINT8,
    np.dtype(np.bool_): tflite.TensorType.BOOL,
}


def tensor_type(dtype: np.dtype[Any] | type) -> int:
    """The TFLite ``TensorType`` for a numpy dtype."""
    return _NP_TO_TFL[np.dtype(dtype)]


@dataclass
class Quantization:
    """Affine quantization parameters (symmetric when every zero point is 0)."""

    scale: list[float]
    zero_point: list[int]
    dimension: int = 0


@dataclass
class TensorSpec:
    """One tensor. ``signature`` uses -1 for dimensions that vary (the batch)."""

    name: str
    shape: tuple[int, ...]
    dtype: int
    signature: tuple[int, ...] | None = None
    data: bytes | None = None
    quantization: Quantization | None = None


@dataclass
class OperatorSpec:
    """One operator. ``options`` is ``(OptionsTableName, {Field: value})``.

    Field names are the schema's, in the generated functions' CamelCase, e.g.
    ``("Conv2DOptions", {"Padding": 1, "StrideW": 2})``. List values are
    written as int32 vectors.
    """

    code: int
    inputs: list[int]
    outputs: list[int]
    options: tuple[str, dict[str, Any]] | None = None
    version: int = 1


@dataclass
class ModelSpec:
    """A single-subgraph TFLite model under construction."""

    tensors: list[TensorSpec] = field(default_factory=list)
    operators: list[OperatorSpec] = field(default_factory=list)
    inputs: list[int] = field(default_factory=list)
    outputs: list[int] = field(default_factory=list)
    description: str = "edgefleet"
    _names: set[str] = field(default_factory=set)

    def unique_name(self, name: str) -> str:
        """``name``, or ``name_1``, ``name_2``... if already taken."""
        candidate, i = name, 0
        while candidate in self._names:
            i += 1
            candidate = f"{name}_{i}"
        self._names.add(candidate)
        return candidate

    def add_tensor(
        self,
        name: str,
        shape: tuple[int, ...],
        dtype: int = tflite.TensorType.FLOAT32,
        signature: tuple[int, ...] | None = None,
    ) -> int:
        """Append an activation tensor; returns its index."""
        sig = tuple(signature) if signature is not None and -1 in signature else None
        self.tensors.append(
            TensorSpec(self.unique_name(name), tuple(int(d) for d in shape), dtype, sig)
        )
        return len(self.tensors) - 1

    def add_constant(self, name: str, array: np.ndarray) -> int:
        """Append a constant tensor holding ``array``; returns its index."""
        arr = np.ascontiguousarray(array)
        self.tensors.append(
            TensorSpec(
                self.unique_name(name),
                tuple(int(d) for d in arr.shape),
                tensor_type(arr.dtype),
                data=arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes(),
            )
        )
        return len(self.tensors) - 1

    def add_operator(
        self,
        code: int,
        inputs: list[int],
        outputs: list[int],
        options: tuple[str, dict[str, Any]] | None = None,
        version: int = 1,
    ) -> OperatorSpec:
        """Append an operator (after every operator already added)."""
        op = OperatorSpec(code, list(inputs), list(outputs), options, version)
        self.operators.append(op)
        return op

    def compact(self) -> None:
        """Drop tensors no operator or model input/output refers to; renumber the rest."""
        used = {*self.inputs, *self.outputs}
        for op in self.operators:
            used.update(i for i in (*op.inputs, *op.outputs) if i >= 0)
        keep = [i for i in range(len(self.tensors)) if i in used]
        new_index = {old: new for new, old in enumerate(keep)}
        new_index[-1] = -1
        self.tensors = [self.tensors[i] for i in keep]
        for op in self.operators:
            op.inputs = [new_index[i] for i in op.inputs]
            op.outputs = [new_index[i] for i in op.outputs]
        self.inputs = [new_index[i] for i in self.inputs]
        self.outputs = [new_index[i] for i in self.outputs]


def operator_code_fields(code: int) -> tuple[int, int]:
    """``(deprecated_builtin_code, builtin_code)`` as the schema wants them.

    The old int8 field holds codes up to 126; larger codes store the
    placeholder 127 there and the real code in the int32 ``builtin_code``.
    """
    return min(code, PLACEHOLDER_FOR_GREATER_OP_CODES), code


def _aligned_bytes(b: flatbuffers.Builder, data: bytes) -> int:
    b.StartVector(1, len(data), _ALIGN)
    b.head = b.head - len(data)
    b.Bytes[b.head : b.head + len(data)] = data
    return int(b.EndVector())


def _int_vector(b: flatbuffers.Builder, values: list[int] | tuple[int, ...]) -> int:
    return int(b.CreateNumpyVector(np.asarray(values, dtype=np.int32)))


def _offsets_vector(b: flatbuffers.Builder, offsets: list[int]) -> int:
    b.StartVector(4, len(offsets), 4)
    for off in reversed(offsets):
        b.PrependUOffsetTRelative(off)
    return int(b.EndVector())


def _write_options(b: flatbuffers.Builder, table: str, fields: dict[str, Any]) -> int:
    vectors = {k: _int_vector(b, v) for k, v in fields.items() if isinstance(v, (list, tuple))}
    getattr(tflite, f"{table}Start")(b)
    for key, value in fields.items():
        getattr(tflite, f"{table}Add{key}")(b, vectors.get(key, value))
    return int(getattr(tflite, f"{table}End")(b))


def _write_quantization(b: flatbuffers.Builder, q: Quantization) -> int:
    scale = b.CreateNumpyVector(np.asarray(q.scale, dtype=np.float32))
    zero = b.CreateNumpyVector(np.asarray(q.zero_point, dtype=np.int64))
    tflite.QuantizationParametersStart(b)
    tflite.QuantizationParametersAddScale(b, scale)
    tflite.QuantizationParametersAddZeroPoint(b, zero)
    tflite.QuantizationParametersAddQuantizedDimension(b, q.dimension)
    return int(tflite.QuantizationParametersEnd(b))


def _write_tensor(b: flatbuffers.Builder, t: TensorSpec, buffer_index: int) -> int:
    name = b.CreateString(t.name)
    shape = _int_vector(b, t.shape)
    sig = _int_vector(b, t.signature) if t.signature is not None else None
    quant = _write_quantization(b, t.quantization) if t.quantization else None
    tflite.TensorStart(b)
    tflite.TensorAddShape(b, shape)
    if sig is not None:
        tflite.TensorAddShapeSignature(b, sig)
    tflite.TensorAddType(b, t.dtype)
    tflite.TensorAddBuffer(b, buffer_index)
    tflite.TensorAddName(b, name)
    if quant is not None:
        tflite.TensorAddQuantization(b, quant)
    return int(tflite.TensorEnd(b))


def _write_tensor_maps(b: flatbuffers.Builder, spec: ModelSpec, indices: list[int]) -> int:
    maps = []
    for i in indices:
        name = b.CreateString(spec.tensors[i].name)
        tflite.TensorMapStart(b)
        tflite.TensorMapAddName(b, name)
        tflite.TensorMapAddTensorIndex(b, i)
        maps.append(tflite.TensorMapEnd(b))
    return _offsets_vector(b, maps)


def _write_signature(b: flatbuffers.Builder, spec: ModelSpec) -> int:
    inputs = _write_tensor_maps(b, spec, spec.inputs)
    outputs = _write_tensor_maps(b, spec, spec.outputs)
    key = b.CreateString(SIGNATURE_KEY)
    tflite.SignatureDefStart(b)
    tflite.SignatureDefAddInputs(b, inputs)
    tflite.SignatureDefAddOutputs(b, outputs)
    tflite.SignatureDefAddSignatureKey(b, key)
    tflite.SignatureDefAddSubgraphIndex(b, 0)
    return int(tflite.SignatureDefEnd(b))


def _write_buffer(b: flatbuffers.Builder, data: bytes | None) -> int:
    vec = _aligned_bytes(b, data) if data else None
    tflite.BufferStart(b)
    if vec is not None:
        tflite.BufferAddData(b, vec)
    return int(tflite.BufferEnd(b))


def _opcode_table(spec: ModelSpec) -> dict[tuple[int, int], int]:
    table: dict[tuple[int, int], int] = {}
    for op in spec.operators:
        table.setdefault((op.code, op.version), len(table))
    return table


def _write_operator(b: flatbuffers.Builder, op: OperatorSpec, opcode_index: int) -> int:
    options = _write_options(b, *op.options) if op.options else None
    inputs = _int_vector(b, op.inputs)
    outputs = _int_vector(b, op.outputs)
    tflite.OperatorStart(b)
    tflite.OperatorAddOpcodeIndex(b, opcode_index)
    tflite.OperatorAddInputs(b, inputs)
    tflite.OperatorAddOutputs(b, outputs)
    if op.options and options is not None:
        tflite.OperatorAddBuiltinOptionsType(b, getattr(tflite.BuiltinOptions, op.options[0]))
        tflite.OperatorAddBuiltinOptions(b, options)
    return int(tflite.OperatorEnd(b))


def serialize(spec: ModelSpec) -> bytes:
    """Write ``spec`` as TFLite flatbuffer bytes (schema version 3)."""
    b = flatbuffers.Builder(1024 + sum(len(t.data or b"") for t in spec.tensors))
    buffers = [_write_buffer(b, None)]
    shared: dict[bytes, int] = {}  # equal constant bytes are stored once
    tensor_offsets = []
    for t in spec.tensors:
        index = 0
        if t.data:
            if t.data not in shared:
                buffers.append(_write_buffer(b, t.data))
                shared[t.data] = len(buffers) - 1
            index = shared[t.data]
        tensor_offsets.append(_write_tensor(b, t, index))

    opcodes = _opcode_table(spec)
    op_offsets = [_write_operator(b, op, opcodes[(op.code, op.version)]) for op in spec.operators]

    tensors_vec = _offsets_vector(b, tensor_offsets)
    ops_vec = _offsets_vector(b, op_offsets)
    in_vec = _int_vector(b, spec.inputs)
    out_vec = _int_vector(b, spec.outputs)
    sg_name = b.CreateString("main")
    tflite.SubGraphStart(b)
    tflite.SubGraphAddTensors(b, tensors_vec)
    tflite.SubGraphAddInputs(b, in_vec)
    tflite.SubGraphAddOutputs(b, out_vec)
    tflite.SubGraphAddOperators(b, ops_vec)
    tflite.SubGraphAddName(b, sg_name)
    subgraph = tflite.SubGraphEnd(b)

    code_offsets = []
    for code, version in opcodes:
        deprecated, builtin = operator_code_fields(code)
        tflite.OperatorCodeStart(b)
        tflite.OperatorCodeAddDeprecatedBuiltinCode(b, deprecated)
        tflite.OperatorCodeAddBuiltinCode(b, builtin)
        tflite.OperatorCodeAddVersion(b, version)
        code_offsets.append(tflite.OperatorCodeEnd(b))

    codes_vec = _offsets_vector(b, code_offsets)
    subgraphs_vec = _offsets_vector(b, [subgraph])
    buffers_vec = _offsets_vector(b, buffers)
    signatures_vec = _offsets_vector(b, [_write_signature(b, spec)])
    description = b.CreateString(spec.description)
    tflite.ModelStart(b)
    tflite.ModelAddVersion(b, SCHEMA_VERSION)
    tflite.ModelAddOperatorCodes(b, codes_vec)
    tflite.ModelAddSubgraphs(b, subgraphs_vec)
    tflite.ModelAddDescription(b, description)
    tflite.ModelAddBuffers(b, buffers_vec)
    tflite.ModelAddSignatureDefs(b, signatures_vec)
    model = tflite.ModelEnd(b)
    b.Finish(model, file_identifier=b"TFL3")
    return bytes(b.Output())
