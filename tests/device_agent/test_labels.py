"""Label feedback on the device: prediction ids, true labels posted later, and the window's
accuracy and confusion summary, accepted by the server's wire contract.

A real softmax classifier (its predicted class is the argmax of its input) on real
onnxruntime, through the verify-unpack-load path a device takes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_agent.agent import Agent, InputError, UnknownPredictionError
from device_agent.bundle import TrustStore
from device_agent.config import AgentConfig
from device_agent.model import LoadedModel
from fleet_server.ingest.contract import check_message
from tests.agent_models import install, make_bundle, softmax_onnx


def _load(tmp_path: Path, data: bytes, version: int = 1) -> LoadedModel:
    key = Ed25519PrivateKey.generate()
    trust = TrustStore()
    trust.add(key.public_key(), comment="test")
    bundle = make_bundle(tmp_path, key, model_bytes=data, name="cls", version=version)
    return install(bundle, tmp_path / f"slot-{version}", trust, "a")


def one_hot(cls: int, rows: int = 1) -> np.ndarray:
    x = np.zeros((rows, 4), np.float32)
    x[:, cls] = 5.0
    return x


@pytest.fixture
def agent(tmp_path: Path) -> Any:
    a = Agent(AgentConfig(), None, model=_load(tmp_path, softmax_onnx()), start_worker=False)
    yield a
    a.close()


def closed_summary(agent: Agent) -> dict[str, Any]:
    agent.telemetry.close_all()
    return agent.telemetry.recent[-1]


def test_labels_give_the_window_accuracy_and_confusion(agent: Agent) -> None:
    truth_and_pred = [(0, 0), (1, 1), (2, 1), (3, 3), (1, 0)]  # 3 right, 2 wrong
    ids = []
    for true, pred in truth_and_pred:
        pid, out = agent.predict_with_id(one_hot(pred))
        assert int(out[0].argmax()) == pred
        ids.append((pid, true))
    _, _ = agent.predict_with_id(one_hot(2))  # never labelled: not counted
    for pid, true in ids:
        assert agent.label(pid, true) is True
    body = closed_summary(agent)
    assert body["count"] == 6
    labels = body["labels"]
    assert labels["count"] == 5 and labels["correct"] == 3
    assert labels["labelled"] == [1, 2, 1, 1]
    assert labels["correct_by_class"] == [1, 1, 0, 1]
    assert labels["confusion"][2] == [0, 1, 0, 0] and labels["confusion"][1] == [1, 1, 0, 0]
    message = {
        "device_id": "d",
        "records": [{"seq": 1, "kind": "summary", "ts": 1.0, "body": body}],
    }
    assert check_message(json.dumps(message).encode(), "d") == {}  # the server takes it


def test_a_batched_prediction_takes_one_label_per_row(agent: Agent) -> None:
    x = np.concatenate([one_hot(0), one_hot(3), one_hot(3)])
    pid, _ = agent.predict_with_id(x)
    with pytest.raises(InputError, match="2 labels for a prediction of 3 rows"):
        agent.label(pid, [0, 3])
    assert agent.label(pid, [0, 3, 2]) is True  # a refused label leaves the id open
    labels = closed_summary(agent)["labels"]
    assert (labels["count"], labels["correct"]) == (3, 2)


def test_unknown_repeated_expired_and_out_of_range_labels_are_refused(agent: Agent) -> None:
    with pytest.raises(UnknownPredictionError, match="never issued"):
        agent.label("cls-1-999", 0)
    pid, _ = agent.predict_with_id(one_hot(1))
    with pytest.raises(InputError, match=r"\[0, 4\)"):
        agent.label(pid, 7)
    with pytest.raises(InputError):
        agent.label(pid, True)  # type: ignore[arg-type]
    assert agent.label(pid, 1) is True
    with pytest.raises(UnknownPredictionError):
        agent.label(pid, 1)  # already labelled
    agent.max_pending_labels = 2
    first, _ = agent.predict_with_id(one_hot(0))
    agent.predict_with_id(one_hot(0))
    agent.predict_with_id(one_hot(0))
    with pytest.raises(UnknownPredictionError, match="older than the last 2"):
        agent.label(first, 0)


def test_a_label_for_a_model_swapped_out_is_not_counted(agent: Agent, tmp_path: Path) -> None:
    pid, _ = agent.predict_with_id(one_hot(2))
    agent.swap(_load(tmp_path, softmax_onnx(), version=2))
    assert agent.label(pid, 2) is False
    assert "labels" not in closed_summary(agent)


def regression_onnx() -> bytes:
    """``y = x @ w`` over ``[batch, 4] -> [batch, 1]``: one number out, not a classifier."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((4, 1), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "reg",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()  # type: ignore[no-any-return]


def test_a_regression_model_takes_no_labels(tmp_path: Path) -> None:
    agent = Agent(AgentConfig(), None, model=_load(tmp_path, regression_onnx()), start_worker=False)
    try:
        pid, out = agent.predict_with_id(np.ones((1, 4), np.float32))
        assert out[0].shape == (1, 1)
        with pytest.raises(InputError, match="not a classifier"):
            agent.label(pid, 0)
        with pytest.raises(UnknownPredictionError):
            agent.label(pid, 0)  # refused for good: nothing to correct
    finally:
        agent.close()
