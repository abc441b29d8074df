"""Stratified sampling of predictions and masking of sensitive fields.

**Stratified sampling.** Per window, each predicted class keeps a bottom-k
reservoir: every offered prediction gets a uniform random key and a class keeps
the ``capacity`` predictions with the smallest keys, which is a uniform sample
without replacement of that class's predictions. At window close the budget is
``sample_rate * count`` (stochastically rounded, capped at
``max_per_window``) and it is split equally over the classes seen, a class
never getting more than it has; what a small class cannot use goes to the
others, and leftover single samples go to the rarest classes first. So a class
seen 3 times in a window of 100,000 still contributes its samples, where a
uniform 1 % sample would usually miss it. Non-classifiers use one stratum
(class ``-1``).

**Fields.** ``drop_fields`` and ``hash_fields`` name what must not be stored
as is. A field is one of

* a tensor name (an input or an output, for example ``"x"`` or ``"probs"``):
  the whole tensor;
* ``"name[i]"``: element ``i`` of each row of that tensor, counting row-major
  over the axes after the first (batch) axis;
* a feature name from the bundle's drift profile (reduction ``none``): the
  element of the profile's input at that feature's index.

A dropped tensor is left out of the sample; a hashed tensor is replaced by
``"sha256:<hex>"`` of its raw little-endian bytes. A tensor with masked
elements is stored as ``{"dtype", "shape", "values": [...]}`` (flat, row-major)
with dropped elements as ``null`` and hashed ones as ``"sha256:<hex>"`` of the
element's little-endian bytes; other tensors are stored as
:func:`device_agent.payloads.encode_array` gives them. A field that names
nothing in the model makes :func:`compile_mask` raise
:class:`FieldMaskError`, and the agent then stores no samples for that model
(failing closed rather than storing what the configuration meant to hide).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..payloads import DriftProfile, encode_array

_ELEMENT = re.compile(r"^(?P<name>.+)\[(?P<index>\d+)\]$")


class FieldMaskError(ValueError):
    """A configured drop/hash field names no tensor, element or feature of the model."""


@dataclass(frozen=True)
class FieldMask:
    """Compiled drop/hash rules for one model (see the module docstring)."""

    drop: frozenset[str] = frozenset()
    hash: frozenset[str] = frozenset()
    #: tensor name -> {element index: "drop" | "hash"}
    elements: Mapping[str, Mapping[int, str]] = field(default_factory=dict)

    def apply(self, tensors: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """Encode ``tensors`` for storage with the rules applied."""
        out: dict[str, Any] = {}
        for name, value in tensors.items():
            if name in self.drop:
                continue
            arr = np.ascontiguousarray(value)
            if name in self.hash:
                out[name] = _sha(arr)
            elif name in self.elements:
                out[name] = _mask_elements(arr, self.elements[name])
            else:
                out[name] = encode_array(arr)
        return out


def _sha(arr: np.ndarray) -> str:
    le = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
    return "sha256:" + hashlib.sha256(np.ascontiguousarray(le).tobytes()).hexdigest()


def _mask_elements(arr: np.ndarray, rules: Mapping[int, str]) -> dict[str, Any]:
    rows = arr.reshape(arr.shape[0], -1) if arr.ndim >= 1 else arr.reshape(1, 1)
    values: list[Any] = rows.astype(np.float64).tolist() if arr.dtype.kind == "f" else rows.tolist()
    for r, row in enumerate(values):
        for i, action in rules.items():
            if i < len(row):
                row[i] = None if action == "drop" else _sha(rows[r, i : i + 1])
    flat = [v for row in values for v in row]
    return {"dtype": str(arr.dtype), "shape": list(arr.shape), "values": flat}


def compile_mask(
    drop_fields: Sequence[str],
    hash_fields: Sequence[str],
    input_names: Sequence[str],
    output_names: Sequence[str],
    profile: DriftProfile | None = None,
) -> FieldMask:
    """Resolve configured field names against one model's tensors and drift profile."""
    tensors = set(input_names) | set(output_names)
    features: dict[str, tuple[str, int]] = {}
    if profile is not None and profile.reduction == "none":
        features = {f.name: (profile.input, f.index) for f in profile.features}
    drop: set[str] = set()
    hashed: set[str] = set()
    elements: dict[str, dict[int, str]] = {}
    for action, names in (("drop", drop_fields), ("hash", hash_fields)):
        for f in names:
            if f in tensors:
                (drop if action == "drop" else hashed).add(f)
                continue
            m = _ELEMENT.match(f)
            if m and m.group("name") in tensors:
                target = (m.group("name"), int(m.group("index")))
            elif f in features:
                target = features[f]
            else:
                raise FieldMaskError(
                    f"telemetry field {f!r} names no input, output, 'tensor[index]' or drift "
                    f"feature of this model (tensors: {sorted(tensors)}, features: "
                    f"{sorted(features)[:8]}); fix telemetry.{action}_fields"
                )
            rules = elements.setdefault(target[0], {})
            # dropping wins over hashing when a field is named in both lists
            if rules.get(target[1]) != "drop":
                rules[target[1]] = action
    hashed -= drop
    return FieldMask(frozenset(drop), frozenset(hashed), elements)


