"""One pass over each message: the records that pass are validated once, into the
protocol's own classes, and the rows are built from them; the second, strict pass that
names the reasons runs only for a message with a rejected record. These tests prove the
two passes reject exactly the same records over a corpus of good and poisoned ones (the
poisoned cases of the contract tests included), and that a summary message is never
decoded a second time."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
from pydantic import ValidationError

from device_agent.protocol import telemetry_topic
from fleet_server.ingest import MalformedTelemetryError, SpoofedDeviceError, parse_message
from fleet_server.ingest.contract import _MESSAGE, _TOLERANT, validate_message
from fleet_server.ingest.jsoncodec import FAST, STDLIB, Codec
from tests.fleet_server.ingest.test_contract import POISON
from tests.fleet_server.ingest.test_labels_ingest import LABELS, PREVIOUS
from tests.fleet_server.ingest.test_parse import install_body, summary_body

TOPIC = telemetry_topic("dev-a", "summary")
SAMPLE = {"name": "m", "version": 7, "predicted": 1, "inputs": {"x": 1.5}, "outputs": {}}

#: records that hold to the contract, one of each shape
GOOD: list[dict[str, Any]] = [
    {"kind": "summary", "body": summary_body()},
    {"kind": "summaries", "body": summary_body(psi=None)},
    {"kind": "summary", "body": {**summary_body(), "labels": LABELS, "previous": PREVIOUS}},
    {
        "kind": "summary",
        "body": summary_body(shadow={"name": "s", "version": 8, "count": 9, "errors": 1}),
    },
    {"kind": "summary", "body": {"name": "m", "version": 1, "count": 0, "errors": 0}},
    {"kind": "events", "body": install_body()},
    {"kind": "event", "body": {**install_body(), "unknown_field": [1, 2]}},
    {"kind": "samples", "body": SAMPLE},
    {"kind": "sample", "body": {**SAMPLE, "predicted": "cat"}},
]


def _summary(**changes: Any) -> dict[str, Any]:
    return {"kind": "summary", "body": {**summary_body(), **changes}}


#: records that break it: the contract tests' poisoned summaries and more of each kind
BAD: list[tuple[str, dict[str, Any]]] = [
    *((what, {"kind": "summary", "body": body}) for what, body, _reason in POISON),
    ("seq below zero", {"seq": -1, "kind": "summary", "body": summary_body()}),
    ("seq as a bool", {"seq": True, "kind": "summary", "body": summary_body()}),
    ("seq of 2**63", {"seq": 2**63, "kind": "summary", "body": summary_body()}),
    ("seq as a string", {"seq": "7", "kind": "summary", "body": summary_body()}),
    ("unknown kind", {"kind": "gossip", "body": summary_body()}),
    ("ts as text", {"kind": "summary", "ts": "yesterday", "body": summary_body()}),
    ("body as text", {"kind": "summary", "body": "text"}),
    ("summary without count", {"kind": "summary", "body": {"name": "m", "version": 1}}),
    ("event without type", {"kind": "events", "body": {"outcome": "installed"}}),
    (
        "event message too long",
        {"kind": "events", "body": {**install_body(), "message": "x" * 5000}},
    ),
    ("sample of negative version", {"kind": "samples", "body": {**SAMPLE, "version": -1}}),
    ("histogram with a bool", _summary(latency_hist=[True])),
    ("labels that do not add up", _summary(labels={**LABELS, "correct": 9})),
    ("previous errors above count", _summary(previous={**PREVIOUS, "errors": 41})),
    ("window ends before it starts", _summary(window_end=-1.0)),
    ("a record that is not an object", {"kind": None, "body": None}),
]


def _record(seq: int, rec: dict[str, Any]) -> Any:
    if rec == {"kind": None, "body": None}:
        return [seq]
    return {"seq": seq, "ts": 1.0 + seq, **rec}


def _message(records: list[Any]) -> bytes:
    return json.dumps({"device_id": "dev-a", "records": records}).encode()


def _strict_rejects(payload: bytes) -> set[int]:
    try:
        _MESSAGE.validate_json(payload)
    except ValidationError as e:
        return {int(x["loc"][1]) for x in e.errors() if x["loc"][:1] == ("records",)}
    return set()


@pytest.mark.parametrize(("what", "bad"), BAD, ids=[b[0] for b in BAD])
def test_both_passes_reject_the_poisoned_record_and_only_it(what: str, bad: dict[str, Any]) -> None:
    raw = _message([_record(1, GOOD[0]), _record(2, bad), _record(3, GOOD[5])])
    fast = [r is None for r in _TOLERANT.validate_json(raw).records]
    assert fast == [False, True, False], what
    assert _strict_rejects(raw) == {1}, what
    checked = validate_message(raw, "dev-a")
    assert set(checked.rejected) == {1} and checked.rejected[1] != "invalid", what


def test_both_passes_agree_on_the_whole_corpus_in_one_message() -> None:
    corpus = [(rec, True) for rec in GOOD] + [(rec, False) for _what, rec in BAD]
    random.Random(7).shuffle(corpus)
    raw = _message([_record(i + 1, rec) for i, (rec, _good) in enumerate(corpus)])
    expected = {i for i, (_rec, good) in enumerate(corpus) if not good}
    records = _TOLERANT.validate_json(raw).records
    assert {i for i, r in enumerate(records) if r is None} == expected
    assert _strict_rejects(raw) == expected
    # each good record validated beside the poisoned ones equals it validated alone
    for i, (rec, good) in enumerate(corpus):
        if good:
            alone = _MESSAGE.validate_json(_message([_record(i + 1, rec)])).records[0]
            assert records[i] == alone
    m = parse_message(TOPIC, raw, 1.0)
    assert (m.records, m.bad_records) == (len(corpus), len(expected))
    assert sum(len(rows) for rows in m.rows.values()) == len(GOOD)


def test_the_reasons_are_those_of_the_contract_tests() -> None:
    raw = _message(
        [_record(i + 1, {"kind": "summary", "body": p[1]}) for i, p in enumerate(POISON)]
    )
    reasons = validate_message(raw, "dev-a").rejected
    assert [reasons[i] for i in range(len(POISON))] == [r for _w, _b, r in POISON]


def _no_decoding(payload: bytes) -> Any:
    raise AssertionError("the message was decoded a second time")


def test_a_summary_message_is_decoded_once() -> None:
    assert FAST is not None
    codec = Codec("no-loads", _no_decoding, FAST.dumps)
    raw = _message([_record(i + 1, GOOD[i]) for i in range(5)])
    m = parse_message(TOPIC, raw, 1.0, codec=codec)
    assert (m.bad_records, len(m.rows["summary"])) == (0, 5)


def test_event_and_sample_rows_keep_the_body_as_sent() -> None:
    raw = _message([_record(1, GOOD[6]), _record(2, GOOD[8]), _record(3, GOOD[0])])
    for codec in (FAST, STDLIB):
        assert codec is not None
        m = parse_message(TOPIC, raw, 1.0, codec=codec)
        assert json.loads(m.rows["events"][0]["body"])["unknown_field"] == [1, 2]
        assert m.rows["samples"][0]["predicted"] == "cat"
        assert json.loads(m.rows["samples"][0]["body"])["inputs"] == {"x": 1.5}


def test_a_body_the_codec_cannot_decode_loses_only_its_own_records() -> None:
    """An infinity in an untyped field (a sample's inputs) passes the typed contract but
    cannot be stored as JSON: the sample is rejected, the summary beside it kept."""
    raw = _message([_record(1, GOOD[0]), _record(2, GOOD[7])])
    raw = raw.replace(b'{"x": 1.5}', b'{"x": 1e999999}')
    for codec in (FAST, STDLIB):
        assert codec is not None
        m = parse_message(TOPIC, raw, 1.0, codec=codec)
        assert (len(m.rows["summary"]), m.rows["samples"], m.rejected) == (
            1,
            [],
            {"invalid": 1},
        ), codec.name


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (b'{"records": []}', SpoofedDeviceError),  # no device id: not this device's
        (b'{"device_id": "dev-b", "records": [{"seq": -1}]}', SpoofedDeviceError),
        (b'{"device_id": "' + b"a" * 101 + b'", "records": []}', SpoofedDeviceError),
        (b'{"device_id": "dev-a", "records": [}', MalformedTelemetryError),
        (b'{"device_id": "dev-a", "records": 5}', MalformedTelemetryError),
        (b'{"device_id": 5, "records": []}', SpoofedDeviceError),
    ],
)
def test_a_message_refused_whole_is_refused_for_the_first_reason_in_order(
    raw: bytes, error: type[Exception]
) -> None:
    with pytest.raises(error):
        parse_message(TOPIC, raw, 1.0)
