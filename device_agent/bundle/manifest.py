"""The bundle manifest: schema, canonical encoding and parsing.

The manifest is stored as *canonical JSON*: keys sorted, no insignificant
whitespace, UTF-8. Signatures cover these exact bytes, and a reader refuses a
manifest whose bytes are not canonical, so one manifest has exactly one
encoding.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from .errors import ManifestError

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
FORMATS = ("onnx", "tflite")
FILE_ROLES = ("model", "drift_profile", "smoke_samples", "extra")
_MEMBER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
#: a model name: what a manifest, an assignment entry and a device's configured models use
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
#: longest integer literal a manifest may hold (covers every signed 64-bit value)
MAX_INT_DIGITS = 19


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ManifestError(
            f"manifest holds an integer of {len(text.lstrip('-'))} digits; at most "
            f"{MAX_INT_DIGITS} are allowed. Rebuild the bundle with `edgefleet bundle pack`"
        )
    return int(text)


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ManifestError(
            f"manifest holds the number {text[:40]!r}, which is out of range for a float; "
            "rebuild the bundle with `edgefleet bundle pack`"
        )
    return value


def _parse_constant(text: str) -> Any:
    raise ManifestError(f"manifest holds {text!r}, which is not JSON; rebuild the bundle")


def decode_json(data: bytes, what: str = "manifest") -> Any:
    """Decode strict JSON: finite floats, bounded integers, bounded nesting.

    Every failure is a :class:`ManifestError` (a :class:`BundleError`), never a
    bare ``ValueError`` or ``RecursionError``.
    """
    try:
        return json.loads(
            data.decode("utf-8"),
            parse_int=_parse_int,
            parse_float=_parse_float,
            parse_constant=_parse_constant,
        )
    except ManifestError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ManifestError(f"{what} is not valid UTF-8 JSON: {type(e).__name__}: {e}") from e


def canonical_json(obj: Any) -> bytes:
    """Encode ``obj`` as canonical JSON bytes (sorted keys, compact, UTF-8)."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def format_time(t: datetime) -> str:
    """Format an aware datetime as RFC 3339 UTC with second precision."""
    if t.tzinfo is None:
        raise ValueError("timestamps must be timezone-aware")
    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str) -> datetime:
    """Parse the RFC 3339 UTC form written by :func:`format_time`."""
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    except (TypeError, ValueError) as e:
        raise ManifestError(
            f"timestamp {text!r} is not of the form 2026-01-31T12:00:00Z; "
            "rebuild the bundle with a current edgefleet"
        ) from e


#: integer dtypes a quantized model input or output may have, with their value ranges
QUANTIZED_DTYPES: dict[str, tuple[int, int]] = {
    "int8": (-128, 127),
    "uint8": (0, 255),
    "int16": (-32768, 32767),
}


