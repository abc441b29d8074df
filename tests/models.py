"""A small zoo of real models for converter tests and benchmarks.

Every builder is deterministic for a given seed and fast (well under a second
apart from the ONNX export of the torch models). Torch and scikit-learn are
imported inside the builders so importing this module stays light.

Builders:

* :func:`torch_cnn`: conv + batch norm + ReLU + max pool, conv + batch norm +
  ReLU + average pool, flatten *after a convolution* (so NCHW/NHWC handling
  matters), linear, briefly trained. Input ``x`` of shape ``[N, 3, 16, 16]``,
  4 logits out.
* :func:`torch_mlp`: linear/ReLU/linear/tanh/linear/softmax, input ``[N, 16]``,
  4 class probabilities out.
* :func:`sklearn_pipeline`: StandardScaler + LogisticRegression on 8 features,
  3 classes; :func:`random_forest` (classifier, same data) and
  :func:`random_forest_regressor`.
* :func:`onnx_helper_mlp`: an ONNX graph built with :mod:`onnx.helper`
  (MatMul, Add, Relu, Gemm, Softmax) with a dynamic batch dimension.
* :func:`torch_to_onnx`: plain ``torch.onnx.export`` of a module to a
  :class:`onnx.ModelProto` (dynamic batch, opset 18, no external data).

Each builder returns the model and a float32 sample batch drawn from the same
distribution the model was built or trained for, usable as calibration data.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

CNN_INPUT_SHAPE = (3, 16, 16)
CNN_CLASSES = 4
MLP_FEATURES = 16
MLP_CLASSES = 4
TABULAR_FEATURES = 8
TABULAR_CLASSES = 3
ONNX_MLP_FEATURES = 8
ONNX_MLP_CLASSES = 5


def image_data(n: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Image-like float32 inputs ``[n, 3, 16, 16]`` (a bright blob plus noise) and labels.

    The label is the quadrant the blob sits in (0..3).
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:16, 0:16].astype(np.float32) / 15.0
    out = np.empty((n, *CNN_INPUT_SHAPE), dtype=np.float32)
    labels = np.empty(n, dtype=np.int64)
    for i in range(n):
        cx, cy = rng.uniform(0.1, 0.9, size=2)
        labels[i] = int(cx >= 0.5) + 2 * int(cy >= 0.5)
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / rng.uniform(0.01, 0.05))
        for c in range(3):
            out[i, c] = blob * rng.uniform(0.5, 1.5) + rng.normal(0, 0.1, size=(16, 16))
    return out, labels


def image_batch(n: int = 64, seed: int = 0) -> np.ndarray:
    """Image-like float32 inputs ``[n, 3, 16, 16]`` (see :func:`image_data`)."""
    return image_data(n, seed)[0]


def _randomize_batch_norm(module: Any, seed: int) -> None:
    """Give batch norm layers non-trivial statistics so folding them is exercised."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    for layer in module.modules():
        if isinstance(layer, torch.nn.BatchNorm2d):
            n = layer.num_features
            assert layer.running_mean is not None and layer.running_var is not None
            with torch.no_grad():
                layer.running_mean.copy_(torch.randn(n, generator=gen) * 0.3)
                layer.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
                layer.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                layer.bias.copy_(torch.randn(n, generator=gen) * 0.2)


def torch_cnn(seed: int = 0) -> tuple[Any, np.ndarray]:
    """A small trained image classifier (eval mode) and 64 held-out image-like inputs.

    Trained for a fraction of a second on :func:`image_data` (which quadrant
    holds the blob); batch norm layers then get non-trivial statistics so
    that folding them is exercised.
    """
    import torch
    from torch import nn

    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 8, kernel_size=3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, kernel_size=3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, CNN_CLASSES),
    )
    _randomize_batch_norm(model, seed)
    model.eval()  # train the weights around fixed batch norm statistics
    images, labels = image_data(256, seed + 1)
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: more threads only contend on a busy machine
    try:
        for _ in range(30):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    return model, image_batch(64, seed)


def torch_mlp(seed: int = 0) -> tuple[Any, np.ndarray]:
    """A tabular classifier ending in softmax (eval mode) and 128 inputs ``[N, 16]``."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(MLP_FEATURES, 32),
        nn.ReLU(),
        nn.Linear(32, 32),
        nn.Tanh(),
        nn.Linear(32, MLP_CLASSES),
        nn.Softmax(dim=-1),
    )
    model.eval()
    rng = np.random.default_rng(seed)
    return model, rng.normal(0, 1, size=(128, MLP_FEATURES)).astype(np.float32)


def tabular_data(n: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A 3-class tabular problem with features on very different scales."""
    from sklearn.datasets import make_classification

    x, y = make_classification(
        n_samples=n,
        n_features=TABULAR_FEATURES,
        n_informative=5,
        n_redundant=1,
        n_classes=TABULAR_CLASSES,
        random_state=seed,
    )
    scales = np.array([1.0, 10.0, 0.1, 100.0, 1.0, 5.0, 0.5, 2.0])
    return (x * scales + scales).astype(np.float32), y


