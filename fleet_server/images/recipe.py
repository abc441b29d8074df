"""Device-class recipes (``firmware_images/classes/*.toml``)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from device_agent.bundle.manifest import MODEL_NAME
from fleet_server.images.compat import parse_version

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CLASSES_DIR = Path(__file__).resolve().parents[2] / "firmware_images" / "classes"


class RecipeError(ValueError):
    """A device-class recipe is missing or invalid; the message names the key."""


@dataclass(frozen=True)
class DeviceClass:
    name: str
    description: str
    architecture: str
    python: str
    glibc: str
    platforms: tuple[str, ...]
    extra: str
    model_format: str
    precision: str
    memory_mb: int
    storage_mb: int
    max_bundle_mb: int
    server_url: str
    mqtt_host: str
    mqtt_port: int
    trust_root: Path | None
    agent_defaults: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    source: Path | None = None
    #: the model names the class's devices run, each with its own slots and rollouts
    #: (``[class] models``); empty: one model, whichever its first assignment names
    models: tuple[str, ...] = ()

    @property
    def abi(self) -> str:
        return "cp" + self.python.replace(".", "")


def _get(d: dict[str, Any], section: str, key: str, typ: type, path: Path) -> Any:
    try:
        value = d[section][key]
    except KeyError as e:
        raise RecipeError(f"{path}: missing [{section}] {key}") from e
    if not isinstance(value, typ):
        raise RecipeError(f"{path}: [{section}] {key} must be a {typ.__name__}")
    return value


def load_class(name_or_path: str | Path, classes_dir: Path = CLASSES_DIR) -> DeviceClass:
    """Load a recipe by class name (from ``classes_dir``) or by file path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = classes_dir / f"{name_or_path}.toml"
    if not path.exists():
        known = ", ".join(list_classes(classes_dir)) or "none"
        raise RecipeError(f"no device-class recipe {path}; known classes: {known}")
    try:
        d = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{path} is not valid TOML: {e}") from e
    fmt = _get(d, "model", "format", str, path)
    if fmt not in ("onnx", "tflite"):
        raise RecipeError(f"{path}: [model] format must be onnx or tflite")
    platforms = _get(d, "class", "platforms", list, path)
    if not platforms or not all(isinstance(p, str) for p in platforms):
        raise RecipeError(f"{path}: [class] platforms must be a non-empty list of pip tags")
    root = d.get("trust", {}).get("root")
    python = _get(d, "class", "python", str, path)
    glibc = _get(d, "class", "glibc", str, path)
    for key, value in (("python", python), ("glibc", glibc)):
        try:
            parse_version(value)
        except ValueError as e:
            raise RecipeError(f'{path}: [class] {key} must be MAJOR.MINOR, like "3.11"') from e
    models = d["class"].get("models", [])
    if (
        not isinstance(models, list)
        or not all(isinstance(m, str) and MODEL_NAME.fullmatch(m) for m in models)
        or len(set(models)) != len(models)
    ):
        raise RecipeError(f"{path}: [class] models must be a list of distinct model names")
    return DeviceClass(
        name=_get(d, "class", "name", str, path),
        description=d["class"].get("description", ""),
        architecture=_get(d, "class", "architecture", str, path),
        python=python,
        glibc=glibc,
        platforms=tuple(platforms),
        extra=_get(d, "class", "extra", str, path),
        model_format=fmt,
        precision=_get(d, "model", "precision", str, path),
        memory_mb=_get(d, "limits", "memory_mb", int, path),
        storage_mb=_get(d, "limits", "storage_mb", int, path),
        max_bundle_mb=_get(d, "limits", "max_bundle_mb", int, path),
        server_url=_get(d, "endpoints", "server_url", str, path),
        mqtt_host=_get(d, "endpoints", "mqtt_host", str, path),
        mqtt_port=_get(d, "endpoints", "mqtt_port", int, path),
        trust_root=(path.parent / root) if root else None,
        agent_defaults=d.get("agent", {}),
        model=d["model"],
        source=path,
        models=tuple(models),
    )


def list_classes(classes_dir: Path = CLASSES_DIR) -> list[str]:
    return sorted(p.stem for p in classes_dir.glob("*.toml"))
