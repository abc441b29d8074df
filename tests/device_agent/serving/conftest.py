"""Fixtures of the endpoint tests (helpers live in :mod:`tests.device_agent.serving.kit`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from device_agent.model import LoadedModel
from tests.agent_models import add_onnx, mlp_onnx
from tests.device_agent.serving.kit import Signer


@pytest.fixture
def signer(tmp_path: Path) -> Signer:
    return Signer(tmp_path)


@pytest.fixture
def mlp(signer: Signer) -> LoadedModel:
    return signer.load(mlp_onnx(0))


@pytest.fixture
def adder(signer: Signer) -> LoadedModel:
    return signer.load(add_onnx(), name="add")
