"""The local inference endpoint in-process: a real Agent on real onnxruntime, real sockets.

Requests go over the endpoint's real Unix socket (and TCP for the token), as raw
HTTP where the test is about the wire (hostile requests, status codes, v2 error
bodies) and through :class:`ServingClient` where it is about the app's view.
"""

from __future__ import annotations

import json
import os
import socket
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from device_agent.agent import Agent, InputError, NoActiveModelError, PredictError
from device_agent.config import AgentConfig, ServingConfig
from device_agent.model import LoadedModel
from device_agent.serving import ServingEndpoint, ServingStartError
from device_agent.serving.client import ServingClient, ServingClientError
from tests.agent_models import mlp_onnx
from tests.brokers import free_port
from tests.device_agent.serving.kit import (
    Signer,
    infer_request,
    raw_request,
    read_response,
    status_and_json,
    x16,
)

INFER = "/v2/models/mlp/infer"


def reference(x: np.ndarray, seed: int = 0) -> np.ndarray:
    sess = ort.InferenceSession(mlp_onnx(seed), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]  # type: ignore[no-any-return]


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., tuple[Agent, ServingEndpoint]]]:
    started: list[tuple[Agent, ServingEndpoint]] = []

    def start(model: LoadedModel | None, **settings: Any) -> tuple[Agent, ServingEndpoint]:
        agent = Agent(AgentConfig(), None, model=model, start_worker=False)
        state = tmp_path / f"state-{len(started)}"
        state.mkdir()
        ep = ServingEndpoint(agent, ServingConfig(**settings), state).start()
        started.append((agent, ep))
        return agent, ep

    yield start
    for agent, ep in started:
        ep.stop()
        agent.close()


def sock(ep: ServingEndpoint) -> str:
    return str(ep.socket_path)


def binary_infer(x: np.ndarray, name: str = "x", datatype: str = "FP32") -> bytes:
    doc = {
        "inputs": [
            {
                "name": name,
                "datatype": datatype,
                "shape": list(x.shape),
                "parameters": {"binary_data_size": x.nbytes},
            }
        ],
        "parameters": {"binary_data_output": True},
    }
    return infer_request(INFER, doc, x.tobytes())


def json_infer(inputs: list[dict[str, Any]], **extra: Any) -> bytes:
    return infer_request(INFER, {"inputs": inputs, **extra})


def refusal(ep: ServingEndpoint, data: bytes) -> tuple[int, str, str]:
    status, body = status_and_json(raw_request(sock(ep), data))
    return status, body["error"], body["code"]


# -- what an app sees -------------------------------------------------------------


def test_client_predict_matches_in_process_predict_and_lands_in_the_same_telemetry(
    mlp: LoadedModel, serve: Any
) -> None:
    agent, ep = serve(mlp)
    x = x16(1)
    with ServingClient(ep.socket_path) as client:
        (via_socket,) = client.predict(x)
        named = client.predict_named(x)
        assert client.ready()
    (in_process,) = agent.predict(x)
    np.testing.assert_array_equal(via_socket, in_process)
    np.testing.assert_allclose(in_process, reference(x), rtol=1e-5)
    assert list(named) == ["probs"] and via_socket.flags.writeable
    active = agent.stats()["active"]
    assert active["count"] == 3 and active["errors"] == 0  # two through the socket, one direct


def test_json_and_binary_tensors_give_the_same_outputs(mlp: LoadedModel, serve: Any) -> None:
    _, ep = serve(mlp)
    x = x16(2, batch=3)
    status, doc = status_and_json(
        raw_request(
            sock(ep),
            json_infer(
                [{"name": "x", "datatype": "FP32", "shape": [3, 16], "data": x.tolist()}], id="r1"
            ),
        )
    )
    assert status == 200 and doc["id"] == "r1" and doc["model_version"] == "1"
    (out,) = doc["outputs"]
    as_json = np.asarray(out["data"], np.float32).reshape(out["shape"])

    response = raw_request(sock(ep), binary_infer(x))
    head, _, body = response.partition(b"\r\n\r\n")
    hlen = int(
        next(
            line.split(b":")[1]
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"inference-header-content-length")
        )
    )
    header = json.loads(body[:hlen])
    assert header["outputs"][0]["parameters"]["binary_data_size"] == 3 * 4 * 4
    as_binary = np.frombuffer(body[hlen:], np.float32).reshape(3, 4)
    np.testing.assert_array_equal(as_json, as_binary)
    np.testing.assert_allclose(as_binary, reference(x), rtol=1e-5)


