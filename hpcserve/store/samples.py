"""Queue and engine samples, raw and rolled up: writes in batches, reads by key and time window."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, insert, select

from hpcserve.store.records import ENGINE_FIELDS, QUEUE_FIELDS, EngineSample, LostWork, QueueSample, Rollup
from hpcserve.store.schema import (
    Base,
    EngineRollupRow,
    EngineSampleRow,
    LostWorkRow,
    QueueRollupRow,
    QueueSampleRow,
)
from hpcserve.store.sql import select_record, to_records, within


def add_samples(
    conn: Connection, model: type[Base], rows: Iterable[QueueSample | EngineSample | LostWork]
) -> int:
    """Insert the samples in one executemany; how many there were."""
    values = [asdict(row) for row in rows]
    if values:
        conn.execute(insert(model), values)
    return len(values)


def queue_samples(
    conn: Connection, partition: str | None, since: datetime | None, until: datetime | None
) -> list[QueueSample]:
    stmt = within(select_record(QueueSampleRow, QueueSample), QueueSampleRow.at, since, until)
    if partition is not None:
        stmt = stmt.where(QueueSampleRow.partition == partition)
    return to_records(conn.execute(stmt.order_by(QueueSampleRow.at, QueueSampleRow.partition)), QueueSample)


def engine_samples(
    conn: Connection, deployment: str, since: datetime | None, until: datetime | None
) -> list[EngineSample]:
    stmt = within(select_record(EngineSampleRow, EngineSample), EngineSampleRow.at, since, until)
    stmt = stmt.where(EngineSampleRow.deployment == deployment)
    order = (EngineSampleRow.at, EngineSampleRow.replica.nulls_first())
    return to_records(conn.execute(stmt.order_by(*order)), EngineSample)


def gateway_sources(conn: Connection, since: datetime) -> list[str]:
    stmt = (
        select(EngineSampleRow.source)
        .where(
            EngineSampleRow.replica.is_(None),
            EngineSampleRow.source.is_not(None),
            EngineSampleRow.at >= since,
        )
        .distinct()
    )
    return sorted(str(row[0]) for row in conn.execute(stmt))


def lost_work(conn: Connection, since: datetime | None) -> list[LostWork]:
    stmt = within(select_record(LostWorkRow, LostWork), LostWorkRow.at, since, None)
    return to_records(conn.execute(stmt.order_by(LostWorkRow.at, LostWorkRow.id)), LostWork)


def queue_rollups(conn: Connection, partition: str | None, since: datetime | None) -> list[Rollup]:
    return _rollups(conn, QueueRollupRow, "partition", QUEUE_FIELDS, partition, since)


def engine_rollups(conn: Connection, deployment: str | None, since: datetime | None) -> list[Rollup]:
    return _rollups(conn, EngineRollupRow, "deployment", ENGINE_FIELDS, deployment, since)


def _rollups(
    conn: Connection, model: type[Base], key: str, names: tuple[str, ...], value: str | None,
    since: datetime | None,
) -> list[Rollup]:  # fmt: skip
    table = model.__table__
    stmt = within(table.select(), table.c.bucket_start, since, None)
    if value is not None:
        stmt = stmt.where(table.c[key] == value)
    rows = conn.execute(stmt.order_by(table.c.bucket_start, table.c[key], table.c.bucket_s))
    return [_rollup(row._mapping, key, names) for row in rows]


def _rollup(row: Any, key: str, names: tuple[str, ...]) -> Rollup:
    return Rollup(
        key=row[key], bucket_start=row["bucket_start"], bucket_s=row["bucket_s"], samples=row["samples"],
        avg={n: row[f"avg_{n}"] for n in names}, max={n: row[f"max_{n}"] for n in names},
    )  # fmt: skip
