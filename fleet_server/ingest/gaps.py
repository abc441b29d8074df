"""Records lost between device and database, from gaps in each device's sequence numbers.

A device numbers its records 1, 2, 3, ... across all kinds (``seq`` in
:mod:`device_agent.protocol`), so with nothing lost the stored ``seq`` of a device form
one run without holes. A hole whose both neighbours arrived more than
``settle_seconds`` ago is counted as lost: records still on their way (a backlog sent
kind by kind after an outage, a batch in flight) fill their holes before that. A jump
larger than ``restart_gap`` is the device's store starting over above any number it may
have used (its file was lost), not a loss between device and database.

The figures come from the database, so every replica sees the same (with a shared
subscription each replica ingests only part of each device's records). The hole is
attributed to the kind of the record after it (``kind``): the device's sequence numbers
do not say which kind a missing record had.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from sqlalchemy import Engine, text

from fleet_server.db.telemetry import TABLES_BY_KIND

#: a jump at least this large is a store restart, not a loss
RESTART_GAP = 1_000_000


@dataclass(frozen=True)
class Loss:
    device_id: str
    kind: str
    records: int


def records_lost(
    engine: Engine,
    *,
    settle_seconds: float = 60.0,
    restart_gap: int = RESTART_GAP,
    now: float | None = None,
    device_ids: list[str] | None = None,
) -> list[Loss]:
    """Lost records per device and kind (kind = the kind of the record after the hole)."""
    horizon = (time.time() if now is None else now) - settle_seconds
    union = " UNION ALL ".join(
        f"SELECT device_id, seq, received_at, '{kind}' AS kind FROM {table.name}"
        for kind, table in TABLES_BY_KIND.items()
    )
    where = ""
    params: dict[str, object] = {"horizon": horizon, "restart": restart_gap}
    if device_ids is not None:
        if not device_ids:
            return []
        names = [f":d{i}" for i in range(len(device_ids))]
        where = f"WHERE device_id IN ({', '.join(names)})"
        params.update({f"d{i}": d for i, d in enumerate(device_ids)})
    sql = f"""
        SELECT device_id, kind, SUM(seq - prev_seq - 1) AS lost FROM (
            SELECT device_id, seq, kind, received_at,
                   LAG(seq) OVER (PARTITION BY device_id ORDER BY seq) AS prev_seq,
                   LAG(received_at) OVER (PARTITION BY device_id ORDER BY seq) AS prev_at
            FROM ({union}) AS t {where}
        ) AS g
        WHERE prev_seq IS NOT NULL AND seq - prev_seq > 1 AND seq - prev_seq < :restart
          AND received_at < :horizon AND prev_at < :horizon
        GROUP BY device_id, kind
        ORDER BY device_id, kind
    """
    with engine.connect() as conn:
        rows = conn.execute(text(sql), params).all()
    return [Loss(str(d), str(k), int(n)) for d, k, n in rows if n]


__all__ = ["Loss", "RESTART_GAP", "records_lost"]
