"""Calibration samples: check the operator's, or generate them from the input signature.

Samples are a ``{input name: array}`` mapping, every array with the same
number of rows (the batch axis first). Generated samples are standard normal
for float inputs: enough to measure parity, but a drift reference made from
them says nothing about real data, so the converter records their origin.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from device_agent.bundle.manifest import TensorSpec

from .errors import SampleError

DEFAULT_GENERATED = 64


def generate_samples(
    inputs: Sequence[TensorSpec], n: int = DEFAULT_GENERATED, seed: int = 0
) -> dict[str, np.ndarray]:
    """``n`` random samples per input, shaped by the signature (batch axis = ``n``)."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for spec in inputs:
        shape: list[int] = []
        for axis, dim in enumerate(spec.shape):
            if isinstance(dim, int) and axis > 0:
                shape.append(dim)
            elif axis == 0:
                shape.append(n)
            else:
                raise SampleError(
                    f"input {spec.name!r} has a free dimension at axis {axis} "
                    f"({list(spec.shape)}); give calibration samples instead"
                )
        dtype = np.dtype(spec.dtype)
        if dtype.kind == "f":
            out[spec.name] = rng.normal(0.0, 1.0, size=shape).astype(dtype)
        elif dtype.kind in "iu":
            out[spec.name] = rng.integers(0, 10, size=shape).astype(dtype)
        elif dtype.kind == "b":
            out[spec.name] = rng.random(size=shape) < 0.5
        else:
            raise SampleError(f"cannot generate samples for input {spec.name!r} of {spec.dtype}")
    return out


def check_samples(
    inputs: Sequence[TensorSpec], samples: Mapping[str, np.ndarray] | np.ndarray
) -> dict[str, np.ndarray]:
    """Validate samples against the input signature; cast floats to the input dtype.

    A bare array is accepted for a single-input model.
    """
    if isinstance(samples, np.ndarray):
        if len(inputs) != 1:
            raise SampleError(
                f"the model has {len(inputs)} inputs; give samples as a "
                "mapping of input name to array"
            )
        samples = {inputs[0].name: samples}
    names = {s.name for s in inputs}
    missing = names - set(samples)
    extra = set(samples) - names
    if missing or extra:
        raise SampleError(
            f"samples must cover exactly the inputs {sorted(names)}; "
            f"missing {sorted(missing)}, unknown {sorted(extra)}"
        )
    out: dict[str, np.ndarray] = {}
    rows = None
    for spec in inputs:
        arr = np.asarray(samples[spec.name])
        want = np.dtype(spec.dtype)
        if arr.dtype != want:
            if (
                arr.dtype.kind in "fiu"
                and want.kind == arr.dtype.kind
                or (arr.dtype.kind in "iu" and want.kind == "f")
            ):
                arr = arr.astype(want)
            else:
                raise SampleError(
                    f"samples for {spec.name!r} are {arr.dtype}, the model takes {spec.dtype}"
                )
        if arr.ndim != len(spec.shape):
            raise SampleError(
                f"samples for {spec.name!r} have shape {arr.shape}, the model "
                f"takes {list(spec.shape)}"
            )
        for axis, (have, dim) in enumerate(zip(arr.shape, spec.shape, strict=True)):
            if axis > 0 and isinstance(dim, int) and have != dim:
                raise SampleError(
                    f"samples for {spec.name!r} have shape {arr.shape}, the "
                    f"model takes {list(spec.shape)}"
                )
        if arr.shape[0] == 0:
            raise SampleError(f"samples for {spec.name!r} are empty")
        if rows is not None and arr.shape[0] != rows:
            raise SampleError("every input needs the same number of samples")
        rows = arr.shape[0]
        out[spec.name] = np.ascontiguousarray(arr)
    return out


def sample_count(samples: Mapping[str, np.ndarray]) -> int:
    return int(len(next(iter(samples.values())))) if samples else 0


def take(samples: Mapping[str, np.ndarray], index: np.ndarray | slice) -> dict[str, np.ndarray]:
    return {k: np.ascontiguousarray(v[index]) for k, v in samples.items()}


#: Share of one operator-given sample set held out for validation when the target
#: calibrates on samples (int8-static); the rest calibrates.
HOLDOUT_SHARE = 0.5


def split_samples(
    samples: Mapping[str, np.ndarray], calibrates: bool, seed: int = 0
) -> tuple[dict[str, np.ndarray] | None, dict[str, np.ndarray], str]:
    """(calibration, validation, how) from one sample set.

    When the target calibrates on samples, a random half (at least one sample) is held
    out for validation and never calibrates; otherwise nothing is fitted on the
    samples and all of them validate.
    """
    n = sample_count(samples)
    if not calibrates:
        return None, dict(samples), f"all {n} samples validate (none calibrate this target)"
    if n < 2:
        raise SampleError(
            f"{n} sample cannot both calibrate and validate; give at least 2 (better 64 or more)"
        )
    order = np.random.default_rng(seed).permutation(n)
    held = max(1, int(round(n * HOLDOUT_SHARE)))
    validation = take(samples, np.sort(order[:held]))
    calibration = take(samples, np.sort(order[held:]))
    return (
        calibration,
        validation,
        (f"{held} of {n} samples held out for validation; the other {n - held} calibrate"),
    )


def batches(samples: Mapping[str, np.ndarray], size: int) -> list[dict[str, np.ndarray]]:
    """``samples`` cut into consecutive batches of ``size`` (a short last batch dropped
    unless it is the only one)."""
    n = sample_count(samples)
    count = max(1, n // size) if n >= size else 0
    if count == 0:
        return []
    return [take(samples, slice(i * size, (i + 1) * size)) for i in range(count)]
