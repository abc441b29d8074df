"""Trained architectures at widths where weights dominate the TFLite file.

The zoo's widths (``architectures.py``) keep CI fast, but at 8 to 32 channels a
full-integer int8 file is mostly what TFLite stores around the weights: each output
channel of a convolution carries a weight scale and zero point (4 + 8 bytes), an int32
bias and the bias's scale and zero point (4 + 4 + 8), 28 bytes against the 4-byte float32
bias it replaces, besides every tensor's table and shape. A 1x1 convolution over 8 input
channels stores 8 int8 weight bytes per output channel next to those 28, so no int8 file
of such a layer can be a quarter of its float32 size. The variants here are wide enough
(tens to hundreds of thousands of weights, 1x1 convolutions over 64+ channels) for the
weights to be most of the file, as they are in deployed models, and still train in
seconds on one CPU thread (digits as 3 x 16 x 16 images, the synthetic keyword set).
A SqueezeNet-style net (fire modules) was tried at 16 x 16 and left out: three epochs
left it at 0.36 held-out accuracy, where agreement means little.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from tests.converters.zoo.architectures import KwsGRU, KwsLSTM, ResNet18, ViTTiny
from tests.converters.zoo.trained import Dataset, digits, fit, keywords


class MLP(nn.Module):
    """Dense layers on the flattened 3 x 16 x 16 image."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(768, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
            nn.Linear(128, 10),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class DigitsCNNWide(nn.Module):
    """The digits CNN with 32 and 64 channels."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 16, 10),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class KwsConv1dWide(nn.Module):
    """A Conv1d keyword spotter with 96 and 128 channels."""

    def __init__(self, classes: int = 12, mels: int = 40) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv1d(mels, 96, 5, padding=2, bias=False), nn.BatchNorm1d(96), nn.ReLU(),
            nn.MaxPool1d(2),
            nn.Conv1d(96, 128, 3, padding=1), nn.ReLU(),
            nn.Conv1d(128, 128, 3, stride=2, padding=1), nn.ReLU(),
        )  # fmt: skip
        self.fc = nn.Linear(128, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.net(x).mean(-1))


class ViTDigits(ViTTiny):
    """The zoo's ViT-tiny at dim 64 with 4 x 4 patches: 16 tokens of a 16 x 16 image."""

    def __init__(self) -> None:
        super().__init__(dim=64, depth=2, heads=4)
        self.patch = nn.Conv2d(3, 64, 4, 4)


#: name -> (module class, dataset, epochs, learning rate)
WIDE: dict[str, tuple[Callable[[], nn.Module], Callable[[], Dataset], int, float]] = {
    "mlp": (MLP, digits, 3, 1e-3),
    "digits_cnn_wide": (DigitsCNNWide, digits, 2, 3e-3),
    "resnet18": (ResNet18, digits, 3, 3e-3),
    "kws_conv1d_wide": (KwsConv1dWide, keywords, 2, 2e-3),
    "vit_digits": (ViTDigits, digits, 4, 1e-3),
}

#: The zoo's recurrent keyword spotters at zoo width, trained for the benchmark: unrolled
#: over 24 steps, their files are mostly per-tensor tables (see docs/tflite-reach.md).
RECURRENT: dict[str, tuple[Callable[[], nn.Module], Callable[[], Dataset], int, float]] = {
    "kws_gru": (KwsGRU, keywords, 3, 3e-3),
    "kws_lstm": (KwsLSTM, keywords, 3, 3e-3),
}

_DATA: dict[str, Dataset] = {}
_MODELS: dict[tuple[str, int], nn.Module] = {}


def train_wide(name: str, seed: int = 0) -> tuple[nn.Module, Dataset]:
    """The architecture ``name`` of :data:`WIDE` or :data:`RECURRENT` trained on its
    dataset (eval mode). Training is deterministic, so a model is trained once per
    process and shared: callers must not change it."""
    cls, make, epochs, lr = WIDE[name] if name in WIDE else RECURRENT[name]
    if make.__name__ not in _DATA:
        _DATA[make.__name__] = make()
    data = _DATA[make.__name__]
    if (name, seed) not in _MODELS:
        torch.manual_seed(seed)
        _MODELS[(name, seed)] = fit(cls(), data, epochs, lr, seed)
    return _MODELS[(name, seed)], data
