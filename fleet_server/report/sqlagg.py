"""Summing telemetry inside the database (SQLite and PostgreSQL) for the review.

Decoding every summary's JSON arrays in Python costs tens of microseconds per
row, which is minutes for a day of a large fleet. Here the sums that the review
needs are computed by the database over the JSON arrays themselves (SQLite's
``json_each``, PostgreSQL's ``json_array_elements_text`` / ``json_each``); only
one row per (version, time bin, bucket) or (device, version, feature, bin)
comes back. :mod:`.load` uses this on SQLite and PostgreSQL and the portable
row-by-row pass elsewhere; the tests check that both give the same dataset.

Time bins are ``floor((received_at - lo) / width)``, clamped to the last bin,
the same as :class:`.aggregate.VersionSeries` places a row.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

SUPPORTED = ("sqlite", "postgresql")

_T = "telemetry_summaries"


def supported(session: Session) -> bool:
    return session.get_bind().dialect.name in SUPPORTED


def _pg(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def _bin(session: Session) -> str:
    # received_at >= :lo, so truncation is floor on SQLite; PostgreSQL's cast rounds
    if _pg(session):
        return "CAST(floor((s.received_at - :lo) / :width) AS INTEGER)"
    return "CAST((s.received_at - :lo) / :width AS INTEGER)"


def _elements(session: Session, column: str, alias: str) -> str:
    """A FROM item yielding ``alias.idx`` (0-based) and ``alias.v`` for a JSON array."""
    if _pg(session):
        return (
            f"LATERAL json_array_elements_text(CAST({column} AS json)) WITH ORDINALITY "
            f"AS {alias}(v, ord)"
        )
    return f"json_each({column}) AS {alias}"


def _idx(session: Session, alias: str) -> str:
    return f"({alias}.ord - 1)" if _pg(session) else f"CAST({alias}.key AS INTEGER)"


def _val(session: Session, alias: str) -> str:
    return f"CAST({alias}.v AS BIGINT)" if _pg(session) else f"{alias}.value"


def _nonzero(session: Session, alias: str) -> str:
    """Skip empty buckets early: most histogram buckets are zero, and grouping is the cost."""
    return f"{alias}.v <> '0'" if _pg(session) else f"{alias}.value <> 0"


def _is_array(session: Session, column: str) -> str:
    if _pg(session):
        return f"json_typeof(CAST({column} AS json)) = 'array'"
    return f"json_type({column}) = 'array'"


def _nonempty_object(session: Session, column: str) -> str:
    if _pg(session):
        return (
            f"json_typeof(CAST({column} AS json)) = 'object' "
            f"AND CAST({column} AS text) NOT IN ('{{}}', '')"
        )
    return f"json_type({column}) = 'object' AND {column} != '{{}}'"


def _rows(session: Session, sql: str, **params: Any) -> Iterator[Any]:
    yield from session.execute(text(sql), params)


def version_totals(
    session: Session, lo: float, hi: float, width: float
) -> Iterator[tuple[str, int, int, int, int, float | None, int]]:
    """(name, version, bin, count, errors, sum of p95 x count, count with a p95)."""
    b = _bin(session)
    return _rows(
        session,
        f"""
        SELECT s.name, s.version, {b} AS bin, SUM(s.count), SUM(s.errors),
               SUM(CASE WHEN s.p95_ms IS NOT NULL THEN s.p95_ms * s.count END),
               SUM(CASE WHEN s.p95_ms IS NOT NULL THEN s.count ELSE 0 END)
        FROM {_T} s WHERE s.received_at >= :lo AND s.received_at <= :hi
        GROUP BY s.name, s.version, {b}""",
        lo=lo,
        hi=hi,
        width=width,
    )


def latency_buckets(
    session: Session, lo: float, hi: float, width: float
) -> Iterator[tuple[str, int, int, int, int]]:
    """(name, version, bin, bucket index, summed count) over the latency histograms."""
    b = _bin(session)
    return _rows(
        session,
        f"""
        SELECT s.name, s.version, {b} AS bin, {_idx(session, "e")} AS idx,
               SUM({_val(session, "e")})
        FROM {_T} s, {_elements(session, "s.latency_hist", "e")}
        WHERE s.received_at >= :lo AND s.received_at <= :hi
          AND {_is_array(session, "s.latency_hist")} AND {_nonzero(session, "e")}
        GROUP BY s.name, s.version, {b}, {_idx(session, "e")}""",
        lo=lo,
        hi=hi,
        width=width,
    )


def feature_buckets(
    session: Session, lo: float, hi: float
) -> Iterator[tuple[str, str, int, str, int, int]]:
    """(device, name, version, feature, bin index, summed count) of binned inputs."""
    if _pg(session):
        feats = "LATERAL json_each(CAST(s.feature_counts AS json)) AS f(key, value)"
        cells = "LATERAL json_array_elements_text(f.value) WITH ORDINALITY AS c(v, ord)"
    else:
        feats = "json_each(s.feature_counts) AS f"
        cells = "json_each(f.value) AS c"
    return _rows(
        session,
        f"""
        SELECT s.device_id, s.name, s.version, f.key, {_idx(session, "c")} AS idx,
               SUM({_val(session, "c")})
        FROM {_T} s, {feats}, {cells}
        WHERE s.received_at >= :lo AND s.received_at <= :hi
          AND {_nonempty_object(session, "s.feature_counts")} AND {_nonzero(session, "c")}
        GROUP BY s.device_id, s.name, s.version, f.key, {_idx(session, "c")}""",
        lo=lo,
        hi=hi,
    )


def feature_weights(session: Session, lo: float, hi: float) -> Iterator[tuple[str, str, int, int]]:
    """(device, name, version, weight): inferences of the windows that carried inputs."""
    return _rows(
        session,
        f"""
        SELECT s.device_id, s.name, s.version,
               SUM(CASE WHEN s.count > 1 THEN s.count ELSE 1 END)
        FROM {_T} s
        WHERE s.received_at >= :lo AND s.received_at <= :hi
          AND {_nonempty_object(session, "s.feature_counts")}
        GROUP BY s.device_id, s.name, s.version""",
        lo=lo,
        hi=hi,
    )


def prediction_buckets(
    session: Session, lo: float, hi: float
) -> Iterator[tuple[str, str, int, str | None, int, int]]:
    """(device, name, version, rollout, class index, summed count) of predictions."""
    return _rows(
        session,
        f"""
        SELECT s.device_id, s.name, s.version, s.rollout_id, {_idx(session, "e")} AS idx,
               SUM({_val(session, "e")})
        FROM {_T} s, {_elements(session, "s.prediction_counts", "e")}
        WHERE s.received_at >= :lo AND s.received_at <= :hi
          AND {_is_array(session, "s.prediction_counts")} AND {_nonzero(session, "e")}
        GROUP BY s.device_id, s.name, s.version, s.rollout_id, {_idx(session, "e")}""",
        lo=lo,
        hi=min(hi, 1e18),
    )