def test_metadata_health_and_repository_index(mlp: LoadedModel, serve: Any) -> None:
    _, ep = serve(mlp)
    get = lambda p: status_and_json(  # noqa: E731
        raw_request(sock(ep), f"GET {p} HTTP/1.1\r\nHost: l\r\n\r\n".encode())
    )
    assert get("/v2/health/live") == (200, None)
    assert get("/v2/health/ready") == (200, None)
    assert get("/v2/models/mlp/ready") == (200, None)
    assert get("/v2/models/mlp/versions/1/ready") == (200, None)
    status, meta = get("/v2/models/mlp")
    assert status == 200 and meta["versions"] == ["1"] and meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 16]}]
    assert meta["outputs"] == [{"name": "probs", "datatype": "FP32", "shape": [-1, 4]}]
    status, server = get("/v2")
    assert status == 200 and "binary_tensor_data" in server["extensions"]
    assert get("/v2/models/other")[0] == 404
    assert get("/v2/models/mlp/versions/7")[0] == 404
    status, index = status_and_json(
        raw_request(sock(ep), b"POST /v2/repository/index HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}")
    )
    assert status == 200 and index == [{"name": "mlp", "version": "1", "state": "READY"}]


def test_socket_is_mode_0660_and_removed_on_stop(mlp: LoadedModel, serve: Any) -> None:
    _, ep = serve(mlp)
    st = os.stat(ep.socket_path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
    ep.stop()
    assert not ep.socket_path.exists()


def test_client_follows_a_swap_to_a_new_version(
    signer: Signer, mlp: LoadedModel, serve: Any
) -> None:
    agent, ep = serve(mlp)
    x = x16(3)
    client = ServingClient(ep.socket_path)
    np.testing.assert_allclose(client.predict(x)[0], reference(x, 0), rtol=1e-5)
    agent.swap(signer.load(mlp_onnx(1), version=2))
    np.testing.assert_allclose(client.predict(x)[0], reference(x, 1), rtol=1e-5)
    assert client.metadata(refresh=True)["versions"] == ["2"]
    client.close()


# -- refusals: v2 errors with status codes, and the endpoint keeps serving ----------------


def test_wrong_datatype_shape_and_inputs_are_refused_with_what_the_model_expects(
    mlp: LoadedModel, adder: LoadedModel, serve: Any
) -> None:
    _, ep = serve(mlp)
    x = x16(4)
    status, msg, code = refusal(ep, binary_infer(x.astype(np.float64), datatype="FP64"))
    assert (status, code) == (400, "bad_datatype") and "expects FP32" in msg
    status, msg, code = refusal(ep, binary_infer(np.zeros((1, 15), np.float32)))
    assert (status, code) == (400, "bad_shape") and "[-1, 16]" in msg
    status, msg, code = refusal(ep, binary_infer(x, name="y"))
    assert (status, code) == (400, "unknown_input") and "['x']" in msg
    status, msg, code = refusal(
        ep, json_infer([{"name": "x", "datatype": "FP32", "shape": [1, 16], "data": [1.0] * 15}])
    )
    assert (status, code) == (400, "bad_shape") and "15 values" in msg
    status, msg, code = refusal(
        ep, json_infer([{"name": "x", "datatype": "FP32", "shape": [1, 16], "data": ["a"] * 16}])
    )
    assert (status, code) == (400, "bad_data")
    status, msg, code = refusal(
        ep, json_infer([{"name": "x", "datatype": "BYTES", "shape": [1, 16], "data": ["a"] * 16}])
    )
    assert (status, code) == (400, "bad_datatype")
    status, msg, code = refusal(
        ep,
        json_infer(
            [{"name": "x", "datatype": "FP32", "shape": [1, 16], "data": [0.0] * 16}],
            outputs=[{"name": "nope"}],
        ),
    )
    assert (status, code) == (400, "unknown_output") and "probs" in msg

    _, ep2 = serve(adder)
    a = np.ones((1, 4), np.float32)
    doc = {"inputs": [{"name": "a", "datatype": "FP32", "shape": [1, 4], "data": a.tolist()}]}
    status, msg, code = refusal(ep2, infer_request("/v2/models/add/infer", doc))
    assert (status, code) == (400, "missing_input") and "'b'" in msg


def test_hostile_requests_get_clear_refusals_and_never_stop_the_endpoint(
    mlp: LoadedModel, serve: Any
) -> None:
    _, ep = serve(mlp, max_request_bytes=1 << 20, max_json_bytes=64 << 10)
    x = x16(5)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "datatype": "FP32",
                    "shape": [1, 16],
                    "parameters": {"binary_data_size": 64},
                }
            ]
        }
    ).encode()
    cases: list[tuple[bytes, int, str]] = [
        (
            b"POST " + INFER.encode() + b" HTTP/1.1\r\nContent-Length: 1000000000000\r\n\r\n",
            413,
            "too_large",
        ),
        (b"POST " + INFER.encode() + b" HTTP/1.1\r\nContent-Length: -5\r\n\r\n", 400, "bad_http"),
        (infer_request(INFER, {}).replace(b"{}", b"{x"), 400, "bad_json"),
        (
            b"POST "
            + INFER.encode()
            + b" HTTP/1.1\r\nContent-Length: 60000\r\n\r\n"
            + b"[" * 30000
            + b"]" * 30000,
            400,
            "bad_json",
        ),
        (
            b"POST "
            + INFER.encode()
            + b" HTTP/1.1\r\nContent-Length: 100000\r\n\r\n"
            + b" " * 100000,
            413,
            "too_large",
        ),
        (infer_request(INFER, {"inputs": "x"}), 400, "bad_request"),
        (
            infer_request(
                INFER,
                {
                    "inputs": [
                        {"name": "x", "datatype": "FP32", "shape": [2**62, 2**62], "data": []}
                    ]
                },
            ),
            400,
            "bad_shape",
        ),
        (
            b"POST "
            + INFER.encode()
            + b" HTTP/1.1\r\nContent-Length: "
            + str(len(header) + 64).encode()
            + b"\r\nInference-Header-Content-Length: 99999\r\n\r\n"
            + header
            + x.tobytes(),
            400,
            "bad_header_length",
        ),
        (
            b"POST "
            + INFER.encode()
            + b" HTTP/1.1\r\nContent-Length: "
            + str(len(header) + 65).encode()
            + b"\r\nInference-Header-Content-Length: "
            + str(len(header)).encode()
            + b"\r\n\r\n"
            + header
            + x.tobytes()
            + b"!",
            400,
            "bad_request",
        ),
        (
            b"POST " + INFER.encode() + b" HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            411,
            "length_required",
        ),
        (
            b"POST " + INFER.encode() + b" HTTP/1.1\r\nContent-Encoding: gzip\r\n"
            b"Content-Length: 3\r\n\r\nabc",
            415,
            "unsupported_encoding",
        ),
        (b"GET " + INFER.encode() + b" HTTP/1.1\r\n\r\n", 405, "method_not_allowed"),
        (b"GET /etc/passwd HTTP/1.1\r\n\r\n", 404, "not_found"),
        (b"\x16\x03\x01garbage that is no request line\r\n\r\n", 400, "bad_http"),
    ]
    for data, want_status, want_code in cases:
        status, body = status_and_json(raw_request(sock(ep), data))
        assert (status, body["code"]) == (want_status, want_code), (data[:80], body)
        assert body["error"]
    with ServingClient(ep.socket_path) as client:  # still serving, same answers
        np.testing.assert_allclose(client.predict(x)[0], reference(x), rtol=1e-5)


