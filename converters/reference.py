"""What a bundle carries for the device to check itself: drift reference and smoke samples.

Pure functions over arrays; the formats are :class:`device_agent.payloads.DriftProfile`
and :class:`device_agent.payloads.SmokeSamples`.

Drift reference: for the first model input, per feature, the interior bin
edges at the quantiles ``1/k .. (k-1)/k`` of the reference samples (repeated
edges merged) and the share of samples in each bin, with the agent's binning
rule ``searchsorted(edges, v, side="right")``. Image inputs (rank 4) give one
feature per channel (``channel_values``, named ``<input>[c0]``, ``<input>[c1]``, ...):
the quantile edges and proportions of that channel's pixel values over H x W (the
positions :func:`device_agent.telemetry.stats.channel_values` takes, as the agent
does), with their mean and standard deviation. The channel axis comes from the
layout the caller knows, else from :func:`image_layout`. The output
distribution is the class frequencies of the argmax (classifiers) or the
quantile bins of the first output (regressors).

Smoke samples: a handful of inputs with the artifact's own outputs. For
classifiers the samples with the clearest top-1 margin are chosen, so a
correct install never fails on a near tie.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from device_agent.payloads import DriftProfile, FeatureProfile, OutputProfile, SmokeSamples
from device_agent.telemetry.stats import channel_values

DEFAULT_BINS = 10
MAX_FEATURES = 256
SMOKE_COUNT = 8

# Smoke-test tolerances by precision: (check, atol, rtol). Looser than parity,
# because the device's runtime build (CPU, kernels) differs from the converter's.
SMOKE_CHECKS: dict[str, tuple[str, float, float]] = {
    "float32": ("allclose", 1e-4, 1e-3),
    "float16": ("allclose", 5e-3, 1e-2),
    "int8-dynamic": ("top1", 0.0, 0.0),
    "int8-static": ("top1", 0.0, 0.0),
}


#: channel counts an image input plausibly has (grey, RGB, RGBA)
_IMAGE_CHANNELS = (1, 2, 3, 4)


def image_layout(shape: Sequence[int | str | None], origin: str = "onnx") -> tuple[str, str]:
    """``NCHW`` or ``NHWC`` for a rank-4 input of ``shape``, and how it was decided.

    The converters keep ONNX's NCHW at the model's inputs (a TFLite artifact they
    write transposes inside the model), so NCHW unless the shape says otherwise:
    a channel-sized last axis (1-4) after a larger axis 1, or a TFLite source
    (TFLite models read NHWC) whose axis 1 is not channel-sized.
    """
    dims = [d if isinstance(d, int) and d > 0 else None for d in shape]
    d1, d3 = dims[1], dims[3]
    if d3 in _IMAGE_CHANNELS and (d1 is None or d1 not in _IMAGE_CHANNELS):
        return "NHWC", f"inferred from the input shape {list(shape)} (channels last)"
    if origin == "tflite" and not (d1 in _IMAGE_CHANNELS and d3 not in _IMAGE_CHANNELS):
        return "NHWC", "inferred: a TFLite source model reads NHWC images"
    return "NCHW", f"inferred from the input shape {list(shape)} (ONNX convention, channels first)"


def features(x: np.ndarray) -> tuple[np.ndarray, str]:
    """``[N, F]`` feature matrix and the reduction that made it."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 4:
        return x.mean(axis=(2, 3)), "channel_mean"
    if x.ndim == 1:
        return x.reshape(-1, 1), "none"
    return x.reshape(len(x), -1), "none"


