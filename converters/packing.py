"""Checks on a model file packed as it is (``edgefleet bundle pack``).

A bundle carries exactly one model file. :func:`single_model_file` makes an ONNX
file that keeps its weights in external data files (``model.onnx.data``, as torch
writes for large models) self-contained, by inlining them into a copy, or refuses
with what to do. External data must lie next to the model: a location that
resolves outside the model's folder is refused.
"""

from __future__ import annotations

from pathlib import Path

from .errors import PackError

#: Protobuf cannot serialize a message of 2 GiB or more.
MAX_INLINE_BYTES = 2**31 - 1


def _external_locations(model: object) -> dict[str, int]:
    from onnx import TensorProto
    from onnx.external_data_helper import _get_all_tensors

    out: dict[str, int] = {}
    for tensor in _get_all_tensors(model):  # type: ignore[arg-type]
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        loc = info.get("location", "")
        out[loc] = out.get(loc, 0) + int(info.get("length", 0) or 0)
    return out


def single_model_file(path: Path, fmt: str, workdir: Path) -> tuple[Path, list[str]]:
    """The file to pack for model ``path``: itself, or a copy with external data inlined."""
    if fmt != "onnx":
        return path, []
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # DecodeError and others
        raise PackError(f"{path} is not a readable ONNX model: {e}") from e
    locations = _external_locations(model)
    if not locations:
        return path, []
    base = path.parent.resolve()
    missing = []
    for loc in locations:
        target = (base / loc).resolve()
        if base not in target.parents:
            raise PackError(
                f"{path.name} points at external data {loc!r} outside its folder; refusing to "
                "read it. Re-export the model with its weights inline "
                "(torch.onnx.export(..., external_data=False)) or next to it"
            )
        if not target.is_file():
            missing.append(loc)
    if missing:
        raise PackError(
            f"{path.name} keeps its weights in external data {', '.join(sorted(missing))}, "
            f"which is not next to it in {base}. Copy it there, or re-export the model with "
            "its weights inline (torch.onnx.export(..., external_data=False))"
        )
    try:
        from onnx.external_data_helper import load_external_data_for_model

        load_external_data_for_model(model, str(base))
    except Exception as e:
        raise PackError(f"cannot read the external data of {path.name}: {e}") from e
    size = model.ByteSize()
    if size >= MAX_INLINE_BYTES:
        raise PackError(
            f"{path.name} with its external data is {size / 2**30:.2f} GiB, over the 2 GiB a "
            "single ONNX file can hold; a bundle carries one model file. Quantize or shrink "
            "the model first"
        )
    out = workdir / path.name
    onnx.save(model, str(out))
    note = (
        f"inlined external data {', '.join(sorted(locations))} "
        f"({sum(locations.values()) / 1024:.1f} KiB) into the packed model"
    )
    return out, [note]
