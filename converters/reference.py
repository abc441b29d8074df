"""What a bundle carries for the device to check itself: drift reference and smoke samples.

Pure functions over arrays; the formats are :class:`device_agent.payloads.DriftProfile`
and :class:`device_agent.payloads.SmokeSamples`.

Drift reference: for the first model input, per feature, the interior bin
edges at the quantiles ``1/k .. (k-1)/k`` of the reference samples (repeated
edges merged) and the share of samples in each bin, with the agent's binning
rule ``searchsorted(edges, v, side="right")``. Image-like inputs (rank 4,
NCHW) are reduced to one feature per channel (``channel_mean``). The output
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
) -> DriftProfile:
    """Reference distributions of one input's features and of the predictions."""
    feats, reduction = features(inputs)
    if feats.shape[1] > MAX_FEATURES:
        feats = feats[:, :MAX_FEATURES]
    prefix = "channel" if reduction == "channel_mean" else "f"
    profiles = []
    for i in range(feats.shape[1]):
        edges, props = bin_profile(feats[:, i], bins)
        profiles.append(
            FeatureProfile(name=f"{prefix}{i}", index=i, edges=edges, proportions=props)
        )
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
        sample_count=int(len(feats)),
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