@dataclass
class _Reservoir:
    keys: np.ndarray
    items: list[Any]
    seen: int = 0


class StratifiedSampler:
    """Per-class bottom-k reservoirs for one window; see the module docstring."""

    def __init__(
        self, rate: float, max_per_window: int, classes: int, rng: np.random.Generator
    ) -> None:
        self.rate = float(rate)
        self.max_per_window = int(max_per_window)
        self.capacity = max(1, math.ceil(self.max_per_window / max(1, classes)))
        self.rng = rng
        self._res: dict[int, _Reservoir] = {}

    def offer(self, classes: np.ndarray, item: Callable[[int], Any]) -> None:
        """Offer a batch: call ``i`` predicted ``classes[i]``; ``item(i)`` builds it if kept."""
        if self.rate <= 0 or self.max_per_window <= 0 or len(classes) == 0:
            return
        keys = self.rng.random(len(classes))
        for c in np.unique(classes).tolist():
            rows = np.flatnonzero(classes == c)
            res = self._res.get(c)
            if res is None:
                res = self._res[c] = _Reservoir(np.empty(0), [])
            res.seen += len(rows)
            k = keys[rows]
            if len(res.items) >= self.capacity:
                keep = k < res.keys.max()
                rows, k = rows[keep], k[keep]
                if len(rows) == 0:
                    continue
            all_keys = np.concatenate([res.keys, k])
            all_items = res.items + [item(i) for i in rows.tolist()]
            if len(all_items) > self.capacity:
                best = np.argpartition(all_keys, self.capacity - 1)[: self.capacity]
                all_keys = all_keys[best]
                all_items = [all_items[i] for i in best.tolist()]
            res.keys, res.items = all_keys, all_items

    def take(self, count: int) -> list[tuple[int, Any]]:
        """Close the window: the stratified sample for ``count`` predictions; resets."""
        res, self._res = self._res, {}
        if not res or self.rate <= 0:
            return []
        expected = self.rate * count
        budget = int(expected) + int(self.rng.random() < expected - int(expected))
        budget = min(budget, self.max_per_window)
        sizes = {c: len(r.items) for c, r in res.items()}
        alloc = allocate(budget, sizes, {c: r.seen for c, r in res.items()})
        out: list[tuple[int, Any]] = []
        for c, n in alloc.items():
            if n:
                r = res[c]
                order = np.argsort(r.keys)[:n]
                out.extend((c, r.items[i]) for i in order.tolist())
        return out


def allocate(
    budget: int, sizes: Mapping[int, int], seen: Mapping[int, int] | None = None
) -> dict[int, int]:
    """Split ``budget`` equally over classes, capped by ``sizes``; spare goes to rare classes."""
    alloc = {c: 0 for c in sizes}
    remaining = budget
    open_ = [c for c in sizes if sizes[c] > 0]
    while remaining > 0 and open_:
        share = remaining // len(open_)
        if share == 0:
            rarity = seen or sizes
            for c in sorted(open_, key=lambda c: (rarity[c], c))[:remaining]:
                alloc[c] += 1
            break
        for c in open_:
            give = min(share, sizes[c] - alloc[c])
            alloc[c] += give
            remaining -= give
        open_ = [c for c in open_ if alloc[c] < sizes[c]]
    return alloc