@dataclass(frozen=True)
class Quantization:
    """Per-tensor affine quantization of a model input or output.

    ``real = scale * (q - zero_point)``.

    Per-axis (per-channel) parameters are refused on model I/O: a device would have to
    know the axis to feed it, and converters quantize I/O per tensor.
    """

    scale: float
    zero_point: int

    def to_json(self) -> dict[str, Any]:
        return {"scale": self.scale, "zero_point": self.zero_point}

    @classmethod
    def from_json(cls, d: Any, tensor: str, dtype: str) -> Quantization:
        if not isinstance(d, dict):
            raise ManifestError(f"tensor {tensor!r}: 'quantization' must be an object")
        scale, zero = d.get("scale"), d.get("zero_point")
        if "axis" in d or isinstance(scale, list) or isinstance(zero, list):
            raise ManifestError(
                f"tensor {tensor!r} is quantized per axis (one scale per channel); model "
                "inputs and outputs must be quantized per tensor (one scale, one zero point). "
                "Re-convert with per-tensor I/O quantization (tflite:int8-full does so) or "
                "with float32 I/O"
            )
        unknown = set(d) - {"scale", "zero_point"}
        if unknown:
            raise ManifestError(f"tensor {tensor!r}: unknown quantization fields {sorted(unknown)}")
        if dtype not in QUANTIZED_DTYPES:
            raise ManifestError(
                f"tensor {tensor!r} has dtype {dtype!r} and quantization parameters; quantized "
                f"model I/O must be one of {sorted(QUANTIZED_DTYPES)}"
            )
        if (
            not isinstance(scale, (int, float))
            or isinstance(scale, bool)
            or not math.isfinite(scale)
            or scale <= 0
        ):
            raise ManifestError(f"tensor {tensor!r}: quantization scale must be a positive number")
        lo, hi = QUANTIZED_DTYPES[dtype]
        if not isinstance(zero, int) or isinstance(zero, bool) or not lo <= zero <= hi:
            raise ManifestError(
                f"tensor {tensor!r}: quantization zero_point must be an integer in "
                f"[{lo}, {hi}] for {dtype}"
            )
        return cls(scale=float(scale), zero_point=zero)


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype and shape of one model input or output. ``None`` or a string is dynamic.

    ``quantization`` (optional; absent in manifests written before it existed) says the
    tensor holds integers standing for real values; the device agent then feeds it
    float values quantized and returns its values dequantized.
    """

    name: str
    dtype: str
    shape: tuple[int | str | None, ...]
    quantization: Quantization | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}
        if self.quantization is not None:
            out["quantization"] = self.quantization.to_json()
        return out

    @classmethod
    def from_json(cls, d: Any) -> TensorSpec:
        if not isinstance(d, dict):
            raise ManifestError("each input/output entry must be an object")
        name, dtype, shape = d.get("name"), d.get("dtype"), d.get("shape")
        if not isinstance(name, str) or not isinstance(dtype, str):
            raise ManifestError("input/output entries need string 'name' and 'dtype'")
        if not isinstance(shape, list) or not all(
            s is None or isinstance(s, (int, str)) and not isinstance(s, bool) for s in shape
        ):
            raise ManifestError(f"tensor {name!r}: 'shape' must be a list of int, str or null")
        quant = d.get("quantization")
        return cls(
            name=name,
            dtype=dtype,
            shape=tuple(shape),
            quantization=None if quant is None else Quantization.from_json(quant, name, dtype),
        )


@dataclass(frozen=True)
class FileEntry:
    """One member of the bundle as the manifest lists it."""

    path: str
    role: str
    sha256: str
    size: int

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "role": self.role, "sha256": self.sha256, "size": self.size}

    @classmethod
    def from_json(cls, d: Any) -> FileEntry:
        if not isinstance(d, dict):
            raise ManifestError("each 'files' entry must be an object")
        path, role, digest, size = d.get("path"), d.get("role"), d.get("sha256"), d.get("size")
        if not isinstance(path, str) or not _MEMBER_NAME.match(path):
            raise ManifestError(
                f"file path {path!r} is not a plain member name (letters, digits, '._-')"
            )
        if path in (MANIFEST_NAME, SIGNATURE_NAME):
            raise ManifestError(f"file path {path!r} is reserved")
        if role not in FILE_ROLES:
            raise ManifestError(f"file {path!r}: role {role!r} is not one of {FILE_ROLES}")
        if not isinstance(digest, str) or not _SHA256.match(digest):
            raise ManifestError(f"file {path!r}: sha256 must be 64 lowercase hex digits")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ManifestError(f"file {path!r}: size must be a non-negative integer")
        return cls(path=path, role=role, sha256=digest, size=size)


@dataclass(frozen=True)
class Manifest:
    """The signed description of a bundle."""

    name: str
    version: int
    format: str
    files: tuple[FileEntry, ...]
    created_at: datetime
    expires_at: datetime
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    runtime: dict[str, Any] = field(default_factory=dict)
    target_device_classes: tuple[str, ...] = ()
    provenance: dict[str, Any] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    # -- derived views -------------------------------------------------
    def file(self, role: str) -> FileEntry | None:
        """The first file with ``role``, or None."""
        return next((f for f in self.files if f.role == role), None)

    @property
    def model_file(self) -> FileEntry:
        entry = self.file("model")
        if entry is None:  # guaranteed by from_json; kept for type narrowing
            raise ManifestError("manifest lists no model file")
        return entry

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    # -- encoding --------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "name": self.name,
            "version": self.version,
            "format": self.format,
            "runtime": self.runtime,
            "target_device_classes": list(self.target_device_classes),
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
            "files": [f.to_json() for f in self.files],
            "provenance": self.provenance,
            "created_at": format_time(self.created_at),
            "expires_at": format_time(self.expires_at),
            "labels": self.labels,
        }

    def to_bytes(self) -> bytes:
        """The canonical bytes that signatures cover."""
        return canonical_json(self.to_json())

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        """Parse and validate canonical manifest bytes."""
        obj = decode_json(data)
        manifest = cls.from_json(obj)
        try:
            canonical = canonical_json(obj)
        except (ValueError, RecursionError) as e:
            raise ManifestError(f"manifest cannot be re-encoded canonically: {e}") from e
        if canonical != data:
            raise ManifestError(
                "manifest bytes are not in canonical form; it was edited by hand or by "
                "another tool. Re-pack and re-sign the bundle with `edgefleet bundle pack`"
            )
        return manifest

    @classmethod
    def from_json(cls, obj: Any) -> Manifest:
        if not isinstance(obj, dict):
            raise ManifestError("manifest must be a JSON object")
        sv = obj.get("schema_version")
        if sv != SCHEMA_VERSION:
            raise ManifestError(
                f"manifest schema_version {sv!r} is not supported by this agent "
                f"(supports {SCHEMA_VERSION}); upgrade the device agent"
            )
        known = {
            "schema_version",
            "name",
            "version",
            "format",
            "runtime",
            "target_device_classes",
            "inputs",
            "outputs",
            "files",
            "provenance",
            "created_at",
            "expires_at",
            "labels",
        }
        unknown = set(obj) - known
        if unknown:
            raise ManifestError(f"manifest has unknown fields {sorted(unknown)}")
        name, version, fmt = obj.get("name"), obj.get("version"), obj.get("format")
        if not isinstance(name, str) or not MODEL_NAME.match(name):
            raise ManifestError(f"model name {name!r} must be 1-128 of letters, digits, '._-'")
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise ManifestError("'version' must be a non-negative integer")
        if fmt not in FORMATS:
            raise ManifestError(f"format {fmt!r} is not one of {FORMATS}")
        files_raw = obj.get("files")
        if not isinstance(files_raw, list) or not files_raw:
            raise ManifestError("manifest must list at least one file")
        files = tuple(FileEntry.from_json(f) for f in files_raw)
        paths = [f.path for f in files]
        if len(set(paths)) != len(paths):
            raise ManifestError("manifest lists the same file path twice")
        if sum(1 for f in files if f.role == "model") != 1:
            raise ManifestError("manifest must list exactly one file with role 'model'")
        for key in ("runtime", "provenance", "labels"):
            if not isinstance(obj.get(key, {}), dict):
                raise ManifestError(f"'{key}' must be an object")
        labels = obj.get("labels", {})
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
            raise ManifestError("'labels' must map strings to strings")
        classes = obj.get("target_device_classes", [])
        if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
            raise ManifestError("'target_device_classes' must be a list of strings")
        for key in ("inputs", "outputs"):
            if not isinstance(obj.get(key, []), list):
                raise ManifestError(f"'{key}' must be a list")
        created = parse_time(obj.get("created_at"))  # type: ignore[arg-type]
        expires = parse_time(obj.get("expires_at"))  # type: ignore[arg-type]
        if expires <= created:
            raise ManifestError("'expires_at' must be after 'created_at'")
        return cls(
            schema_version=sv,
            name=name,
            version=version,
            format=fmt,
            runtime=obj.get("runtime", {}),
            target_device_classes=tuple(classes),
            inputs=tuple(TensorSpec.from_json(t) for t in obj.get("inputs", [])),
            outputs=tuple(TensorSpec.from_json(t) for t in obj.get("outputs", [])),
            files=files,
            provenance=obj.get("provenance", {}),
            created_at=created,
            expires_at=expires,
            labels=labels,
        )
