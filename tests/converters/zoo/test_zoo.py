"""The architecture zoo converts: every architecture of ``architectures.py`` to ONNX and
TFLite float32 through the converters' pipeline, with held-out parity at batch 1.

Export: torch's TorchScript exporter at opset 18 with a dynamic batch (seconds per
model; the torch.export-based exporter that ``from_torch`` prefers takes 15 to 130 s a
model on a shared CI core and produces the same operators). The pipeline's parity gate
judges each artifact one sample at a time on inputs held out from the example batch;
the test then checks the artifact against torch itself on those inputs.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import pytest
import torch

from converters.pipeline import convert
from converters.source import from_onnx
from converters.targets import parse_target
from tests.converters.zoo.architectures import ARCHITECTURES, held_out

TARGETS = ("onnx:float32", "tflite:float32")
HELD_OUT = 6
# Against torch: float32 kernels sum in another order; relative to the output scale.
TORCH_REL = 1e-4


def export(module: torch.nn.Module, x: np.ndarray) -> onnx.ModelProto:
    """TorchScript export at opset 18 (GELU as Erf), dynamic batch."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (torch.from_numpy(x),),
            buf,
            dynamo=False,
            opset_version=18,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
        )
    return onnx.load_from_string(buf.getvalue())


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def built(request: pytest.FixtureRequest):
    module, x = ARCHITECTURES[request.param]()
    return request.param, module, x, export(module, x)


@pytest.mark.parametrize("target", TARGETS)
def test_architecture_converts_with_held_out_batch1_parity(built, target: str) -> None:
    name, module, x, model = built
    held = held_out(x, HELD_OUT)
    artifact = convert(
        from_onnx(model),
        parse_target(target),
        samples={"x": held_out(x, 8, seed=7)},
        validation_samples={"x": held},
    )
    report = artifact.parity
    assert report.passed, report.summary()
    assert report.samples == HELD_OUT
    assert report.batch_sizes[0] == 1
    with torch.no_grad():
        want = module(torch.from_numpy(held)).numpy()
    got = _run(artifact.data, target, held)
    scale = max(1.0, float(np.abs(want).max()))
    assert np.abs(got - want).max() <= TORCH_REL * scale, name


def _run(data: bytes, target: str, x: np.ndarray) -> np.ndarray:
    """Run the artifact one sample at a time (as devices do)."""
    if target.startswith("onnx"):
        import onnxruntime as ort

        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        return np.concatenate([session.run(None, {"x": x[i : i + 1]})[0] for i in range(len(x))])
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_content=data)
    interp.allocate_tensors()
    i, o = interp.get_input_details()[0]["index"], interp.get_output_details()[0]["index"]
    outs = []
    for k in range(len(x)):
        interp.set_tensor(i, x[k : k + 1])
        interp.invoke()
        outs.append(interp.get_tensor(o).copy())
    return np.concatenate(outs)


def test_zoo_exercises_the_new_operators() -> None:
    """The transformer, detector, U-Net and keyword spotter export to the operators this
    zoo exists to cover."""
    wanted = {
        "vit_tiny": {"LayerNormalization", "Erf", "Split", "MatMul", "Softmax"},
        "yolo_tiny": {"Resize", "Concat", "Sigmoid"},
        "unet": {"ConvTranspose", "Resize"},
        "kws_conv1d": {"Conv", "MaxPool"},
    }
    for name, ops in wanted.items():
        module, x = ARCHITECTURES[name]()
        model = export(module, x)
        assert ops <= {n.op_type for n in model.graph.node}, name
    kws = export(*ARCHITECTURES["kws_conv1d"]())
    conv_w = [i for i in kws.graph.initializer if i.dims and len(i.dims) == 3]
    assert conv_w, "the keyword spotter's convolutions are 1-D"
