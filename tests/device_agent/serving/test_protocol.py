"""The Open Inference Protocol codec as pure functions: every numeric datatype both ways."""

from __future__ import annotations

import json

import numpy as np
import pytest

from device_agent.runtime import TensorSpec
from device_agent.serving.protocol import (
    DATATYPES,
    ServingError,
    decode_infer_request,
    encode_infer_response,
    tensor_metadata,
)

LIMIT = 1 << 20


def spec(dtype: np.dtype, shape: tuple[int | None, ...] = (None, 3)) -> list[TensorSpec]:
    return [TensorSpec("x", np.dtype(dtype), shape)]


def values(dtype: np.dtype) -> np.ndarray:
    if dtype == np.bool_:
        return np.array([[True, False, True], [False, False, True]])
    info = np.finfo(dtype) if dtype.kind == "f" else np.iinfo(dtype)
    return np.array([[info.min, 0, info.max], [1, 2, 3]], dtype=dtype)


@pytest.mark.parametrize("datatype", sorted(DATATYPES))
def test_every_datatype_round_trips_as_json_and_as_binary(datatype: str) -> None:
    dtype = DATATYPES[datatype]
    arr = values(dtype)
    as_json = {
        "inputs": [{"name": "x", "datatype": datatype, "shape": [2, 3], "data": arr.tolist()}]
    }
    req = decode_infer_request(
        json.dumps(as_json).encode(), None, spec(dtype), max_json_bytes=LIMIT
    )
    np.testing.assert_array_equal(req.feed["x"], arr)
    assert req.feed["x"].dtype == dtype

    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "datatype": datatype,
                    "shape": [2, 3],
                    "parameters": {"binary_data_size": arr.nbytes},
                }
            ],
            "outputs": [{"name": "y", "parameters": {"binary_data": True}}],
        }
    )
    body = header.encode() + arr.astype(dtype.newbyteorder("<")).tobytes()
    req = decode_infer_request(body, len(header), spec(dtype), max_json_bytes=LIMIT)
    np.testing.assert_array_equal(req.feed["x"], arr)

    out, hlen = encode_infer_response("m", 3, req, ["y"], [arr])
    assert hlen is not None
    doc = json.loads(out[:hlen])
    assert doc["outputs"][0]["datatype"] == datatype and doc["model_version"] == "3"
    back = np.frombuffer(out[hlen:], dtype.newbyteorder("<")).reshape(2, 3)
    np.testing.assert_array_equal(back, arr)


def test_open_dimensions_are_minus_one_in_metadata() -> None:
    (s,) = spec(np.dtype(np.float32), (None, 3, 32, 32))
    assert tensor_metadata(s) == {"name": "x", "datatype": "FP32", "shape": [-1, 3, 32, 32]}


def test_a_shape_whose_product_overflows_int64_is_refused_not_wrapped() -> None:
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "datatype": "FP32",
                    "shape": [2**61, 8, 3],
                    "parameters": {"binary_data_size": 0},
                }
            ]
        }
    )
    with pytest.raises(ServingError) as e:
        decode_infer_request(
            header.encode(),
            len(header),
            spec(np.dtype(np.float32), (None, None, 3)),
            max_json_bytes=LIMIT,
        )
    assert e.value.status == 400 and e.value.code == "bad_shape"


def test_json_outputs_unless_binary_is_asked_and_the_request_id_is_echoed() -> None:
    body = json.dumps(
        {
            "id": "abc",
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}],
        }
    )
    req = decode_infer_request(
        body.encode(), None, spec(np.dtype(np.float32)), max_json_bytes=LIMIT
    )
    out, hlen = encode_infer_response("m", 1, req, ["y"], [np.array([[0.5, 0.25]], np.float32)])
    assert hlen is None
    doc = json.loads(out)
    assert doc["id"] == "abc"
    assert doc["outputs"] == [
        {"name": "y", "datatype": "FP32", "shape": [1, 2], "data": [0.5, 0.25]}
    ]