def test_a_request_that_stops_midway_times_out_without_holding_the_endpoint(
    mlp: LoadedModel, serve: Any
) -> None:
    _, ep = serve(mlp, timeout_seconds=0.5)
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(sock(ep))
        s.sendall(b"POST " + INFER.encode() + b" HTTP/1.1\r\nContent-Length: 500\r\n\r\n{")
        s.settimeout(5)
        status, body = status_and_json(read_response(s))
        assert (status, body["code"]) == (408, "timeout")
        assert s.recv(100) == b""  # and closed by the agent
    assert ServingClient(ep.socket_path).ready()


def test_connections_past_the_limit_get_503_and_the_slots_come_back(
    mlp: LoadedModel, serve: Any
) -> None:
    _, ep = serve(mlp, max_connections=2)
    held = [socket.socket(socket.AF_UNIX) for _ in range(2)]
    for s in held:
        s.connect(sock(ep))
        s.sendall(b"GET /v2/health/live HTTP/1.1\r\n\r\n")
        assert read_response(s).startswith(b"HTTP/1.1 200")  # served, kept alive
    with socket.socket(socket.AF_UNIX) as third:  # refused at once, before it says anything
        third.settimeout(10)
        third.connect(sock(ep))
        status, body = status_and_json(read_response(third))
    assert (status, body["code"]) == (503, "busy")
    for s in held:
        s.close()
    client = ServingClient(ep.socket_path)
    for _ in range(50):  # the handler threads notice the closed connections
        if client.ready():
            break
        import time

        time.sleep(0.05)
    assert client.ready()


