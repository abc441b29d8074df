"""ONNX -> TFLite without TensorFlow: the flatbuffer is written directly.

    from converters.tflite import onnx_to_tflite
    data = onnx_to_tflite(onnx_model, weights="float32")   # or "float16", "int8"

Supported ONNX operators (default domain, float32 tensors), see :data:`SUPPORTED_OPS`:

* dense: ``Gemm``, ``MatMul`` (constant weights -> FULLY_CONNECTED, else BATCH_MATMUL)
* elementwise: ``Add``, ``Sub``, ``Mul``, ``Div`` (with broadcasting)
* activations: ``Relu``, ``Clip``, ``Sigmoid``, ``Tanh``, ``LeakyRelu``, ``HardSwish``,
  ``HardSigmoid``, ``Gelu`` (opset 20), ``Softmax`` (over the last axis, or the
  channel axis of an NCHW tensor)
* ``Conv`` 2-D, including depthwise (group == channels) and grouped convolutions,
  with pads, strides and dilations
* ``MaxPool``, ``AveragePool`` (2-D, no dilation), ``GlobalAveragePool``, ``GlobalMaxPool``
* ``BatchNormalization`` (inference): folded into the preceding ``Conv``, else MUL + ADD
* ``Flatten``, ``Reshape``, ``Transpose``, ``Concat``, ``Squeeze``, ``Unsqueeze``
* ``Pad`` (constant and reflect modes)
* ``ReduceMean``, ``ReduceMax``, ``ReduceSum`` over constant axes (e.g. ``x.mean((2, 3))``)
* ``Identity``, ``Dropout`` (inference: no-ops); ``Constant``
* transformers (:mod:`.ops_transformer`): ``LayerNormalization``, ``Erf`` (torch's
  opset-18 GELU is fused into ``GELU``), ``Pow``, ``Sqrt``, ``Reciprocal``, ``Split``,
  ``Slice``, ``Gather`` (constant indices), ``Expand``, ``ReduceMin``, ``ReduceProd``
* 1-D ``Conv`` / ``MaxPool`` / ``AveragePool`` through 2-D, ``ConvTranspose``,
  ``Resize`` / ``Upsample`` (nearest, bilinear; :mod:`.ops_spatial`)
* ``LSTM``, ``GRU`` unrolled over at most 128 static time steps (:mod:`.ops_seq`)

Full-integer int8 (calibrated activations): :mod:`.quantize_full`; where a file's bytes go
(weights, biases, quantization parameters, tables): :mod:`.size_report`.

Subgraphs that depend only on initializers and static shapes (for instance the
``Shape -> Gather -> Unsqueeze -> Concat`` chain torch's exporter writes for
``x.view(x.size(0), -1)``) are folded to constants first, so operators such as
``Shape``, ``Gather``, ``Slice`` and ``Cast`` are accepted there. Any other
operator raises :class:`UnsupportedOperatorError` naming the operator and node.

Layout: model inputs and outputs keep the ONNX layout (NCHW for images), so the
same arrays feed both the ONNX and the TFLite model; inside, convolutions run
NHWC behind a TRANSPOSE, and a ``Flatten`` after a convolution transposes back
to NCHW first so the flattened order is ONNX's (see :mod:`.layout`).

Batch: a dynamic first input dimension becomes ``shape_signature`` -1 (the
stored shape uses batch 1); call ``resize_tensor_input`` for other batch sizes.
Other dynamic dimensions are refused.

Weights (see :mod:`.quantize`): ``float32``; ``float16`` (float16 constants +
DEQUANTIZE, float32 compute); ``int8`` (dynamic range: symmetric int8 conv
weights per channel and dense weights per tensor, hybrid kernels).

The file is TFLite schema version 3 with a ``serving_default`` signature, and
runs on ai-edge-litert and on the legacy ``tflite-runtime`` 2.14.
"""

from __future__ import annotations

import onnx

from converters.tflite.builder import ModelSpec, serialize
from converters.tflite.context import Context
from converters.tflite.errors import (
    InvalidModelError,
    TFLiteConversionError,
    UnsupportedAttributeError,
    UnsupportedOperatorError,
    UnsupportedQuantizationError,
    UnsupportedShapeError,
    UnsupportedTypeError,
)
from converters.tflite.graph import FOLDABLE_OPS, load_graph
from converters.tflite.layout import ONNX
from converters.tflite.ops import BASIC_LOWERINGS
from converters.tflite.ops_nn import NN_LOWERINGS
from converters.tflite.ops_seq import SEQ_LOWERINGS
from converters.tflite.ops_spatial import SPATIAL_LOWERINGS
from converters.tflite.ops_transformer import TRANSFORMER_LOWERINGS, fuse_erf_gelu
from converters.tflite.optimize import fuse_activations
from converters.tflite.quantize import WEIGHT_MODES, WeightReport, apply