def sklearn_pipeline(seed: int = 0) -> tuple[Any, np.ndarray]:
    """StandardScaler + LogisticRegression, fitted; and its (float32) training inputs."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = tabular_data(seed=seed)
    pipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500))
    pipe.fit(x, y)
    return pipe, x


def random_forest(seed: int = 0) -> tuple[Any, np.ndarray]:
    """A small fitted RandomForestClassifier and its (float32) training inputs."""
    from sklearn.ensemble import RandomForestClassifier

    x, y = tabular_data(seed=seed)
    clf = RandomForestClassifier(n_estimators=12, max_depth=6, random_state=seed)
    clf.fit(x, y)
    return clf, x


def random_forest_regressor(seed: int = 0) -> tuple[Any, np.ndarray]:
    """A small fitted RandomForestRegressor and its (float32) training inputs."""
    from sklearn.ensemble import RandomForestRegressor

    x, y = tabular_data(seed=seed)
    target = x[:, 0] * 0.5 + np.sin(x[:, 2]) + y
    reg = RandomForestRegressor(n_estimators=12, max_depth=6, random_state=seed)
    reg.fit(x, target)
    return reg, x


def onnx_helper_mlp(
    seed: int = 0, opset: int = 17, ir_version: int | None = 8
) -> tuple[Any, np.ndarray]:
    """An MLP classifier written with :mod:`onnx.helper` and 128 inputs ``[N, 8]``.

    Graph: ``x -> MatMul(W1) -> Add(b1) -> Relu -> Gemm(W2, b2) -> Softmax -> probs``.
    ``ir_version=None`` keeps what the installed ``onnx`` writes by default, which
    can be newer than the installed onnxruntime accepts.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    hidden = 24
    w1 = rng.normal(0, 0.5, size=(ONNX_MLP_FEATURES, hidden)).astype(np.float32)
    b1 = rng.normal(0, 0.1, size=(hidden,)).astype(np.float32)
    w2 = rng.normal(0, 0.5, size=(hidden, ONNX_MLP_CLASSES)).astype(np.float32)
    b2 = rng.normal(0, 0.1, size=(ONNX_MLP_CLASSES,)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h0"], name="dense1"),
        helper.make_node("Add", ["h0", "b1"], ["h1"], name="bias1"),
        helper.make_node("Relu", ["h1"], ["h2"], name="relu1"),
        helper.make_node("Gemm", ["h2", "W2", "b2"], ["logits"], name="dense2"),
        helper.make_node("Softmax", ["logits"], ["probs"], name="softmax", axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "onnx_helper_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", ONNX_MLP_FEATURES])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", ONNX_MLP_CLASSES])],
        initializer=[
            numpy_helper.from_array(w1, "W1"),
            numpy_helper.from_array(b1, "b1"),
            numpy_helper.from_array(w2, "W2"),
            numpy_helper.from_array(b2, "b2"),
        ],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="edgefleet-tests"
    )
    if ir_version is not None:
        model.ir_version = ir_version
    onnx.checker.check_model(model)
    return model, rng.normal(0, 1, size=(128, ONNX_MLP_FEATURES)).astype(np.float32)


def torch_to_onnx(module: Any, example: np.ndarray, opset: int = 18) -> Any:
    """Export ``module`` to an in-memory :class:`onnx.ModelProto`.

    Input ``x`` and output ``y``, dynamic batch dimension, weights inline.
    """
    import torch

    x = torch.from_numpy(np.ascontiguousarray(example[:2]))
    program = torch.onnx.export(
        module,
        (x,),
        dynamo=True,
        opset_version=opset,
        input_names=["x"],
        output_names=["y"],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        external_data=False,
        optimize=True,
        verbose=False,
    )
    assert program is not None
    return program.model_proto


ZOO = ("cnn", "mlp", "pipeline", "forest", "forest_regressor", "onnx_mlp")


@functools.cache
def zoo_source(name: str) -> tuple[Any, np.ndarray]:
    """The zoo model ``name`` taken in by :mod:`converters.source`, and its samples.

    Cached per process: the torch export takes seconds and many tests share it.
    """
    from converters import source

    if name == "cnn":
        module, x = torch_cnn()
        return source.from_torch(module, x[:2]), x
    if name == "mlp":
        module, x = torch_mlp()
        return source.from_torch(module, x[:2]), x
    if name == "pipeline":
        est, x = sklearn_pipeline()
        return source.from_sklearn(est, x), x
    if name == "forest":
        est, x = random_forest()
        return source.from_sklearn(est, x), x
    if name == "forest_regressor":
        est, x = random_forest_regressor()
        return source.from_sklearn(est, x), x
    if name == "onnx_mlp":
        model, x = onnx_helper_mlp()
        return source.from_onnx(model), x
    raise KeyError(f"no zoo model {name!r}; one of {ZOO}")
