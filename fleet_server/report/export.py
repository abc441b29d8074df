"""Sampled inferences of a model, group and window as a Parquet file (for retraining).

One row per stored sample (``telemetry_samples``: inputs and outputs already masked on
the device), oldest first. Columns:

* ``device_id``, ``seq``, ``ts`` (device clock), ``received_at`` (server clock; the
  window filters on it), ``model``, ``version``, ``predicted``;
* ``label``: the true label when the sample carries one (apps post labels to the agent,
  which today sums them into the window's label summary and does not attach them to
  samples, so the column is null until it does);
* for each input and output tensor the model's bundles name (and any other the first
  5000 samples carry): ``input_<name>`` /
  ``output_<name>`` (the values, flattened, as float64; null where the device masked
  the tensor by hash) and ``input_<name>_shape`` / ``output_<name>_shape``;
* ``inputs_json`` / ``outputs_json``: the sample exactly as stored (every tensor,
  including masked ones as ``sha256:…`` or with dropped elements as null).

``pyarrow`` is imported when an export runs (it is in the server extra).
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import orjson
from sqlalchemy import select
from sqlalchemy.orm import Session

from device_agent.payloads import decode_array
from fleet_server.db.models import Bundle
from fleet_server.db.telemetry import TelemetrySample

#: rows per Parquet row group (and per database fetch)
BATCH = 5000


@dataclass(frozen=True)
class ExportStats:
    rows: int
    devices: int
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


def tensor_names(session: Session, model: str | None) -> tuple[list[str], list[str]]:
    """Input and output names of ``model``'s bundles (every bundle's if None), in order."""
    stmt = select(Bundle.manifest).order_by(Bundle.version)
    if model is not None:
        stmt = stmt.where(Bundle.name == model)
    ins: dict[str, None] = {}
    outs: dict[str, None] = {}
    for manifest in session.scalars(stmt):
        for spec in (manifest or {}).get("inputs") or []:
            if isinstance(spec, dict) and isinstance(spec.get("name"), str):
                ins[spec["name"]] = None
        for spec in (manifest or {}).get("outputs") or []:
            if isinstance(spec, dict) and isinstance(spec.get("name"), str):
                outs[spec["name"]] = None
    return list(ins), list(outs)


def _values(enc: Any) -> tuple[list[float | None] | None, list[int] | None]:
    """Flattened float values and shape of one stored tensor (None, None if hashed)."""
    if not isinstance(enc, dict):
        return None, None
    try:
        if "data" in enc:
            arr = decode_array(enc)
            flat = arr.astype(np.float64).ravel().tolist()
            return [v if math.isfinite(v) else None for v in flat], list(arr.shape)
        if isinstance(enc.get("values"), list):
            vals = [float(v) if isinstance(v, (int, float)) else None for v in enc["values"]]
            return vals, [int(s) for s in enc.get("shape") or []]
    except (ValueError, TypeError, KeyError):
        return None, None
    return None, None


def _label(body: dict[str, Any]) -> str | None:
    label = body.get("label", body.get("labels"))
    if label is None:
        return None
    return label if isinstance(label, str) else json.dumps(label)


def _schema(ins: list[str], outs: list[str]) -> Any:
    import pyarrow as pa

    fields = [
        pa.field("device_id", pa.string(), nullable=False),
        pa.field("seq", pa.int64(), nullable=False),
        pa.field("ts", pa.timestamp("us", tz="UTC")),
        pa.field("received_at", pa.timestamp("us", tz="UTC")),
        pa.field("model", pa.string()),
        pa.field("version", pa.int32()),
        pa.field("predicted", pa.string()),
        pa.field("label", pa.string()),
    ]
    for prefix, names in (("input", ins), ("output", outs)):
        for n in names:
            fields.append(pa.field(f"{prefix}_{n}", pa.list_(pa.float64())))
            fields.append(pa.field(f"{prefix}_{n}_shape", pa.list_(pa.int64())))
    fields += [pa.field("inputs_json", pa.string()), pa.field("outputs_json", pa.string())]
    return pa.schema(fields)


def _rows(
    session: Session,
    model: str | None,
    devices: Collection[str] | None,
    since: float | None,
    until: float | None,
) -> Iterator[TelemetrySample]:
    t = TelemetrySample
    stmt = select(
        t.device_id, t.seq, t.ts, t.received_at, t.name, t.version, t.predicted, t.body
    ).order_by(t.received_at, t.device_id, t.seq)
    if model is not None:
        stmt = stmt.where(t.name == model)
    if since is not None:
        stmt = stmt.where(t.received_at >= since)
    if until is not None:
        stmt = stmt.where(t.received_at < until)
    for row in session.execute(stmt.execution_options(yield_per=BATCH)):
        if devices is None or row.device_id in devices:
            yield row  # type: ignore[misc]  # a row with the sample's columns, not an entity


def write_samples_parquet(
    session: Session,
    out: str | Path | BinaryIO,
    *,
    model: str | None = None,
    devices: Collection[str] | None = None,
    since: float | None = None,
    until: float | None = None,
) -> ExportStats:
    """Write the samples of ``model`` (all models if None) from ``devices`` (all if None)
    received in ``[since, until)`` to ``out`` as Parquet (zstd); the file always has the
    columns, also with no rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    ins, outs = tensor_names(session, model)
    samples = _rows(session, model, devices, since, until)
    first: list[tuple[TelemetrySample, dict[str, Any], dict[str, Any], dict[str, Any]]] = []
    for r in samples:  # the first batch also names tensors the manifests do not list
        first.append(_parts(r))
        if len(first) >= BATCH:
            break
    for _, _, inputs, outputs in first:
        ins += [n for n in inputs if n not in ins]
        outs += [n for n in outputs if n not in outs]
    schema = _schema(ins, outs)
    cols: dict[str, list[Any]] = {f.name: [] for f in schema}
    rows = 0
    seen: set[str] = set()

    def add(r: TelemetrySample, body: dict[str, Any], inputs: Any, outputs: Any) -> None:
        cols["device_id"].append(r.device_id)
        cols["seq"].append(r.seq)
        cols["ts"].append(int(r.ts * 1e6))
        cols["received_at"].append(int(r.received_at * 1e6))
        cols["model"].append(r.name)
        cols["version"].append(r.version)
        cols["predicted"].append(r.predicted)
        cols["label"].append(_label(body))
        for prefix, names, tensors in (("input", ins, inputs), ("output", outs, outputs)):
            for n in names:
                vals, shape = _values(tensors.get(n))
                cols[f"{prefix}_{n}"].append(vals)
                cols[f"{prefix}_{n}_shape"].append(shape)
        cols["inputs_json"].append(orjson.dumps(inputs).decode())
        cols["outputs_json"].append(orjson.dumps(outputs).decode())

    def flush(writer: Any) -> None:
        if cols["seq"]:
            writer.write_table(pa.Table.from_pydict(cols, schema=schema))
            for v in cols.values():
                v.clear()

    with pq.ParquetWriter(out, schema, compression="zstd") as writer:
        for parts in itertools.chain(first, map(_parts, samples)):
            add(*parts)
            rows += 1
            seen.add(parts[0].device_id)
            if len(cols["seq"]) >= BATCH:
                flush(writer)
        flush(writer)
    return ExportStats(rows, len(seen), tuple(ins), tuple(outs))


def _parts(
    r: TelemetrySample,
) -> tuple[TelemetrySample, dict[str, Any], dict[str, Any], dict[str, Any]]:
    body = r.body if isinstance(r.body, dict) else {}
    inputs = body.get("inputs")
    outputs = body.get("outputs")
    return (
        r,
        body,
        inputs if isinstance(inputs, dict) else {},
        outputs if isinstance(outputs, dict) else {},
    )


__all__ = ["BATCH", "ExportStats", "tensor_names", "write_samples_parquet"]