__all__ = [
    "SUPPORTED_OPS",
    "WEIGHT_MODES",
    "InvalidModelError",
    "TFLiteConversionError",
    "UnsupportedAttributeError",
    "UnsupportedOperatorError",
    "UnsupportedQuantizationError",
    "UnsupportedShapeError",
    "UnsupportedTypeError",
    "WeightReport",
    "onnx_to_tflite",
    "onnx_to_tflite_with_report",
]

_LOWERINGS = {
    **BASIC_LOWERINGS,
    **NN_LOWERINGS,
    **TRANSFORMER_LOWERINGS,
    **SPATIAL_LOWERINGS,
    **SEQ_LOWERINGS,
}

_FOLDABLE_OR_SHAPE = FOLDABLE_OPS | {"Constant", "Shape"}

#: ONNX operator types the converter lowers (after constant folding).
SUPPORTED_OPS: frozenset[str] = frozenset(_LOWERINGS)


def _check_supported(model: onnx.ModelProto, graph_nodes: list[onnx.NodeProto]) -> None:
    for node in graph_nodes:
        if node.domain not in ("", "ai.onnx") or node.op_type not in _LOWERINGS:
            op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
            raise UnsupportedOperatorError(op, node.name or node.output[0], SUPPORTED_OPS)


def onnx_to_tflite(model: onnx.ModelProto, *, weights: str = "float32") -> bytes:
    """Convert an ONNX model to TFLite flatbuffer bytes.

    See :func:`onnx_to_tflite_with_report` for what the weight mode changed.
    """
    return onnx_to_tflite_with_report(model, weights=weights)[0]


def onnx_to_tflite_with_report(
    model: onnx.ModelProto, *, weights: str = "float32"
) -> tuple[bytes, WeightReport]:
    """Convert an ONNX model to TFLite flatbuffer bytes, and say what ``weights`` changed.

    ``weights`` is ``"float32"``, ``"float16"`` or ``"int8"`` (dynamic range).
    Raises :class:`UnsupportedOperatorError` for an operator outside
    :data:`SUPPORTED_OPS` and other :class:`TFLiteConversionError` subclasses
    for shapes, attributes or quantization modes it cannot express.
    """
    if weights not in WEIGHT_MODES:
        raise UnsupportedQuantizationError(
            f"unknown weights mode {weights!r}; use one of {', '.join(WEIGHT_MODES)}"
        )
    # Refuse unknown operators before anything else, foldable ones aside.
    _check_supported(
        model,
        [
            n
            for n in model.graph.node
            if n.domain not in ("", "ai.onnx") or n.op_type not in _FOLDABLE_OR_SHAPE
        ],
    )
    graph = load_graph(model)
    fuse_erf_gelu(graph)
    _check_supported(model, graph.nodes)
    spec = ModelSpec(description=f"edgefleet onnx_to_tflite ({weights} weights)")
    ctx = Context(graph, spec)
    for name in graph.inputs:
        elem = _elem_type(model, name)
        if elem != onnx.TensorProto.FLOAT:
            raise UnsupportedTypeError(
                f"input {name!r} is {onnx.TensorProto.DataType.Name(elem)}; "
                "only float32 inputs are supported"
            )
        index = ctx.new_tensor(name, ONNX)
        spec.inputs.append(index)
        ctx.output(name, index, ONNX)
    for node in graph.nodes:
        _LOWERINGS[node.op_type](ctx, node)
    for name in graph.outputs:
        spec.outputs.append(_bind_output(ctx, name))
    fuse_activations(spec)
    report = apply(spec, weights)
    spec.compact()
    return serialize(spec), report


def _bind_output(ctx: Context, name: str) -> int:
    """The tensor to expose as model output ``name``: ONNX layout, named ``name``.

    A tensor that is already a model input or output, or whose name was taken
    (an ``Identity`` output), is copied by a ``RESHAPE`` so each output is its own
    tensor under its ONNX name.
    """
    index = ctx.input(name, ONNX)
    spec = ctx.spec
    if spec.tensors[index].name == name:
        return index
    if index in spec.inputs or index in spec.outputs:
        return ctx.reshape(
            index, name, ctx.graph.signature(name), ctx.shape(name), ctx.graph.dynamic[name]
        )
    spec.tensors[index].name = name
    return index


def _elem_type(model: onnx.ModelProto, name: str) -> int:
    for vi in model.graph.input:
        if vi.name == name:
            return int(vi.type.tensor_type.elem_type)
    raise InvalidModelError(f"no graph input named {name!r}")
