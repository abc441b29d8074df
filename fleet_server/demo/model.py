"""The demo's models: a small PyTorch MLP on the simulator's machine-condition task.

``train(seed)`` gives a healthy model; ``train(seed, bad=True)`` gives the
kind of model that slips through offline review but misbehaves in the field:
it was trained on mislabelled data (a label-mapping bug in a data pipeline),
so it is confident and fast, but its predictions are shifted.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fleet_server.simulator.streams import CLASSES, N_FEATURES, sample


def train(seed: int, *, bad: bool = False, steps: int = 300) -> tuple[Any, np.ndarray]:
    """Train the MLP; returns (module, calibration samples)."""
    import torch
    from torch import nn

    torch.set_num_threads(1)  # tiny model: threads only add contention
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    x, y = sample(4096, rng)
    if bad:
        y = (y + 1) % len(CLASSES)  # the label-mapping bug
    model = nn.Sequential(
        nn.Linear(N_FEATURES, 32),
        nn.ReLU(),
        nn.Linear(32, 32),
        nn.ReLU(),
        nn.Linear(32, len(CLASSES)),
        nn.Softmax(dim=-1),
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    loss_fn = nn.NLLLoss()
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(torch.log(model(xt) + 1e-7), yt)
        loss.backward()
        opt.step()
    model.eval()
    calib, _ = sample(512, np.random.default_rng(seed + 1))
    return model, calib


def accuracy(model: Any, seed: int = 99) -> float:
    import torch

    x, y = sample(2000, np.random.default_rng(seed))
    with torch.no_grad():
        pred = model(torch.from_numpy(x)).argmax(-1).numpy()
    return float((pred == y).mean())
