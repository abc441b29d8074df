"""The Open Inference Protocol (KServe v2 / Triton HTTP) as pure functions.

No sockets here: :func:`decode_infer_request` turns a request body (JSON, or
JSON followed by raw tensors under the binary tensor extension) into a feed of
numpy arrays checked against the model's :class:`~device_agent.runtime.TensorSpec`
list, and :func:`encode_infer_response` turns outputs back into a body. Every
refusal is a :class:`ServingError` carrying the HTTP status, a stable ``code``
and a message that says what to send instead.

Binary tensor extension: the request header ``Inference-Header-Content-Length: N``
says the first ``N`` bytes are the JSON header; an input whose ``parameters``
hold ``binary_data_size`` takes that many bytes, in input order, from the rest.
Outputs are returned the same way when the request asks (``"binary_data": true``
on an output, or ``"binary_data_output": true`` in the request's parameters).
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..runtime import TensorSpec

#: v2 datatype name <-> numpy dtype (BYTES and BF16 have no numpy dtype the models use)
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_), "UINT8": np.dtype(np.uint8), "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32), "UINT64": np.dtype(np.uint64), "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16), "INT32": np.dtype(np.int32), "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16), "FP32": np.dtype(np.float32), "FP64": np.dtype(np.float64),
}  # fmt: skip
_NAMES = {dt: name for name, dt in DATATYPES.items()}
_LITTLE = sys.byteorder == "little"


class ServingError(Exception):
    """A refused request: ``status`` is the HTTP status, ``code`` a stable token."""

    def __init__(self, status: int, message: str, code: str = "bad_request") -> None:
        super().__init__(message)
        self.status = status
        self.code = code

    def body(self) -> bytes:
        """The v2 error body: ``{"error": message, "code": code}``."""
        return json.dumps({"error": str(self), "code": self.code}).encode()


def datatype_of(dtype: np.dtype) -> str:
    """The v2 datatype name of a numpy dtype (``BYTES`` for anything else)."""
    return _NAMES.get(np.dtype(dtype), "BYTES")


def dtype_of(datatype: str) -> np.dtype:
    """The numpy dtype of a v2 datatype name; :class:`ServingError` if unsupported."""
    try:
        return DATATYPES[datatype]
    except (KeyError, TypeError):
        raise ServingError(
            400,
            f"datatype {datatype!r} is not supported; use one of {sorted(DATATYPES)}",
            "bad_datatype",
        ) from None


def tensor_metadata(spec: TensorSpec) -> dict[str, Any]:
    """``{"name", "datatype", "shape"}`` with -1 for open dimensions."""
    return {
        "name": spec.name,
        "datatype": datatype_of(spec.dtype),
        "shape": [-1 if d is None else d for d in spec.shape],
    }


@dataclass
class InferRequest:
    """A decoded request: the feed for ``Agent.predict`` and what to send back."""

    id: str | None
    feed: dict[str, np.ndarray]
    #: output names to return, in order (None: all, in the model's order)
    outputs: list[str] | None
    #: output name -> return as binary; ``"*"`` is the default for outputs not named
    binary: dict[str, bool]


def _json_object(raw: bytes | memoryview, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(bytes(raw))
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise ServingError(400, f"{what} is not valid JSON: {e}", "bad_json") from None
    if not isinstance(doc, dict):
        raise ServingError(400, f"{what} must be a JSON object", "bad_json")
    return doc


def _shape(raw: Any, name: str) -> tuple[int, ...]:
    if not isinstance(raw, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in raw
    ):
        raise ServingError(
            400,
            f"input {name!r}: shape must be a list of non-negative integers, got {raw!r}",
            "bad_shape",
        )
    return tuple(raw)


def _check_against(
    spec: TensorSpec, datatype: str, shape: tuple[int, ...], also: np.dtype | None = None
) -> None:
    want = datatype_of(spec.dtype)
    if datatype != want and (also is None or datatype != datatype_of(also)):
        expects = want if also is None else f"{want} (or {datatype_of(also)}, already quantized)"
        raise ServingError(
            400,
            f"input {spec.name!r} has datatype {datatype}; the model expects {expects}",
            "bad_datatype",
        )
    if len(shape) != len(spec.shape) or any(
        w is not None and w != got for w, got in zip(spec.shape, shape, strict=True)
    ):
        want_shape = [-1 if d is None else d for d in spec.shape]
        raise ServingError(
            400,
            f"input {spec.name!r} has shape {list(shape)}; the model "
            f"expects {want_shape} (-1: any size)",
            "bad_shape",
        )


def decode_infer_request(
    body: bytes,
    header_length: int | None,
    inputs: Sequence[TensorSpec],
    *,
    max_json_bytes: int,
    also: Mapping[str, np.dtype] | None = None,
) -> InferRequest:
    """Decode and check an infer request body against the model's ``inputs``.

    ``also`` maps an input to a second datatype it accepts: the integer dtype of a
    quantized input, whose values the agent then feeds as they are.
    """
    view = memoryview(body)
    if header_length is None:
        header, rest = view, view[len(view) :]
    else:
        if not 0 < header_length <= len(view):
            raise ServingError(
                400,
                f"Inference-Header-Content-Length {header_length} is not "
                f"within the body's {len(view)} bytes",
                "bad_header_length",
            )
        header, rest = view[:header_length], view[header_length:]
    if len(header) > max_json_bytes:
        raise ServingError(
            413,
            f"the JSON part is {len(header)} bytes, over the limit of "
            f"{max_json_bytes}; send tensors with the binary tensor "
            "extension",
            "too_large",
        )
    doc = _json_object(header, "the request")
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise ServingError(400, "the request needs a non-empty 'inputs' list", "bad_request")
    specs = {s.name: s for s in inputs}
    feed: dict[str, np.ndarray] = {}
    offset = 0
    for item in raw_inputs:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ServingError(400, "every input needs a 'name'", "bad_request")
        name = item["name"]
        spec = specs.get(name)
        if spec is None:
            raise ServingError(
                400,
                f"the model has no input {name!r}; its inputs are {sorted(specs)}",
                "unknown_input",
            )
        if name in feed:
            raise ServingError(400, f"input {name!r} is given twice", "bad_request")
        shape = _shape(item.get("shape"), name)
        datatype = item.get("datatype")
        _check_against(spec, str(datatype), shape, also.get(name) if also else None)
        dtype = dtype_of(str(datatype))
        count = math.prod(shape)
        params = item.get("parameters") or {}
        size = params.get("binary_data_size") if isinstance(params, dict) else None
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise ServingError(
                    400,
                    f"input {name!r}: binary_data_size must be a non-negative integer",
                    "bad_request",
                )
            if size != count * dtype.itemsize:
                raise ServingError(
                    400,
                    f"input {name!r}: binary_data_size {size} does not fit "
                    f"shape {list(shape)} of {datatype} "
                    f"({count * dtype.itemsize} bytes)",
                    "bad_shape",
                )
            if offset + size > len(rest):
                raise ServingError(
                    400,
                    f"input {name!r}: the body ends before its {size} bytes of binary data",
                    "bad_request",
                )
            feed[name] = _from_bytes(rest[offset : offset + size], dtype, shape)
            offset += size
        elif "data" in item:
            feed[name] = _from_json(item["data"], dtype, shape, count, name)
        else:
            raise ServingError(
                400,
                f"input {name!r} has neither 'data' nor a binary_data_size parameter",
                "bad_request",
            )
    if offset != len(rest):
        raise ServingError(
            400,
            f"{len(rest) - offset} bytes of binary data follow the inputs that no input claims",
            "bad_request",
        )
    missing = [n for n in specs if n not in feed]
    if missing:
        raise ServingError(400, f"missing input(s) {missing}", "missing_input")
    return InferRequest(
        doc.get("id") if isinstance(doc.get("id"), str) else None, feed, *_requested_outputs(doc)
    )


def _from_bytes(raw: memoryview, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    wire = dtype if _LITTLE else dtype.newbyteorder("<")
    arr = np.frombuffer(raw, dtype=wire).reshape(shape)
    if not arr.flags.aligned or not _LITTLE:
        arr = arr.astype(dtype)
    return arr


def _from_json(
    data: Any, dtype: np.dtype, shape: tuple[int, ...], count: int, name: str
) -> np.ndarray:
    if not isinstance(data, list):
        data = [data]
    try:
        arr = np.asarray(data, dtype=dtype)
    except (ValueError, TypeError, OverflowError) as e:
        raise ServingError(
            400,
            f"input {name!r}: data is not a (nested) list of {datatype_of(dtype)} values: {e}",
            "bad_data",
        ) from None
    if arr.size != count:
        raise ServingError(
            400,
            f"input {name!r}: {arr.size} values for shape {list(shape)} ({count} values)",
            "bad_shape",
        )
    return arr.reshape(shape)


def _requested_outputs(doc: Mapping[str, Any]) -> tuple[list[str] | None, dict[str, bool]]:
    params = doc.get("parameters")
    default = bool(params.get("binary_data_output", False)) if isinstance(params, dict) else False
    binary = {"*": default}
    raw = doc.get("outputs")
    if raw is None:
        return None, binary
    if not isinstance(raw, list):
        raise ServingError(400, "'outputs' must be a list", "bad_request")
    names = []
    for item in raw:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ServingError(400, "every requested output needs a 'name'", "bad_request")
        names.append(item["name"])
        p = item.get("parameters")
        if isinstance(p, dict) and "binary_data" in p:
            binary[item["name"]] = bool(p["binary_data"])
    return names, binary


def encode_infer_response(
    model_name: str,
    model_version: int,
    request: InferRequest,
    output_names: Sequence[str],
    outputs: Sequence[np.ndarray],
    parameters: Mapping[str, Any] | None = None,
) -> tuple[bytes, int | None]:
    """The response body and, when any output is binary, the JSON header's length."""
    by_name = dict(zip(output_names, outputs, strict=True))
    wanted = request.outputs if request.outputs is not None else list(output_names)
    unknown = [n for n in wanted if n not in by_name]
    if unknown:
        raise ServingError(
            400,
            f"the model has no output(s) {unknown}; its outputs are {list(output_names)}",
            "unknown_output",
        )
    described: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for name in wanted:
        arr = np.asarray(by_name[name])
        entry: dict[str, Any] = {
            "name": name,
            "datatype": datatype_of(arr.dtype),
            "shape": list(arr.shape),
        }
        if request.binary.get(name, request.binary["*"]):
            raw = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = arr.reshape(-1).tolist()
        described.append(entry)
    doc: dict[str, Any] = {
        "model_name": model_name,
        "model_version": str(model_version),
        "outputs": described,
    }
    if request.id is not None:
        doc["id"] = request.id
    if parameters:
        doc["parameters"] = dict(parameters)
    header = json.dumps(doc, separators=(",", ":")).encode()
    if not chunks:
        return header, None
    return b"".join([header, *chunks]), len(header)


#: labels one request may post
MAX_LABELS_PER_REQUEST = 1000


def decode_labels(body: bytes) -> list[tuple[str, Any]]:
    """``{"labels": [{"prediction_id": id, "label": class | [class per row]}, ...]}``."""
    doc = _json_object(body, "the labels request")
    items = doc.get("labels")
    if not isinstance(items, list) or not 0 < len(items) <= MAX_LABELS_PER_REQUEST:
        raise ServingError(
            400,
            f"the request needs a 'labels' list of 1 to {MAX_LABELS_PER_REQUEST} entries",
            "bad_request",
        )
    out = []
    for item in items:
        if (
            not isinstance(item, dict)
            or not isinstance(item.get("prediction_id"), str)
            or "label" not in item
        ):
            raise ServingError(
                400,
                "every label needs a 'prediction_id' (from the infer "
                "response's parameters) and a 'label'",
                "bad_request",
            )
        out.append((item["prediction_id"], item["label"]))
    return out