def bin_profile(
    values: np.ndarray, bins: int = DEFAULT_BINS
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Quantile edges (interior, ascending, unique) and bin proportions of ``values``."""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        return (), (1.0,)
    qs = np.quantile(v, np.arange(1, bins) / bins)
    edges = np.unique(qs)
    counts = np.bincount(np.searchsorted(edges, v, side="right"), minlength=len(edges) + 1)
    props = counts / counts.sum()
    return tuple(float(e) for e in edges), tuple(float(p) for p in props)


def drift_profile(
    input_name: str,
    inputs: np.ndarray,
    output_name: str | None,
    outputs: np.ndarray | None,
    task: str,
    bins: int = DEFAULT_BINS,
    layout: str | None = None,
) -> DriftProfile:
    """Reference distributions of one input's features and of the predictions.

    ``layout`` (``NCHW``/``NHWC``) places the channel axis of a rank-4 input; None
    infers it from the shape (:func:`image_layout`).
    """
    x = np.asarray(inputs)
    profiles = []
    if x.ndim == 4:
        layout = layout or image_layout(x.shape)[0]
        values = channel_values(x, layout)
        for c in range(min(len(values), MAX_FEATURES)):
            v = np.asarray(values[c], np.float64).ravel()
            v = v[np.isfinite(v)]
            edges, props = bin_profile(v, bins)
            profiles.append(
                FeatureProfile(
                    name=f"{input_name}[c{c}]",
                    index=c,
                    edges=edges,
                    proportions=props,
                    mean=float(v.mean()) if v.size else None,
                    std=float(v.std()) if v.size else None,
                )
            )
        reduction, n = "channel_values", len(x)
    else:
        layout = ""
        feats, reduction = features(x)
        if feats.shape[1] > MAX_FEATURES:
            feats = feats[:, :MAX_FEATURES]
        for i in range(feats.shape[1]):
            edges, props = bin_profile(feats[:, i], bins)
            profiles.append(FeatureProfile(name=f"f{i}", index=i, edges=edges, proportions=props))
        n = len(feats)
    output = None
    if output_name is not None and outputs is not None:
        y = np.asarray(outputs, dtype=np.float64)
        if task == "classification" and y.ndim >= 2 and y.shape[-1] >= 2:
            classes = int(y.shape[-1])
            counts = np.bincount(y.reshape(-1, classes).argmax(-1), minlength=classes)
            output = OutputProfile(
                name=output_name,
                kind="classification",
                proportions=tuple(float(c) for c in counts / counts.sum()),
                classes=classes,
            )
        else:
            edges, props = bin_profile(y, bins)
            output = OutputProfile(
                name=output_name, kind="regression", proportions=props, edges=edges
            )
    return DriftProfile(
        input=input_name,
        features=tuple(profiles),
        output=output,
        reduction=reduction,
        sample_count=int(n),
        layout=layout,
    )


def top1_margin(scores: np.ndarray) -> np.ndarray:
    """Gap between the best and second-best score per sample (last axis)."""
    s = np.sort(np.asarray(scores, dtype=np.float64).reshape(len(scores), -1), axis=-1)
    return s[:, -1] - s[:, -2]


def smoke_samples(
    inputs: Mapping[str, np.ndarray],
    outputs: Sequence[np.ndarray],
    output_names: Sequence[str],
    precision: str,
    classifier: bool,
    count: int = SMOKE_COUNT,
) -> SmokeSamples:
    """Pick ``count`` samples and record the artifact's outputs on them."""
    n = len(next(iter(inputs.values())))
    count = min(count, n)
    check, atol, rtol = SMOKE_CHECKS.get(precision, SMOKE_CHECKS["float32"])
    first = np.asarray(outputs[0]) if outputs else None
    if classifier and first is not None and first.ndim >= 2 and first.shape[-1] >= 2:
        order = np.argsort(-top1_margin(first), kind="stable")
        index = np.sort(order[:count])
    else:
        index = np.arange(count)
        if check == "top1":  # top-1 means nothing for a regressor: compare values
            check, atol, rtol = "allclose", _regression_atol(first), 0.0
    return SmokeSamples(
        inputs={k: np.ascontiguousarray(v[index]) for k, v in inputs.items()},
        expected={
            name: np.ascontiguousarray(np.asarray(o)[index])
            for name, o in zip(output_names, outputs, strict=True)
        },
        check=check,
        atol=atol,
        rtol=rtol,
        min_top1_agreement=1.0,
    )


def _regression_atol(y: np.ndarray | None) -> float:
    """For quantized regressors: 2 % of the output range (at least 1e-3)."""
    if y is None or np.asarray(y).size == 0:
        return 1e-3
    y = np.asarray(y, dtype=np.float64)
    return float(max(0.02 * (np.max(y) - np.min(y)), 1e-3))
