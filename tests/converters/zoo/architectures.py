"""Small versions of the architectures edge users bring, built with torch (no downloads).

Each builder returns ``(module, example_input)``: a module in eval mode with random
weights (seeded), and a float32 input batch in NCHW (images) or NCL (audio). Widths
are small so the whole zoo converts in CI in well under two minutes; the structure
(the operators each architecture exports to) is the real one:

* ``mobilenet_v2``: inverted residuals (1x1 expand, depthwise 3x3, 1x1 project), ReLU6;
* ``resnet18``: basic blocks [2, 2, 2, 2] with strided 1x1 shortcuts;
* ``efficientnet_b0``: MBConv with SiLU and squeeze-excite (mean, 1x1 convs, sigmoid);
* ``squeezenet``: fire modules (squeeze 1x1, expand 1x1 and 3x3, concat), ceil-free pools;
* ``vit_tiny``: patch embedding conv, learned positions, pre-norm encoder blocks
  (LayerNorm, multi-head attention with softmax, GELU MLP), mean pooling;
* ``yolo_tiny``: conv backbone, nearest upsampling, concatenated feature maps, two
  heads with sigmoid outputs concatenated into one ``[N, anchors, 5 + classes]`` tensor;
* ``unet``: encoder / decoder with skip concatenations, one decoder stage through
  ``ConvTranspose2d`` and one through bilinear upsampling;
* ``kws_conv1d``: a Conv1d keyword spotter on 40 x 49 log-mel frames (BatchNorm1d,
  ReLU, max pooling, mean over time);
* ``kws_gru`` / ``kws_lstm``: a Conv1d front end and a GRU / LSTM over 24 frames
  (unrolled by the TFLite writer, see ``converters/tflite/ops_seq.py``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

IMAGE = (3, 32, 32)


def _image(batch: int = 2, shape: tuple[int, ...] = IMAGE, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, size=(batch, *shape)).astype(np.float32)


def _finish(module: nn.Module, seed: int) -> nn.Module:
    """Random but non-trivial weights: batch-norm statistics that are not 0 / 1."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.75)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.75)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return module.eval()


def _cbr(
    cin: int, cout: int, k: int = 3, s: int = 1, groups: int = 1, act=nn.ReLU
) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), act()
    )


# --- MobileNetV2 ------------------------------------------------------------------------