def test_runtime_failure_is_500_predict_failed_and_counted(adder: LoadedModel, serve: Any) -> None:
    agent, ep = serve(adder)
    client = ServingClient(ep.socket_path)
    with pytest.raises(PredictError, match="failed"):
        client.predict({"a": np.ones((2, 4), np.float32), "b": np.ones((3, 4), np.float32)})
    assert agent.stats()["active"]["errors"] == 1
    with pytest.raises(InputError, match="pass a dict"):
        client.predict(np.ones((1, 4), np.float32))


def test_without_a_model_ready_is_503_and_predict_says_no_active_model(serve: Any) -> None:
    _, ep = serve(None)
    client = ServingClient(ep.socket_path)
    assert not client.ready()
    status, _, code = refusal(ep, binary_infer(x16(0)))
    assert (status, code) == (503, "no_active_model")
    with pytest.raises(NoActiveModelError):
        client.predict(x16(0))


def test_tcp_needs_the_token_from_a_0600_file(mlp: LoadedModel, serve: Any) -> None:
    _, ep = serve(mlp, tcp_port=free_port())
    assert ep.tcp_port and stat.S_IMODE(os.stat(ep.token_path).st_mode) == 0o600
    token = ServingClient.read_token(ep.token_path)
    addr = ("127.0.0.1", ep.tcp_port)
    ask = b"GET /v2/health/ready HTTP/1.1\r\n"
    status, body = status_and_json(raw_request(addr, ask + b"\r\n"))
    assert (status, body["code"]) == (401, "unauthorized") and "token_file" in body["error"]
    status, _ = status_and_json(raw_request(addr, ask + b"Authorization: Bearer nope\r\n\r\n"))
    assert status == 401
    status, _ = status_and_json(
        raw_request(addr, ask + f"Authorization: Bearer {token}\r\n\r\n".encode())
    )
    assert status == 200
    x = x16(6)
    with ServingClient(port=ep.tcp_port, token=token) as client:
        np.testing.assert_allclose(client.predict(x)[0], reference(x), rtol=1e-5)
    with pytest.raises(ServingClientError, match="401"):
        ServingClient(port=ep.tcp_port, token="wrong").predict(x)
    # the Unix socket needs no token: its file mode guards it
    assert ServingClient(ep.socket_path).ready()


def test_a_stale_socket_is_replaced_and_a_live_one_is_not_taken_over(
    mlp: LoadedModel, serve: Any, tmp_path: Path
) -> None:
    path = tmp_path / "s.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens: what a killed agent leaves
    _, ep = serve(mlp, socket=path)
    assert ServingClient(path).ready()
    agent = Agent(AgentConfig(), None, model=mlp, start_worker=False)
    try:
        with pytest.raises(ServingStartError, match="already serves"):
            ServingEndpoint(agent, ServingConfig(socket=path), tmp_path).start()
        assert ServingClient(path).ready()  # the running endpoint kept its socket
        (tmp_path / "plain").write_text("x")
        with pytest.raises(ServingStartError, match="not a socket"):
            ServingEndpoint(agent, ServingConfig(socket=tmp_path / "plain"), tmp_path).start()
    finally:
        agent.close()


def test_client_without_an_agent_says_how_to_start_one(tmp_path: Path) -> None:
    client = ServingClient(tmp_path / "nobody.sock")
    assert not client.ready()
    with pytest.raises(ServingClientError, match="edgefleet-agent run") as e:
        client.predict(x16(0))
    assert e.value.code == "unreachable"


