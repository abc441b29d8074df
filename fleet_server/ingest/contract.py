"""Incoming telemetry checked against the wire contract of :mod:`device_agent.protocol`.

The dataclasses there are the one definition; here pydantic validates raw JSON against
them in strict mode (no type coercion, no NaN or infinity, unknown summary fields
refused), which also runs each class's ``__post_init__`` bounds and invariants. A record
that breaks the contract is rejected with a reason code (a metrics label) and never
reaches the database, so it never reaches a rollout gate; the good records beside it in
the same message are kept.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated, Any, Union

from pydantic import Field, TypeAdapter, ValidationError

from device_agent.protocol import (
    MAX_MESSAGE_BYTES,
    ContractError,
    EventRecord,
    SampleRecord,
    SummaryRecord,
    TelemetryMessage,
)
from fleet_server.ingest.errors import MalformedTelemetryError

#: the protocol's record union, told apart by ``kind`` (one member tried, not three)
_Record = Annotated[
    Union[SummaryRecord, SampleRecord, EventRecord],  # noqa: UP007
    Field(discriminator="kind"),
]


@dataclass(frozen=True)
class _Message(TelemetryMessage):
    """:class:`TelemetryMessage` with the discriminated union (its bounds are inherited)."""

    records: list[_Record]  # type: ignore[assignment]


_MESSAGE: TypeAdapter[_Message] = TypeAdapter(_Message)

#: pydantic error types -> our reason codes
_REASONS = {
    "finite_number": "not_finite",
    "missing": "bad_fields",
    "unexpected_keyword_argument": "bad_fields",
    "extra_forbidden": "bad_fields",
    "too_long": "out_of_bounds",
    "too_short": "out_of_bounds",
    "int_from_float": "bad_type",
    "dataclass_type": "bad_type",
    "dataclass_exact_type": "bad_type",
    "literal_error": "unknown_kind",
    "union_tag_invalid": "unknown_kind",
}

#: the reason codes a record can be rejected for
RECORD_REASONS = (
    "negative_count",
    "errors_exceed_count",
    "histogram_mismatch",
    "not_finite",
    "out_of_bounds",
    "bad_fields",
    "bad_type",
    "unknown_kind",
    "too_large",
    "invalid",
)


def _reason(error: Any) -> str:
    ctx = error.get("ctx") or {}
    exc = ctx.get("error")
    if isinstance(exc, ContractError):
        return exc.code
    kind = str(error.get("type", ""))
    if kind in _REASONS:
        return _REASONS[kind]
    if kind.endswith("_type") or kind.endswith("_parsing"):
        return "bad_type"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return "out_of_bounds"
    return "invalid"


def _record_reasons(errors: Iterable[Any]) -> dict[int, str]:
    """Per record index, why it was rejected: the first error of the variant whose
    ``kind`` matched (errors of the other union members are noise)."""
    by_record: dict[int, dict[str, list[Any]]] = {}
    for e in errors:
        loc = tuple(e.get("loc", ()))
        if len(loc) < 2 or loc[0] != "records" or not isinstance(loc[1], int):
            continue
        variant = str(loc[2]) if len(loc) > 2 else ""
        by_record.setdefault(loc[1], {}).setdefault(variant, []).append(e)
    out: dict[int, str] = {}
    for index, variants in by_record.items():
        matched = [
            errs
            for errs in variants.values()
            if not any(tuple(x["loc"])[3:] == ("kind",) for x in errs)
        ]
        if not matched:
            out[index] = "unknown_kind"
            continue
        errs = matched[0]
        # a contract rule (value_error) says more than a type error beside it
        rule = [x for x in errs if isinstance((x.get("ctx") or {}).get("error"), ContractError)]
        out[index] = _reason((rule or errs)[0])
    return out


def check_message(payload: bytes, device_id: str) -> dict[int, str]:
    """Reasons keyed by the index of each record that breaks the contract (empty if all
    hold); :class:`MalformedTelemetryError` when the message itself does."""
    if len(payload) > MAX_MESSAGE_BYTES:
        raise MalformedTelemetryError(
            f"message from {device_id} is {len(payload)} bytes, above {MAX_MESSAGE_BYTES}"
        )
    try:
        _MESSAGE.validate_json(payload)
    except ValidationError as e:
        errors = e.errors()
        reasons = _record_reasons(errors)
        envelope = [
            x for x in errors if tuple(x.get("loc", ()))[:1] != ("records",) or len(x["loc"]) < 2
        ]
        if envelope:
            raise MalformedTelemetryError(
                f"message from {device_id} breaks the contract: {envelope[0]['msg']}"
            ) from e
        return reasons
    return {}


__all__ = ["RECORD_REASONS", "check_message"]