class _InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(_cbr(cin, hidden, 1, act=nn.ReLU6))
        layers += [
            _cbr(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        cfg = [(1, 8, 1, 1), (6, 12, 2, 2), (6, 16, 2, 2), (6, 24, 1, 2), (6, 32, 1, 1)]
        layers: list[nn.Module] = [_cbr(3, 16, 3, 2, act=nn.ReLU6)]
        cin = 16
        for t, c, n, s in cfg:
            for i in range(n):
                layers.append(_InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(_cbr(cin, 64, 1, act=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(64, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return self.classifier(x.mean((2, 3)))


# --- ResNet-18 --------------------------------------------------------------------------


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.c1 = _cbr(cin, cout, 3, stride)
        self.c2 = nn.Sequential(nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.down = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.c2(self.c1(x)) + self.down(x))


class ResNet18(nn.Module):
    def __init__(self, classes: int = 10, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(_cbr(3, width, 3, 1), nn.MaxPool2d(3, 2, 1))
        blocks: list[nn.Module] = []
        cin = width
        for i, mult in enumerate((1, 2, 4, 8)):
            cout = width * mult
            for j in range(2):
                blocks.append(_BasicBlock(cin, cout, 2 if j == 0 and i > 0 else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# --- EfficientNet-B0 style --------------------------------------------------------------


class _SqueezeExcite(nn.Module):
    def __init__(self, c: int, squeezed: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(c, squeezed, 1)
        self.expand = nn.Conv2d(squeezed, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.expand(F.silu(self.reduce(s))))


class _MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(_cbr(cin, hidden, 1, act=nn.SiLU))
        layers += [
            _cbr(hidden, hidden, k, stride, groups=hidden, act=nn.SiLU),
            _SqueezeExcite(hidden, max(1, cin // 4)),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.use_res else self.block(x)


class EfficientNetB0(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        cfg = [
            (1, 8, 1, 1, 3),
            (6, 12, 2, 2, 3),
            (6, 16, 2, 2, 5),
            (6, 24, 1, 2, 3),
            (6, 32, 1, 1, 5),
        ]
        layers: list[nn.Module] = [_cbr(3, 16, 3, 2, act=nn.SiLU)]
        cin = 16
        for t, c, n, s, k in cfg:
            for i in range(n):
                layers.append(_MBConv(cin, c, k, s if i == 0 else 1, t))
                cin = c
        layers.append(_cbr(cin, 64, 1, act=nn.SiLU))
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


# --- SqueezeNet -------------------------------------------------------------------------


class _Fire(nn.Module):
    def __init__(self, cin: int, squeeze: int, expand: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(cin, squeeze, 1)
        self.e1 = nn.Conv2d(squeeze, expand, 1)
        self.e3 = nn.Conv2d(squeeze, expand, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.relu(self.squeeze(x))
        return torch.cat([F.relu(self.e1(s)), F.relu(self.e3(s))], 1)


class SqueezeNet(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 24, 3, 2),
            nn.ReLU(),
            nn.MaxPool2d(3, 2),
            _Fire(24, 8, 16),
            _Fire(32, 8, 16),
            nn.MaxPool2d(3, 2),
            _Fire(32, 12, 24),
            _Fire(48, 12, 24),
        )
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(48, classes, 1), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(F.adaptive_avg_pool2d(self.classifier(self.features(x)), 1), 1)


# --- ViT-tiny ---------------------------------------------------------------------------


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.dh = heads, dim // heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)

        def heads(z: torch.Tensor) -> torch.Tensor:
            return z.reshape(b, t, self.heads, self.dh).transpose(1, 2)

        q, k, v = heads(q), heads(k), heads(v)
        att = torch.softmax(q @ k.transpose(-2, -1) * self.dh**-0.5, dim=-1)
        return self.proj((att @ v).transpose(1, 2).reshape(b, t, d))


class _EncoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.att = _Attention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.att(self.n1(x))
        return x + self.mlp(self.n2(x))


class ViTTiny(nn.Module):
    def __init__(self, classes: int = 10, dim: int = 32, depth: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 8, 8)
        self.pos = nn.Parameter(torch.randn(1, 16, dim) * 0.1)
        self.blocks = nn.Sequential(*[_EncoderBlock(dim, heads, dim * 2) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        x = self.norm(self.blocks(x))
        return self.head(x.mean(1))


# --- tiny YOLO-style detector -----------------------------------------------------------


class YoloTiny(nn.Module):
    """Two detection scales: 4x4 and (upsampled + concatenated) 8x8, sigmoid outputs."""

    def __init__(self, classes: int = 3, anchors: int = 2) -> None:
        super().__init__()
        self.no = 5 + classes
        self.anchors = anchors
        self.b1 = nn.Sequential(
            _cbr(3, 8, 3, 2, act=nn.LeakyReLU), _cbr(8, 16, 3, 2, act=nn.LeakyReLU)
        )
        self.b2 = nn.Sequential(_cbr(16, 24, 3, 2, act=nn.LeakyReLU))
        self.b3 = nn.Sequential(nn.MaxPool2d(2, 2), _cbr(24, 32, 3, 1, act=nn.LeakyReLU))
        self.lateral = _cbr(32, 16, 1, act=nn.LeakyReLU)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.head_small = nn.Conv2d(32, anchors * self.no, 1)
        self.head_large = nn.Conv2d(16 + 24, anchors * self.no, 1)

    def _flat(self, p: torch.Tensor) -> torch.Tensor:
        b, _, h, w = p.shape
        return (
            p.reshape(b, self.anchors, self.no, h * w).permute(0, 1, 3, 2).reshape(b, -1, self.no)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f2 = self.b2(self.b1(x))
        f3 = self.b3(f2)
        large = torch.cat([self.up(self.lateral(f3)), f2], 1)
        out = torch.cat([self._flat(self.head_small(f3)), self._flat(self.head_large(large))], 1)
        return torch.sigmoid(out)


# --- U-Net ------------------------------------------------------------------------------


class UNet(nn.Module):
    def __init__(self, classes: int = 2, w: int = 8) -> None:
        super().__init__()

        def double(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(_cbr(cin, cout), _cbr(cout, cout))

        self.e1, self.e2, self.e3 = double(3, w), double(w, 2 * w), double(2 * w, 4 * w)
        self.up2 = nn.ConvTranspose2d(4 * w, 2 * w, 2, 2)
        self.d2 = double(4 * w, 2 * w)
        self.up1 = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.d1 = double(2 * w + w, w)
        self.out = nn.Conv2d(w, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s1 = self.e1(x)
        s2 = self.e2(F.max_pool2d(s1, 2))
        b = self.e3(F.max_pool2d(s2, 2))
        d2 = self.d2(torch.cat([self.up2(b), s2], 1))
        d1 = self.d1(torch.cat([self.up1(d2), s1], 1))
        return self.out(d1)


# --- Conv1d keyword spotter -------------------------------------------------------------


class KwsConv1d(nn.Module):
    def __init__(self, classes: int = 12, mels: int = 40) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv1d(mels, 32, 5, padding=2, bias=False),
            nn.BatchNorm1d(32),
            nn.ReLU(),
            nn.MaxPool1d(2),
            nn.Conv1d(32, 32, 3, padding=2, dilation=2, groups=32),
            nn.Conv1d(32, 48, 1),
            nn.ReLU(),
            nn.Conv1d(48, 48, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.fc = nn.Linear(48, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.net(x).mean(-1))


class KwsRecurrent(nn.Module):
    """Conv1d front end, then a GRU or LSTM over the 25 pooled frames (batch_first, as
    keyword spotters write it), classified from the last hidden state."""

    def __init__(self, cell: str = "gru", classes: int = 12, mels: int = 40) -> None:
        super().__init__()
        self.front = nn.Sequential(
            nn.Conv1d(mels, 24, 3, padding=1), nn.BatchNorm1d(24), nn.ReLU(), nn.MaxPool1d(2)
        )
        rnn = nn.GRU if cell == "gru" else nn.LSTM
        self.rnn = rnn(24, 32, batch_first=True)
        self.fc = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = self.front(x).transpose(1, 2)  # [N, T, C]
        out, _ = self.rnn(seq)
        return self.fc(out[:, -1])


class KwsGRU(KwsRecurrent):
    def __init__(self) -> None:
        super().__init__("gru")


class KwsLSTM(KwsRecurrent):
    def __init__(self) -> None:
        super().__init__("lstm")


def _build(cls: type[nn.Module], seed: int, shape: tuple[int, ...] = IMAGE):
    def make() -> tuple[nn.Module, np.ndarray]:
        torch.manual_seed(seed)
        return _finish(cls(), seed), _image(2, shape, seed)

    return make


#: name -> builder of (module in eval mode, example batch).
ARCHITECTURES: dict[str, Callable[[], tuple[nn.Module, np.ndarray]]] = {
    "mobilenet_v2": _build(MobileNetV2, 1),
    "resnet18": _build(ResNet18, 2),
    "efficientnet_b0": _build(EfficientNetB0, 3),
    "squeezenet": _build(SqueezeNet, 4),
    "vit_tiny": _build(ViTTiny, 5),
    "yolo_tiny": _build(YoloTiny, 6),
    "unet": _build(UNet, 7),
    "kws_conv1d": _build(KwsConv1d, 8, (40, 49)),
    "kws_gru": _build(KwsGRU, 9, (40, 49)),
    "kws_lstm": _build(KwsLSTM, 10, (40, 49)),
}


def held_out(example: np.ndarray, count: int, seed: int = 1000) -> np.ndarray:
    """Fresh inputs shaped like ``example`` (not the calibration samples)."""
    rng = np.random.default_rng(seed)
    return rng.normal(0, 1, size=(count, *example.shape[1:])).astype(np.float32)
