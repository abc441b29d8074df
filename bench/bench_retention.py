"""Telemetry retention on PostgreSQL: day partitions against one plain table.

Two measurements, each on fresh PostgreSQL databases (127.0.0.1:5432, as the tests):

1. **ingest**: window summaries of ``--devices`` devices over ``--hours`` hours at 60 s
   windows (the fleet bench's rate), parsed beforehand, stored with
   :class:`TelemetryWriter` in batches of ``--batch`` records (as the ingestion worker
   does): records per second, and the database bytes (table, indexes, TOAST; with
   partitions also the key table) per device-day. Plain: one table, primary key
   ``(device_id, seq)``; partitioned: day partitions plus the key table.
2. **retention**: ``--drop-rows`` summaries received on one day and a fifth as many on
   the next, written by the database itself (copies of one real row); then the first
   day removed: ``DROP TABLE`` of its partition, against ``DELETE ... WHERE received_at
   < day end`` on the plain table followed by the ``VACUUM`` that makes its space
   reusable.

After the ingest run of the partitioned tables each hour is rolled up
(:func:`roll_up_hour`): seconds per hour, and the roll-up's bytes per device-day.

Not part of CI. ``python bench/bench_retention.py [--devices 200] [--hours 6]
[--drop-rows 1000000] [--json out.json]``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import Engine, text  # noqa: E402

from device_agent.protocol import telemetry_topic  # noqa: E402
from fleet_server.db import partitions  # noqa: E402
from fleet_server.db.partitions import DAY, KEYS_TABLE  # noqa: E402
from fleet_server.db.session import make_engine  # noqa: E402
from fleet_server.db.telemetry import (  # noqa: E402
    HOUR,
    TelemetrySummary,
    create_telemetry_tables,
)
from fleet_server.ingest import ParsedMessage, TelemetryWriter, parse_message  # noqa: E402
from fleet_server.ingest.retention import roll_up_hour  # noqa: E402
from tests.fleet_server.ingest.test_parse import payload, summary_body  # noqa: E402
from tests.pg import fresh_database  # noqa: E402

#: a Monday, midnight UTC
D0 = 20759 * DAY
T = TelemetrySummary.__tablename__


@contextlib.contextmanager
def database(partitioned: bool) -> Iterator[Engine]:
    with fresh_database("edgefleet_bench_retention") as url:
        engine = make_engine(url)
        try:
            create_telemetry_tables(engine, partitioned=partitioned)
            if partitioned:
                with engine.begin() as c:
                    for day in range(day_of(D0), day_of(D0) + 3):
                        partitions.ensure_day(c, T, day)
            yield engine
        finally:
            engine.dispose()


def day_of(t: float) -> int:
    return int(t // DAY)


def messages(devices: int, hours: int, per_message: int) -> list[ParsedMessage]:
    """60 s windows of every device, ``per_message`` records a message (the reporter's
    batching), in the order they would arrive."""
    out = []
    windows = hours * 60
    body = summary_body()
    body["drift"]["features"] = [
        {"name": f"f{i}", "psi": 0.02, "ks": 0.05, "counts": [100 + i] * 10} for i in range(8)
    ]
    for start in range(0, windows, per_message):
        for d in range(devices):
            dev = f"dev-{d:05d}"
            records = [(w + 1, "summary", body) for w in range(start, start + per_message)]
            received = D0 + (start + per_message) * 60 + d * 0.01
            out.append(
                parse_message(telemetry_topic(dev, "summary"), payload(dev, records), received)
            )
    return out


def db_bytes(engine: Engine, partitioned: bool) -> dict[str, int]:
    with engine.connect() as c:
        c.execute(text("CHECKPOINT"))
        if partitioned:
            table = partitions.partition_bytes(c, T)
            keys = int(
                c.execute(text(f"SELECT pg_total_relation_size('{KEYS_TABLE}')")).scalar_one()
            )
        else:
            table = int(c.execute(text(f"SELECT pg_total_relation_size('{T}')")).scalar_one())
            keys = 0
    return {"table": table, "keys": keys}


def bench_ingest(args: argparse.Namespace) -> dict[str, Any]:
    msgs = messages(args.devices, args.hours, args.per_message)
    records = sum(len(m.rows["summary"]) for m in msgs)
    out: dict[str, Any] = {"records": records, "devices": args.devices, "hours": args.hours}
    for partitioned in (False, True):
        mode = "partitioned" if partitioned else "plain"
        with database(partitioned) as engine:
            writer = TelemetryWriter(engine)
            step = max(1, args.batch // args.per_message)
            cpu0, t0 = time.process_time(), time.perf_counter()
            stored = 0
            for i in range(0, len(msgs), step):
                stored += writer.write(msgs[i : i + step]).stored
            wall = time.perf_counter() - t0
            cpu = time.process_time() - cpu0
            assert stored == records, (stored, records)
            again = writer.write(msgs[:step])  # re-delivered: nothing new
            assert again.stored == 0
            size = db_bytes(engine, partitioned)
            device_days = args.devices * args.hours / 24
            t0 = time.perf_counter()
            with engine.begin() as c:
                hourly_rows = sum(roll_up_hour(c, D0 + h * HOUR) for h in range(args.hours + 1))
            rollup_s = time.perf_counter() - t0
            with engine.connect() as c:
                c.execute(text("CHECKPOINT"))
                hourly_bytes = int(
                    c.execute(
                        text("SELECT pg_total_relation_size('telemetry_hourly')")
                    ).scalar_one()
                )
            out[mode] = {
                "seconds": round(wall, 2),
                "records_per_s": round(records / wall),
                "client_cpu_us_per_record": round(cpu / records * 1e6, 1),
                "table_bytes": size["table"],
                "key_bytes": size["keys"],
                "bytes_per_device_day": round((size["table"] + size["keys"]) / device_days),
                "bytes_per_record": round((size["table"] + size["keys"]) / records),
                "rollup_seconds_per_hour": round(rollup_s / (args.hours + 1), 2),
                "rollup_rows": hourly_rows,
                "rollup_bytes_per_device_day": round(hourly_bytes / device_days),
            }
            print(mode, out[mode], flush=True)
    return out


def bench_drop(args: argparse.Namespace) -> dict[str, Any]:
    n, rest = args.drop_rows, args.drop_rows // 5
    out: dict[str, Any] = {"rows_in_day": n, "rows_next_day": rest}
    cols = [c.name for c in TelemetrySummary.__table__.columns]
    for partitioned in (False, True):
        mode = "partitioned" if partitioned else "plain"
        with database(partitioned) as engine:
            template = messages(1, 1, 1)[0]
            TelemetryWriter(engine).write([template])
            for lo, count, first in ((D0, n, 10), (D0 + DAY, rest, 10 + n)):
                exprs = {
                    "device_id": "'dev-' || lpad((g % 1000)::text, 5, '0')",
                    "seq": f"g + {first}",
                    "received_at": f"{lo} + (g::float8 / {count}) * {DAY - 1}",
                }
                select = ", ".join(exprs.get(c, c) for c in cols)
                t0 = time.perf_counter()
                with engine.begin() as c:
                    c.execute(
                        text(
                            f"INSERT INTO {T} ({', '.join(cols)}) SELECT {select} "
                            f"FROM (SELECT * FROM {T} WHERE seq = 1) t, "
                            f"generate_series(1, {count}) g"
                        )
                    )
                print(
                    f"{mode}: {count} rows written in {time.perf_counter() - t0:.1f} s", flush=True
                )
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
                c.execute(text(f"VACUUM ANALYZE {T}"))
            before = db_bytes(engine, partitioned)
            t0 = time.perf_counter()
            with engine.begin() as c:
                if partitioned:
                    partitions.drop_day(c, T, day_of(D0))
                else:
                    c.execute(text(f"DELETE FROM {T} WHERE received_at < {D0 + DAY}"))
            remove = time.perf_counter() - t0
            vacuum = 0.0
            if not partitioned:
                with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
                    t0 = time.perf_counter()
                    c.execute(text(f"VACUUM {T}"))
                    vacuum = time.perf_counter() - t0
            after = db_bytes(engine, partitioned)
            with engine.connect() as c:
                left = c.execute(text(f"SELECT count(*) FROM {T}")).scalar_one()
            assert left == rest, (left, rest)
            out[mode] = {
                "remove_seconds": round(remove, 3),
                "vacuum_seconds": round(vacuum, 2),
                "bytes_before": before["table"],
                "bytes_after": after["table"],
            }
            print(mode, out[mode], flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=200)
    ap.add_argument("--hours", type=int, default=6)
    ap.add_argument("--per-message", type=int, default=10)
    ap.add_argument("--batch", type=int, default=500, help="records per write")
    ap.add_argument("--drop-rows", type=int, default=1_000_000)
    ap.add_argument("--skip-ingest", action="store_true")
    ap.add_argument("--skip-drop", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    result: dict[str, Any] = {"loadavg_before": os.getloadavg()}
    if not args.skip_ingest:
        result["ingest"] = bench_ingest(args)
    if not args.skip_drop:
        result["retention"] = bench_drop(args)
    result["loadavg_after"] = os.getloadavg()
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
