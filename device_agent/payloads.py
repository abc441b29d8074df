"""Formats of the data files a bundle carries besides the model.

Both are JSON so an operator can read them; arrays are stored as base64 of
their raw little-endian bytes with dtype and shape beside them.

``drift_profile.json`` (written by the converters, read by the agent)::

    {
      "schema_version": 1,
      "input": "x",                  # input tensor the features come from
      "reduction": "none",           # or "channel_values" / "channel_mean" (image inputs)
      "layout": "NCHW",              # image inputs only: where the channel axis is (or "NHWC")
      "sample_count": 512,
      "features": [                  # one per feature after reduction (flattened, row-major)
        {"name": "f0", "index": 0,
         "edges": [-1.2, -0.3, 0.4, 1.1],   # k-1 interior bin edges, ascending
         "proportions": [0.2, 0.2, 0.2, 0.2, 0.2],   # k reference proportions, sum 1
         "mean": 0.1, "std": 0.9}    # "channel_values" only: reference mean/std of the values
      ],
      "output": {                    # prediction distribution
        "name": "probs",
        "kind": "classification",    # argmax over the last axis
        "classes": 4,
        "proportions": [0.25, 0.25, 0.25, 0.25]
      }
      # or {"name": ..., "kind": "regression", "edges": [...], "proportions": [...]}
    }

A value ``v`` falls in bin ``searchsorted(edges, v, side="right")``.

Reductions: ``none`` - one feature per element of the flattened row; ``channel_values``
(rank-4 image inputs) - one feature per channel (``index`` = channel, named
``<input>[c<index>]``), binning the channel's pixel values over H x W (at most
:data:`CHANNEL_POSITIONS` evenly spaced positions per image), with ``layout`` saying
which axis holds the channels; ``channel_mean`` (older bundles) - one feature per
channel of NCHW inputs, binning each image's channel mean.

``smoke_samples.json`` (written by the converters, run by the agent after install)::

    {
      "schema_version": 1,
      "inputs":   {"x":     {"dtype": "float32", "shape": [4, 16], "data": "<base64>"}},
      "expected": {"probs": {"dtype": "float32", "shape": [4, 4],  "data": "<base64>"}},
      "check": "allclose",           # or "top1": argmax over the last axis must agree
      "atol": 1e-4, "rtol": 1e-3,
      "min_top1_agreement": 1.0      # used with "top1"
    }

A placeholder file (``{"placeholder": true, ...}``) means "no data"; the agent
then skips drift summaries or the smoke test and says so in its report.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

SCHEMA_VERSION = 1
#: most pixel positions per image and channel a ``channel_values`` feature bins
CHANNEL_POSITIONS = 256
_CHANNEL_SUFFIX = re.compile(r"\[c\d+\]\Z")


def is_channel_feature(name: str) -> bool:
    """Whether a drift feature is an image channel (``<input>[c<n>]``), whose bins count
    pixel values (many per input) rather than one value per input row."""
    return _CHANNEL_SUFFIX.search(name) is not None


def encode_array(a: np.ndarray) -> dict[str, Any]:
    a = np.ascontiguousarray(a)
    le = a.astype(a.dtype.newbyteorder("<"), copy=False)
    return {
        "dtype": str(a.dtype),
        "shape": list(a.shape),
        "data": base64.b64encode(le.tobytes()).decode("ascii"),
    }


def decode_array(d: Mapping[str, Any]) -> np.ndarray:
    dtype = np.dtype(str(d["dtype"])).newbyteorder("<")
    raw = base64.b64decode(d["data"], validate=True)
    return np.frombuffer(raw, dtype=dtype).reshape([int(s) for s in d["shape"]]).copy()


@dataclass(frozen=True)
class FeatureProfile:
    name: str
    index: int
    edges: tuple[float, ...]
    proportions: tuple[float, ...]
    #: reference mean and standard deviation of the values (``channel_values`` only)
    mean: float | None = None
    std: float | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "index": self.index,
            "edges": list(self.edges),
            "proportions": list(self.proportions),
        }
        if self.mean is not None:
            out["mean"] = self.mean
        if self.std is not None:
            out["std"] = self.std
        return out


@dataclass(frozen=True)
class OutputProfile:
    name: str
    kind: str  # "classification" | "regression"
    proportions: tuple[float, ...]
    classes: int = 0
    edges: tuple[float, ...] = ()


@dataclass(frozen=True)
class DriftProfile:
    input: str
    features: tuple[FeatureProfile, ...]
    output: OutputProfile | None
    reduction: str = "none"
    sample_count: int = 0
    #: ``NCHW`` or ``NHWC`` for image reductions, "" otherwise
    layout: str = ""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "input": self.input,
            "reduction": self.reduction,
            "sample_count": self.sample_count,
            "features": [f.to_json() for f in self.features],
        }
        if self.layout:
            out["layout"] = self.layout
        if self.output is not None:
            o = self.output
            od: dict[str, Any] = {
                "name": o.name,
                "kind": o.kind,
                "proportions": list(o.proportions),
            }
            if o.kind == "classification":
                od["classes"] = o.classes
            else:
                od["edges"] = list(o.edges)
            out["output"] = od
        return out

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> DriftProfile | None:
        """Parse a profile; None for a placeholder."""
        if obj.get("placeholder"):
            return None
        if obj.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"drift profile schema_version {obj.get('schema_version')!r}")
        feats = tuple(
            FeatureProfile(
                str(f["name"]),
                int(f["index"]),
                tuple(map(float, f["edges"])),
                tuple(map(float, f["proportions"])),
                None if f.get("mean") is None else float(f["mean"]),
                None if f.get("std") is None else float(f["std"]),
            )
            for f in obj["features"]
        )
        o = obj.get("output")
        output = None
        if o:
            output = OutputProfile(
                name=str(o["name"]),
                kind=str(o["kind"]),
                proportions=tuple(map(float, o["proportions"])),
                classes=int(o.get("classes", 0)),
                edges=tuple(map(float, o.get("edges", []))),
            )
        return cls(
            input=str(obj["input"]),
            features=feats,
            output=output,
            reduction=str(obj.get("reduction", "none")),
            sample_count=int(obj.get("sample_count", 0)),
            layout=str(obj.get("layout", "")),
        )


@dataclass(frozen=True)
class SmokeSamples:
    inputs: dict[str, np.ndarray]
    expected: dict[str, np.ndarray]
    check: str = "allclose"
    atol: float = 1e-4
    rtol: float = 1e-3
    min_top1_agreement: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "inputs": {k: encode_array(v) for k, v in self.inputs.items()},
            "expected": {k: encode_array(v) for k, v in self.expected.items()},
            "check": self.check,
            "atol": self.atol,
            "rtol": self.rtol,
            "min_top1_agreement": self.min_top1_agreement,
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> SmokeSamples | None:
        """Parse smoke samples; None for a placeholder."""
        if obj.get("placeholder"):
            return None
        if obj.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"smoke samples schema_version {obj.get('schema_version')!r}")
        return cls(
            inputs={k: decode_array(v) for k, v in obj["inputs"].items()},
            expected={k: decode_array(v) for k, v in obj["expected"].items()},
            check=str(obj.get("check", "allclose")),
            atol=float(obj.get("atol", 1e-4)),
            rtol=float(obj.get("rtol", 1e-3)),
            min_top1_agreement=float(obj.get("min_top1_agreement", 1.0)),
        )
