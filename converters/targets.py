"""Declarative target descriptions: what a device class can run.

A :class:`Target` names the artifact format (``onnx`` or ``tflite``), the
runtime on the device and its version, and the numeric precision. For ONNX
targets the runtime version decides the highest ONNX IR version and opsets the
produced file may carry; give ``max_ir_version``/``max_opset`` to override.

Targets can also be written as one string (for the CLI)::

    onnx                                  float32 ONNX for the installed onnxruntime
    onnx:int8-dynamic@onnxruntime-1.16    dynamic int8, loadable by onnxruntime 1.16
    onnx:float16@ir9/opset17              explicit limits
    tflite:float16                        TFLite with float16 weights
    tflite:int8-full                      full-integer int8 TFLite, calibrated on the samples
    tflite:int8-full-io                   the same with int8 inputs and outputs (for NPUs and
                                          microcontrollers); the manifest carries their scale
                                          and zero point, and devices quantize on feed
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

from .errors import TargetError

FORMATS = ("onnx", "tflite")
PRECISIONS = ("float32", "float16", "int8-dynamic", "int8-static")
TFLITE_PRECISIONS = ("float32", "float16", "int8-dynamic", "int8-full", "int8-full-io")

# (max IR version, max ai.onnx opset, max ai.onnx.ml opset) each onnxruntime
# release loads. Rows marked "measured" were probed against the released wheels
# (tests/test_converters_lowering.py re-checks 1.16 on every CI run); the others
# follow the onnx release each onnxruntime release bundles. A version between
# two rows takes the lower row's limits.
ORT_LIMITS: dict[tuple[int, int], tuple[int, int, int]] = {
    (1, 10): (8, 15, 2),
    (1, 12): (8, 17, 3),
    (1, 14): (8, 18, 3),
    (1, 15): (9, 19, 3),
    (1, 16): (9, 19, 3),  # measured
    (1, 17): (9, 20, 4),  # measured
    (1, 18): (10, 21, 4),
    (1, 20): (10, 21, 5),  # measured
    (1, 22): (10, 22, 5),  # measured
    (1, 31): (13, 26, 5),  # measured
}


def parse_version(text: str) -> tuple[int, int]:
    """``"1.16.3"`` -> ``(1, 16)``."""
    m = re.fullmatch(r"(\d+)\.(\d+)(?:\.\d+)?(?:[.+-]\w+)*", text.strip())
    if not m:
        raise TargetError(f"runtime version {text!r} is not like 1.16 or 1.16.3")
    return int(m.group(1)), int(m.group(2))


def onnxruntime_limits(version: str) -> tuple[int, int, int]:
    """Highest (IR version, ai.onnx opset, ai.onnx.ml opset) onnxruntime ``version`` loads."""
    v = parse_version(version)
    rows = [k for k in ORT_LIMITS if k <= v]
    if not rows:
        oldest = ".".join(map(str, min(ORT_LIMITS)))
        raise TargetError(
            f"onnxruntime {version} is older than the oldest known release ({oldest}); "
            "give max_ir_version and max_opset explicitly"
        )
    return ORT_LIMITS[max(rows)]


@dataclass(frozen=True)
class Target:
    """One artifact to produce for a class of devices.

    ``runtime_version`` is the oldest runtime release the devices run (ONNX
    only: it bounds IR version and opset). ``max_ir_version``/``max_opset``
    override what the version implies. ``tolerance`` overrides the parity
    tolerance of the precision (see :mod:`converters.parity`).
    """

    format: str = "onnx"
    precision: str = "float32"
    runtime: str = ""
    runtime_version: str | None = None
    max_ir_version: int | None = None
    max_opset: int | None = None
    max_ml_opset: int | None = None
    device_classes: tuple[str, ...] = ()
    name: str = ""

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise TargetError(f"target format {self.format!r} is not one of {FORMATS}")
        allowed = PRECISIONS if self.format == "onnx" else TFLITE_PRECISIONS
        if self.precision not in allowed:
            raise TargetError(
                f"precision {self.precision!r} is not available for {self.format} targets; "
                f"use one of {allowed}"
            )
        runtime = self.runtime or ("onnxruntime" if self.format == "onnx" else "tflite")
        if self.format == "onnx" and runtime != "onnxruntime":
            raise TargetError(f"ONNX targets run on onnxruntime, not {runtime!r}")
        if self.format == "tflite" and runtime not in (
            "tflite",
            "ai-edge-litert",
            "tflite-runtime",
        ):
            raise TargetError(f"TFLite targets run on a TFLite interpreter, not {runtime!r}")
        object.__setattr__(self, "runtime", runtime)
        if self.runtime_version is not None and self.format == "onnx":
            onnxruntime_limits(self.runtime_version)  # validates early
        if not self.name:
            object.__setattr__(self, "name", self._default_name())

    def _default_name(self) -> str:
        name = f"{self.format}-{self.precision}"
        if self.runtime_version:
            name += f"-{self.runtime}-{self.runtime_version}"
        if self.max_ir_version is not None:
            name += f"-ir{self.max_ir_version}"
        if self.max_opset is not None:
            name += f"-opset{self.max_opset}"
        return name

    @property
    def limits(self) -> tuple[int | None, int | None, int | None]:
        """(max IR, max opset, max ML opset) for ONNX targets; None = no limit."""
        ir, opset, ml = self.max_ir_version, self.max_opset, self.max_ml_opset
        if self.format == "onnx" and self.runtime_version is not None:
            v_ir, v_opset, v_ml = onnxruntime_limits(self.runtime_version)
            ir = v_ir if ir is None else min(ir, v_ir)
            opset = v_opset if opset is None else min(opset, v_opset)
            ml = v_ml if ml is None else min(ml, v_ml)
        return ir, opset, ml

    def with_name(self, name: str) -> Target:
        return replace(self, name=name)

    def to_json(self) -> dict[str, Any]:
        ir, opset, ml = self.limits
        out: dict[str, Any] = {
            "name": self.name,
            "format": self.format,
            "precision": self.precision,
            "runtime": self.runtime,
        }
        if self.runtime_version:
            out["runtime_version"] = self.runtime_version
        if self.format == "onnx":
            out.update({"max_ir_version": ir, "max_opset": opset, "max_ml_opset": ml})
        if self.device_classes:
            out["device_classes"] = list(self.device_classes)
        return out


_SPEC = re.compile(
    r"(?P<format>onnx|tflite)"
    r"(?::(?P<precision>[a-z0-9-]+))?"
    r"(?:@(?P<where>.+))?"
)


def parse_target(spec: str, device_classes: tuple[str, ...] = ()) -> Target:
    """Parse ``FORMAT[:PRECISION][@RUNTIME-VERSION | @irN/opsetM]`` (see module docs)."""
    m = _SPEC.fullmatch(spec.strip())
    if not m:
        raise TargetError(
            f"target {spec!r} is not like onnx, onnx:int8-dynamic@onnxruntime-1.16, "
            "onnx:float32@ir9/opset17 or tflite:float16"
        )
    kwargs: dict[str, Any] = {
        "format": m.group("format"),
        "precision": m.group("precision") or "float32",
        "device_classes": device_classes,
    }
    where = m.group("where")
    if where:
        limits = re.fullmatch(r"ir(\d+)(?:/opset(\d+))?", where)
        runtime = re.fullmatch(r"([a-z_-]+?)-(\d+\.\d+(?:\.\d+)?)", where)
        if limits:
            kwargs["max_ir_version"] = int(limits.group(1))
            if limits.group(2):
                kwargs["max_opset"] = int(limits.group(2))
        elif runtime:
            kwargs["runtime"] = runtime.group(1)
            kwargs["runtime_version"] = runtime.group(2)
        else:
            raise TargetError(
                f"target {spec!r}: after '@' give RUNTIME-VERSION (onnxruntime-1.16) "
                "or irN/opsetM (ir9/opset17)"
            )
    return Target(**kwargs)


def min_onnxruntime(ir_version: int, opset: int | None = None, ml_opset: int | None = None) -> str:
    """Oldest onnxruntime release (``"1.16"``) that loads a model with these versions.

    For a model newer than every known release, the newest known release.
    """
    for key in sorted(ORT_LIMITS):
        ir, op, ml = ORT_LIMITS[key]
        if ir_version <= ir and (opset or 0) <= op and (ml_opset or 0) <= ml:
            return f"{key[0]}.{key[1]}"
    newest = max(ORT_LIMITS)
    return f"{newest[0]}.{newest[1]}"
