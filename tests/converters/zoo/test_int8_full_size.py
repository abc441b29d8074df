"""``tflite:int8-full`` on trained models wide enough for weights to dominate the file:
held-out top-1 agreement with float32 >= 0.98 on ai-edge-litert, and about a quarter of
the float32 size (tests/converters/zoo/wide.py says why the zoo's own widths cannot be).

Each model is trained for a few epochs in the test, exported to ONNX, written as float32
TFLite and as full-integer int8 calibrated on 200 training samples; both run one held-out
sample at a time. The size bound of each architecture is the ratio measured on this code
plus a small margin (measured: mlp 0.255, digits CNN 0.292, ResNet-18 0.285, Conv1d
keyword spotter 0.284, transformer encoder 0.314).
"""

from __future__ import annotations

import numpy as np
import pytest
import tflite

from converters.tflite import onnx_to_tflite
from converters.tflite.quantize_full import onnx_to_tflite_int8_full
from tests.converters.tflite.test_int8_full import export, run
from tests.converters.zoo.wide import train_wide

#: architecture -> largest int8-full / float32 size ratio accepted.
BOUNDS = {
    "mlp": 0.27,
    "digits_cnn_wide": 0.30,
    "resnet18": 0.30,
    "kws_conv1d_wide": 0.30,
    # LayerNorm, attention and GELU add ~130 small tensors whose tables weigh the same
    # in both files (22 KB of its 95); the dense weights (per-tensor scales) are int8.
    "vit_digits": 0.33,
}


@pytest.fixture(scope="module", params=sorted(BOUNDS))
def converted(request: pytest.FixtureRequest):
    module, data = train_wide(request.param)
    model = export(module, data.train_x)
    f32 = onnx_to_tflite(model)
    q, report = onnx_to_tflite_int8_full(model, data.train_x[:200])
    return request.param, data, f32, q, report


def test_wide_int8_full_agrees_and_is_a_quarter_of_float32(converted) -> None:
    name, data, f32, q, report = converted
    pf, pq = run(f32, data.test_x), run(q, data.test_x)
    accuracy = (pf.argmax(1) == data.test_y).mean()
    assert accuracy >= 0.8, f"{name} did not train ({accuracy:.3f}); agreement would mean little"
    agreement = (pf.argmax(1) == pq.argmax(1)).mean()
    assert agreement >= 0.98, f"{name}: top-1 agreement {agreement:.4f}"
    ratio = len(q) / len(f32)
    assert ratio <= BOUNDS[name], f"{name}: int8-full is {ratio:.3f} of float32"
    # Every weight is int8 and no float32 constant is left beside it.
    m = tflite.Model.GetRootAsModel(q, 0)
    sg = m.Subgraphs(0)
    float_constants = [
        i
        for i in range(sg.TensorsLength())
        if sg.Tensors(i).Type() == tflite.TensorType.FLOAT32
        and m.Buffers(sg.Tensors(i).Buffer()).DataLength() > 0
    ]
    assert float_constants == [], name
    assert report.weights_quantized > 0
    # Integer throughout, the transformer's LayerNorm (RSQRT) and attention included.
    assert report.float_operators == [], (name, report.float_operators)


def test_recurrent_int8_full_keeps_no_float_weights_and_one_bias_per_weight() -> None:
    """An unrolled GRU's first step multiplies the zero initial state by the recurrent
    weights: that product is folded to a constant instead of keeping a float32 copy of
    the weights, and every step's input shares one range so one int32 bias serves all
    steps (before: a float FULLY_CONNECTED, a float32 copy of the weights and 24 bias
    copies; the file was 1.14x the float32 one)."""
    from tests.converters.zoo.architectures import ARCHITECTURES, held_out

    module, x = ARCHITECTURES["kws_gru"]()
    model = export(module, x)
    f32 = onnx_to_tflite(model)
    q, report = onnx_to_tflite_int8_full(model, held_out(x, 32, seed=7))
    assert report.float_operators == []
    m = tflite.Model.GetRootAsModel(q, 0)
    sg = m.Subgraphs(0)
    consts = [
        sg.Tensors(i)
        for i in range(sg.TensorsLength())
        if m.Buffers(sg.Tensors(i).Buffer()).DataLength() > 0
    ]
    assert not [t for t in consts if t.Type() == tflite.TensorType.FLOAT32]
    fc = tflite.BuiltinOperator.FULLY_CONNECTED
    bias_buffers = {
        sg.Tensors(op.Inputs(2)).Buffer()
        for op in (sg.Operators(k) for k in range(sg.OperatorsLength()))
        if m.OperatorCodes(op.OpcodeIndex()).BuiltinCode() == fc and op.Inputs(2) >= 0
    }
    # input-to-hidden, hidden-to-hidden and the classifier's: one each
    assert len(bias_buffers) <= 3, len(bias_buffers)
    assert len(q) / len(f32) <= 0.9
    held = held_out(x, 64)
    want = run(f32, held)
    got = run(q, held)
    assert np.abs(got - want).mean() <= 0.05 * np.abs(want).max()


def test_transformer_int8_full_runs_on_legacy_tflite_runtime(tmp_path) -> None:
    """The encoder's int8 kernels (LayerNorm as MEAN, SUB, MUL, RSQRT; BATCH_MATMUL,
    SOFTMAX, GELU) run on the legacy tflite-runtime 2.14 too."""
    import subprocess

    from tests.converters.tflite.test_builder_legacy_runtime import _build_legacy_venv

    module, data = train_wide("vit_digits")
    model = export(module, data.train_x)
    q, _ = onnx_to_tflite_int8_full(model, data.train_x[:200])
    (tmp_path / "m.tflite").write_bytes(q)
    x = data.test_x[:100]
    np.save(tmp_path / "x.npy", x)
    script = (
        "import sys, numpy as np\n"
        "from tflite_runtime.interpreter import Interpreter\n"
        "it = Interpreter(model_path=sys.argv[1] + '/m.tflite'); it.allocate_tensors()\n"
        "i, o = it.get_input_details()[0]['index'], it.get_output_details()[0]['index']\n"
        "x = np.load(sys.argv[1] + '/x.npy'); outs = []\n"
        "for k in range(len(x)):\n"
        "    it.set_tensor(i, x[k:k+1]); it.invoke(); outs.append(it.get_tensor(o).copy())\n"
        "np.save(sys.argv[1] + '/y.npy', np.concatenate(outs))\n"
    )
    python = _build_legacy_venv()
    subprocess.run([str(python), "-c", script, str(tmp_path)], check=True, timeout=300)
    legacy = np.load(tmp_path / "y.npy")
    current = run(q, x)
    assert (legacy.argmax(1) == current.argmax(1)).mean() >= 0.98
