"""Incoming telemetry checked against the wire contract of :mod:`device_agent.protocol`.

The dataclasses there are the one definition; here pydantic validates raw JSON against
them in strict mode (no type coercion, no NaN or infinity, unknown summary fields
refused), which also runs each class's ``__post_init__`` bounds and invariants. A record
that breaks the contract is rejected with a reason code (a metrics label) and never
reaches the database, so it never reaches a rollout gate; the good records beside it in
the same message are kept.

Invariants of :func:`validate_message`:

* the payload is decoded and validated in one pass (pydantic's own JSON parser), and the
  caller builds its rows from the validated objects: nothing is decoded a second time on
  the path every good message takes;
* a record that breaks the contract comes out of that pass as ``None`` (the other records
  are still validated), so one poisoned record costs its neighbours nothing;
* only then, and only for a message with a rejected record, the message is validated
  once more without that tolerance to learn *why* each record failed (the reason codes).
  Both passes run the same classes with the same configuration; they differ in one
  wrapper, and a test proves they reject the same records.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated, Any, NoReturn, Union

from pydantic import Field, GetCoreSchemaHandler, TypeAdapter, ValidationError
from pydantic_core import core_schema, from_json

from device_agent.protocol import (
    MAX_MESSAGE_BYTES,
    ContractError,
    EventRecord,
    SampleRecord,
    SummaryRecord,
    TelemetryMessage,
    TelemetryRecord,
)
from fleet_server.ingest.errors import MalformedTelemetryError, SpoofedDeviceError

#: the protocol's record union, told apart by ``kind`` (one member tried, not three)
_Record = Annotated[
    Union[SummaryRecord, SampleRecord, EventRecord],  # noqa: UP007
    Field(discriminator="kind"),
]


class _NoneIfInvalid:
    """A record that fails validation becomes ``None`` instead of failing the message."""

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.with_default_schema(handler(source), default=None, on_error="default")


@dataclass(frozen=True)
class _Message(TelemetryMessage):
    """:class:`TelemetryMessage` with the discriminated union (its bounds are inherited)."""

    records: list[_Record]  # type: ignore[assignment]


@dataclass(frozen=True)
class _TolerantMessage(TelemetryMessage):
    """:class:`_Message` whose records that break the contract come out as ``None``."""

    records: list[Annotated[_Record, _NoneIfInvalid()] | None]  # type: ignore[assignment]


#: the fast pass: every good record validated into the protocol's classes
_TOLERANT: TypeAdapter[_TolerantMessage] = TypeAdapter(_TolerantMessage)
#: the reasons pass (only for a message with a rejected record)
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


@dataclass(frozen=True)
class CheckedMessage:
    """One message after the contract: ``records[i]`` is the validated record, or ``None``
    when it was rejected, and then ``rejected[i]`` says why."""

    device_id: str
    records: list[TelemetryRecord | None]
    rejected: dict[int, str]


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


def _refuse_envelope(payload: bytes, device_id: str, error: ValidationError) -> NoReturn:
    """Raise the error that names what is wrong with the message as a whole, in the order
    of :mod:`.parse`: not JSON, not the envelope, another device's id, then the message's
    own bounds."""
    try:
        obj = from_json(payload)
    except ValueError as e:
        raise MalformedTelemetryError(f"payload from {device_id} is not JSON: {e}") from error
    if not isinstance(obj, dict) or not isinstance(obj.get("records"), list):
        raise MalformedTelemetryError(
            f"payload from {device_id} is not {{'device_id': ..., 'records': [...]}}"
        ) from error
    claimed = obj.get("device_id")
    if claimed != device_id:
        raise spoofed(claimed, device_id) from error
    first = error.errors()[0]
    raise MalformedTelemetryError(
        f"message from {device_id} breaks the contract: {first['msg']}"
    ) from error


def spoofed(claimed: object, device_id: str) -> SpoofedDeviceError:
    return SpoofedDeviceError(
        f"payload claims device {claimed!r} but was published under {device_id!r}; "
        "check the broker ACL (a device may publish only under its own id)"
    )


def validate_message(payload: bytes, device_id: str) -> CheckedMessage:
    """Decode and check one message published under ``device_id`` in one pass.

    :class:`MalformedTelemetryError` when the message as a whole breaks the contract
    (too large, not JSON, not the envelope, too many records, an oversized id),
    :class:`SpoofedDeviceError` when it claims another device; otherwise every record is
    either validated or rejected with a reason.
    """
    if len(payload) > MAX_MESSAGE_BYTES:  # before decoding anything
        raise MalformedTelemetryError(
            f"message from {device_id} is {len(payload)} bytes, above {MAX_MESSAGE_BYTES}"
        )
    try:
        message = _TOLERANT.validate_json(payload)
    except ValidationError as e:
        _refuse_envelope(payload, device_id, e)
    if message.device_id != device_id:
        raise spoofed(message.device_id, device_id)
    records: list[TelemetryRecord | None] = list(message.records)
    if None not in records:
        return CheckedMessage(device_id, records, {})
    try:
        _MESSAGE.validate_json(payload)
        reasons: dict[int, str] = {}
    except ValidationError as e:
        reasons = _record_reasons(e.errors())
    rejected = {i: reasons.get(i, "invalid") for i, r in enumerate(records) if r is None}
    return CheckedMessage(device_id, records, rejected)


def check_message(payload: bytes, device_id: str) -> dict[int, str]:
    """Reasons keyed by the index of each record that breaks the contract (empty if all
    hold); :class:`MalformedTelemetryError` when the message itself does."""
    return validate_message(payload, device_id).rejected


__all__ = ["RECORD_REASONS", "CheckedMessage", "check_message", "validate_message"]
