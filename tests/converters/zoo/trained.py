"""Zoo architectures trained briefly in the test on data where accuracy means something.

* images: scikit-learn's digits (8 x 8, 1,797 images) upscaled to 3 x 16 x 16,
  standardised; 1,300 for training and calibration, 497 held out;
* keywords: a synthetic keyword set of 12 classes on 40 mel bands x 49 frames: each
  class is a fixed pattern of three formant-like blobs; a sample is its pattern shifted
  by up to 4 frames, scaled by 0.7 to 1.3, plus noise (1,200 training, 400 held out).

Training is a few epochs of Adam on one thread (seconds per model on a CI core).
SqueezeNet is not among them: at 16 x 16 its feature map is 1 x 1 after the second
pool and four epochs leave it near chance (0.20), where agreement means nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from tests.converters.zoo.architectures import (
    EfficientNetB0,
    KwsConv1d,
    MobileNetV2,
    ResNet18,
)


@dataclass
class Dataset:
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray


def digits() -> Dataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.kron(d.images / 16.0, np.ones((2, 2))).astype(np.float32)[:, None]
    x = ((np.repeat(x, 3, axis=1) - 0.3) / 0.4).astype(np.float32)
    idx = np.random.default_rng(0).permutation(len(x))
    tr, te = idx[:1300], idx[1300:]
    return Dataset(x[tr], d.target[tr], x[te], d.target[te])


def keywords(classes: int = 12, mels: int = 40, frames: int = 49) -> Dataset:
    rng = np.random.default_rng(1)
    m, t = np.meshgrid(np.arange(mels), np.arange(frames), indexing="ij")
    patterns = []
    for _ in range(classes):
        p = np.zeros((mels, frames))
        for _ in range(3):
            cm, ct = rng.uniform(4, mels - 4), rng.uniform(10, frames - 10)
            p += np.exp(-((m - cm) ** 2) / 8 - ((t - ct) ** 2) / 30)
        patterns.append(p)
    n = 1600
    y = rng.integers(0, classes, size=n)
    shifts = rng.integers(-4, 5, size=n)
    gains = rng.uniform(0.7, 1.3, size=n)
    x = np.stack(
        [np.roll(patterns[c], s, axis=1) * g for c, s, g in zip(y, shifts, gains, strict=True)]
    )
    x = (x + rng.normal(0, 0.3, size=x.shape)).astype(np.float32)
    return Dataset(x[:1200], y[:1200], x[1200:], y[1200:])


class DigitsCNN(nn.Module):
    """The small CNN of the brief: two convolutions and a dense layer."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 16, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


#: name -> (module class, dataset, epochs, learning rate)
TRAINED = {
    "digits_cnn": (DigitsCNN, digits, 3, 3e-3),
    "mobilenet_v2": (MobileNetV2, digits, 3, 3e-3),
    "resnet18": (ResNet18, digits, 3, 3e-3),
    "efficientnet_b0": (EfficientNetB0, digits, 3, 3e-3),
    "kws_conv1d": (KwsConv1d, keywords, 3, 3e-3),
}

_DATA: dict[str, Dataset] = {}


def dataset(name: str) -> Dataset:
    make = TRAINED[name][1]
    if make.__name__ not in _DATA:
        _DATA[make.__name__] = make()
    return _DATA[make.__name__]


def train(name: str, seed: int = 0) -> tuple[nn.Module, Dataset]:
    """The architecture ``name`` trained on its dataset (eval mode)."""
    cls, _, epochs, lr = TRAINED[name]
    data = dataset(name)
    torch.manual_seed(seed)
    return fit(cls(), data, epochs, lr, seed), data


def fit(module: nn.Module, data: Dataset, epochs: int, lr: float, seed: int = 0) -> nn.Module:
    """``module`` trained with Adam on ``data`` (batches of 32, one thread), in eval mode.
    Seed torch before building ``module``: its initial weights and dropout draw from it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        opt = torch.optim.Adam(module.parameters(), lr)
        rng = np.random.default_rng(seed)
        module.train()
        for _ in range(epochs):
            order = rng.permutation(len(data.train_x))
            for i in range(0, len(order), 32):
                b = order[i : i + 32]
                loss = nn.functional.cross_entropy(
                    module(torch.from_numpy(data.train_x[b])), torch.from_numpy(data.train_y[b])
                )
                opt.zero_grad()
                loss.backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    return module.eval()
