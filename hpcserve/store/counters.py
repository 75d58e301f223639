"""Gateway usage counters (added with an atomic upsert) and named leases (the leader lock)."""

from __future__ import annotations

from datetime import date, datetime, timedelta

from sqlalchemy import Connection, delete, select

from hpcserve.store.records import Usage
from hpcserve.store.schema import LockRow, UsageRow
from hpcserve.store.sql import dialect_insert, select_record, to_records

U, L = UsageRow, LockRow
COUNTS = ("requests", "prompt_tokens", "completion_tokens")


def add_usage(conn: Connection, row: Usage) -> None:
    """Add ``row``'s counts to its key, model and day (inserting the day's row if it is the first)."""
    insert = dialect_insert(conn, U).values(
        key_id=row.key_id, model=row.model, day=row.day, requests=row.requests,
        prompt_tokens=row.prompt_tokens, completion_tokens=row.completion_tokens,
    )  # fmt: skip
    sums = {name: U.__table__.c[name] + insert.excluded[name] for name in COUNTS}
    conn.execute(insert.on_conflict_do_update(index_elements=["key_id", "model", "day"], set_=sums))


def usage(conn: Connection, key_id: str | None, since: date | None) -> list[Usage]:
    stmt = select_record(U, Usage).order_by(U.day, U.key_id, U.model)
    if key_id is not None:
        stmt = stmt.where(U.key_id == key_id)
    if since is not None:
        stmt = stmt.where(U.day >= since)
    return to_records(conn.execute(stmt), Usage)


def try_lock(
    conn: Connection, name: str, holder: str, ttl_s: float, now: datetime, stale: str | None = None
) -> bool:
    """Take or renew the lease: one atomic upsert that only overwrites an expired lease, our own, or
    ``stale``'s (a holder known to be dead). The re-read in the same transaction tells whether we hold it."""
    insert = dialect_insert(conn, L).values(
        name=name, holder=holder, expires_at=now + timedelta(seconds=ttl_s)
    )
    takeover = (L.expires_at <= now) | (L.holder == holder)
    if stale is not None:
        takeover = takeover | (L.holder == stale)
    conn.execute(
        insert.on_conflict_do_update(
            index_elements=["name"],
            set_={"holder": insert.excluded.holder, "expires_at": insert.excluded.expires_at},
            where=takeover,
        )
    )
    return lock_holder(conn, name) == holder


def lock_holder(conn: Connection, name: str) -> str | None:
    return conn.execute(select(L.holder).where(L.name == name)).scalar_one_or_none()


def release_lock(conn: Connection, name: str, holder: str) -> bool:
    """Give the lease up if ``holder`` has it; whether it did."""
    return conn.execute(delete(L).where(L.name == name, L.holder == holder)).rowcount > 0
