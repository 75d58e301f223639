"""Downsampling: raw samples older than the raw window become per-bucket rollups, old rollups go.

Each pass deletes raw rows with ``DELETE ... RETURNING`` and folds exactly those rows into the rollups in the
same transaction, so a row is counted once however often (or concurrently) retention runs. A late sample in
an already rolled bucket is merged in: counts add, maxima combine, means are weighted by sample counts.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, and_, case, delete, func, select

from hpcserve.store.engine import writer
from hpcserve.store.records import ENGINE_FIELDS, QUEUE_FIELDS, RetentionResult, Rollup
from hpcserve.store.schema import Base, EngineRollupRow, EngineSampleRow, QueueRollupRow, QueueSampleRow
from hpcserve.store.sql import columns, dialect_insert
from hpcserve.store.telemetry import delete_gpu_samples

WINDOW = timedelta(days=1)  # raw rows folded per transaction: bounds memory after a long pause
GPU_DAYS = 31.0  # GPU telemetry is kept raw this long (a month's usage report), then deleted


@dataclass(frozen=True, slots=True)
class Series:
    raw: type[Base]
    rollup: type[Base]
    key: str
    fields: tuple[str, ...]


QUEUE = Series(QueueSampleRow, QueueRollupRow, "partition", QUEUE_FIELDS)
ENGINE = Series(EngineSampleRow, EngineRollupRow, "deployment", ENGINE_FIELDS)


def apply_retention(
    engine: Engine, now: datetime, raw_days: float, rollup_days: float, bucket_s: int,
    gpu_days: float = GPU_DAYS,
) -> RetentionResult:  # fmt: skip
    cutoff = bucket_floor(now - timedelta(days=raw_days), bucket_s)
    rolled = [roll_up(engine, series, cutoff, bucket_s) for series in (QUEUE, ENGINE)]
    expired = [drop_rollups(engine, series, now - timedelta(days=rollup_days)) for series in (QUEUE, ENGINE)]
    with writer(engine).begin() as conn:
        gpu = delete_gpu_samples(conn, now - timedelta(days=gpu_days))
    return RetentionResult(rolled[0], rolled[1], expired[0], expired[1], gpu)


def bucket_floor(at: datetime, bucket_s: int) -> datetime:
    """The start of the ``bucket_s``-second bucket (counted from the Unix epoch) that holds ``at``."""
    return datetime.fromtimestamp(int(at.timestamp()) // bucket_s * bucket_s, UTC)


def roll_up(engine: Engine, series: Series, cutoff: datetime, bucket_s: int) -> int:
    """Fold every raw row older than ``cutoff`` into rollups, one window per transaction; rows folded."""
    total = 0
    while True:
        with writer(engine).begin() as conn:
            folded = _fold_oldest_window(conn, series, cutoff, bucket_s)
        if folded == 0:
            return total
        total += folded


def _fold_oldest_window(conn: Connection, series: Series, cutoff: datetime, bucket_s: int) -> int:
    at = series.raw.__table__.c.at
    oldest = conn.execute(select(func.min(at)).where(at < cutoff)).scalar()
    if oldest is None:
        return 0
    end = min(bucket_floor(oldest, bucket_s) + max(WINDOW, timedelta(seconds=bucket_s)), cutoff)
    returned = columns(series.raw, [series.key, "at", *series.fields])
    taken = delete(series.raw).where(at < end).returning(*returned)
    rows = conn.execute(taken).all()
    merge(conn, series, aggregate(rows, bucket_s, series.fields))
    return len(rows)


def aggregate(rows: Iterable[Sequence[Any]], bucket_s: int, names: tuple[str, ...]) -> list[Rollup]:
    """Rollups of ``(key, at, *values)`` rows: per key and bucket, the count, and each field's mean and
    maximum over the rows where it is not None."""
    groups: dict[tuple[str, datetime], list[Sequence[Any]]] = defaultdict(list)
    for row in rows:
        groups[(row[0], bucket_floor(row[1], bucket_s))].append(row[2:])
    return [_summary(key, start, bucket_s, values, names) for (key, start), values in sorted(groups.items())]


def _summary(
    key: str, start: datetime, bucket_s: int, values: list[Sequence[Any]], names: tuple[str, ...]
) -> Rollup:
    avg: dict[str, float | None] = {}
    top: dict[str, float | None] = {}
    for i, name in enumerate(names):
        present = [float(v[i]) for v in values if v[i] is not None]
        avg[name] = sum(present) / len(present) if present else None
        top[name] = max(present) if present else None
    return Rollup(key, start, bucket_s, len(values), avg, top)


def merge(conn: Connection, series: Series, rollups: list[Rollup]) -> None:
    """Upsert ``rollups``, combining each with the stored rollup of the same key and bucket."""
    if not rollups:
        return
    insert = dialect_insert(conn, series.rollup)
    stored, new = series.rollup.__table__.c, insert.excluded
    combined: dict[str, Any] = {"samples": stored.samples + new.samples}
    for name in series.fields:
        mean, top = f"avg_{name}", f"max_{name}"
        combined[mean] = _weighted_mean(stored[mean], new[mean], stored.samples, new.samples)
        combined[top] = case((stored[top].is_(None) | (new[top] > stored[top]), new[top]), else_=stored[top])
    upsert = insert.on_conflict_do_update(
        index_elements=[series.key, "bucket_start", "bucket_s"], set_=combined
    )
    conn.execute(upsert, [_row(series.key, r) for r in rollups])


def _weighted_mean(old: Any, new: Any, old_n: Any, new_n: Any) -> Any:
    both = and_(old.is_not(None), new.is_not(None))
    return case((both, (old * old_n + new * new_n) / (old_n + new_n)), (old.is_(None), new), else_=old)


def _row(key: str, rollup: Rollup) -> dict[str, Any]:
    row: dict[str, Any] = {key: rollup.key, "bucket_start": rollup.bucket_start}
    row |= {"bucket_s": rollup.bucket_s, "samples": rollup.samples}
    row |= {f"avg_{name}": value for name, value in rollup.avg.items()}
    return row | {f"max_{name}": value for name, value in rollup.max.items()}


def drop_rollups(engine: Engine, series: Series, before: datetime) -> int:
    bucket_start = series.rollup.__table__.c.bucket_start
    with writer(engine).begin() as conn:
        return conn.execute(delete(series.rollup).where(bucket_start < before)).rowcount