def test_the_update_lock_refusal_points_to_the_endpoint(tmp_path: Path, signer: Signer) -> None:
    from device_agent.update import UpdateBusyError, Updater

    class Host:
        def swap(self, model: Any) -> None: ...

        def set_shadow(self, model: Any) -> None: ...

    first = Updater(tmp_path / "state", signer.trust, Host())
    first.lock()
    try:
        with pytest.raises(UpdateBusyError, match="ServingClient") as e:
            Updater(tmp_path / "state", signer.trust, Host()).lock()
        assert "serving.sock" in str(e.value)
    finally:
        first.unlock()


def test_prediction_ids_and_labels_through_the_endpoint(signer: Signer, serve: Any) -> None:
    from device_agent.agent import UnknownPredictionError
    from tests.agent_models import softmax_onnx

    agent, ep = serve(signer.load(softmax_onnx(), name="cls"))
    client = ServingClient(ep.socket_path)
    x = np.zeros((1, 4), np.float32)
    x[0, 2] = 5.0
    pid, (probs,) = client.predict_with_id(x)
    assert pid.startswith("cls-1-") and int(probs.argmax()) == 2
    assert client.label(pid, 2) is True
    with pytest.raises(UnknownPredictionError):
        client.label(pid, 2)  # labelled already
    other, _ = client.predict_with_id(x)
    with pytest.raises(InputError, match=r"\[0, 4\)"):
        client.label(other, 9)
    assert client.label(other, 1) is True  # a wrong prediction, labelled
    doc = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [0, 0, 0, 1]}]}
    status, body = status_and_json(
        raw_request(sock(ep), infer_request("/v2/models/cls/infer", doc))
    )
    assert status == 200 and body["parameters"]["prediction_id"].startswith("cls-1-")
    status, body = status_and_json(
        raw_request(
            sock(ep),
            infer_request(
                "/v2/models/cls/labels", {"labels": [{"prediction_id": "nope", "label": None}]}
            ),
        )
    )
    assert status == 200 and body["refused"][0]["code"] == "unknown_prediction"
    status, body = status_and_json(
        raw_request(sock(ep), infer_request("/v2/models/cls/labels", {"labels": "all of them"}))
    )
    assert (status, body["code"]) == (400, "bad_request")
    agent.telemetry.close_all()
    labels = agent.telemetry.recent[-1]["labels"]
    assert (labels["count"], labels["correct"]) == (2, 1)
    assert labels["confusion"][2][2] == 1 and labels["confusion"][1][2] == 1


def test_several_models_are_served_by_name(tmp_path: Path, signer: Signer) -> None:
    """A device running two models: one endpoint, each model through its own agent; the
    index lists both (one not installed yet as UNAVAILABLE), ready once both are."""
    det = Agent(AgentConfig(), None, model=signer.load(mlp_onnx(1), name="detector", version=3))
    cls = Agent(AgentConfig(), None, start_worker=False)
    state = tmp_path / "multi"
    state.mkdir()
    ep = ServingEndpoint({"detector": det, "classifier": cls}, ServingConfig(), state).start()
    try:
        index = ServingClient(sock(ep))._request("POST", "/v2/repository/index", b"{}")
        assert json.loads(index[2]) == [
            {"name": "detector", "version": "3", "state": "READY"},
            {"name": "classifier", "version": "", "state": "UNAVAILABLE"},
        ]
        assert not ServingClient(sock(ep)).ready()
        status, body = status_and_json(
            raw_request(sock(ep), infer_request("/v2/models/classifier/infer", {"inputs": []}))
        )
        assert status == 503 and body["code"] == "no_active_model" and "classifier" in body["error"]
        cls.swap(signer.load(mlp_onnx(2), name="classifier", version=7))
        assert ServingClient(sock(ep)).ready()
        x = x16(5)
        for name, agent in (("detector", det), ("classifier", cls)):
            with ServingClient(sock(ep), model=name) as client:
                assert client.metadata()["versions"] == [str(agent.model.version)]
                (out,) = client.predict(x)
                np.testing.assert_allclose(out, agent.predict(x)[0], rtol=1e-5, atol=1e-6)
        status, body = status_and_json(
            raw_request(sock(ep), infer_request("/v2/models/other/infer", {"inputs": []}))
        )
        assert status == 404 and body["code"] == "unknown_model"
        assert "'detector', 'classifier'" in body["error"]
    finally:
        ep.stop()
        det.close()
        cls.close()
