"""Queue and engine samples averaged per time bucket in the database, for reports over long periods.

A replica's engine is sampled every controller tick (2 s): a week of one deployment with two replicas and a
gateway is ~900,000 rows, ~7 s to read as records and as long again to average in Python. Here the database
groups them (one indexed range scan) and returns a row per series and bucket: its sample count and the mean
of each field over the samples that had a value.

Bucket ``i`` is ``[since + i * width_s, since + (i + 1) * width_s)``; SQLite reckons seconds with
``julianday`` (its timestamps are zone-less UTC text, see ``schema.UtcDateTime``), PostgreSQL with
``extract(epoch ...)``.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import Integer, cast, func, literal, select

from hpcserve.store.errors import StoreError
from hpcserve.store.records import ENGINE_FIELDS, QUEUE_FIELDS
from hpcserve.store.schema import Base, EngineSampleRow, QueueSampleRow
from hpcserve.store.sql import within

if TYPE_CHECKING:
    from sqlalchemy import Connection

    from hpcserve.store import HistoryStore

SQLITE_TIME = "%Y-%m-%d %H:%M:%S.%f"  # how SQLAlchemy's SQLite DATETIME stores a (zone-less UTC) time
# julianday's doubles are off by ~10 us today: a sample on a bucket's edge must not fall in the one before
JULIAN_SLACK_S = 0.001


@dataclass(frozen=True, slots=True)
class BucketRow:
    """One series (``key``: the values of the key columns) over bucket ``index``: how many samples it
    had, and each field's mean over those with a value (None when none had)."""

    key: tuple[Any, ...]
    index: int
    count: int
    means: dict[str, float | None]


def queue_buckets(store: HistoryStore, since: datetime, until: datetime, width_s: float) -> list[BucketRow]:
    """Each partition's queue samples in ``[since, until)``, per bucket; key: ``(partition,)``."""
    with store.engine.connect() as conn:
        return _buckets(conn, QueueSampleRow, ("partition",), QUEUE_FIELDS, since, until, width_s)


def engine_buckets(
    store: HistoryStore, deployments: Collection[str], since: datetime, until: datetime, width_s: float
) -> list[BucketRow]:
    """The engine samples of ``deployments`` in ``[since, until)``, per bucket; key:
    ``(deployment, replica, source)``, so each replica and each gateway is a series of its own."""
    if not deployments:
        return []
    keys = ("deployment", "replica", "source")
    with store.engine.connect() as conn:
        return _buckets(conn, EngineSampleRow, keys, ENGINE_FIELDS, since, until, width_s,
                        EngineSampleRow.deployment.in_(sorted(deployments)))  # fmt: skip


def _buckets(
    conn: Connection, model: type[Base], keys: Sequence[str], fields: Sequence[str], since: datetime,
    until: datetime, width_s: float, *where: Any,
) -> list[BucketRow]:  # fmt: skip
    if width_s <= 0:
        raise ValueError(f"width_s: {width_s} is not positive")
    table = model.__table__
    index = _bucket_index(conn.dialect.name, table.c.at, since, width_s).label("bucket")
    key_columns = [table.c[k] for k in keys]
    stmt = select(*key_columns, index, func.count().label("n"),
                  *(func.avg(table.c[f]).label(f) for f in fields))  # fmt: skip
    stmt = within(stmt, table.c.at, since, until).where(*where).group_by(*key_columns, index)
    rows = conn.execute(stmt.order_by(*key_columns, index))
    return [
        BucketRow(tuple(row[k] for k in keys), int(row.bucket), int(row.n),
                  {f: None if row[f] is None else float(row[f]) for f in fields})
        for row in (r._mapping for r in rows)
    ]  # fmt: skip


def _bucket_index(dialect: str, at: Any, since: datetime, width_s: float) -> Any:
    """``floor((at - since) / width_s)`` in the dialect's own time arithmetic (``at >= since``)."""
    if dialect == "sqlite":
        start = since.astimezone(UTC).strftime(SQLITE_TIME)
        seconds = (func.julianday(at) - func.julianday(literal(start))) * 86400.0 + JULIAN_SLACK_S
        return cast(seconds / width_s, Integer)  # CAST truncates: the floor of a number >= 0
    if dialect == "postgresql":
        return cast(func.floor(func.extract("epoch", at - literal(since)) / width_s), Integer)
    raise StoreError(f"unsupported database {dialect!r}: use SQLite or PostgreSQL")
