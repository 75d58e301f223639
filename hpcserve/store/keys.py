"""Gateway API keys (``api_keys``): made and revoked through the service, read by the gateway.

Only a salted HMAC of each key's secret is stored. Revoking keeps the row (``revoked_at`` set), so usage
rows still name a key their owner can list.
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import date, datetime

from sqlalchemy import Connection, update

from hpcserve.store.errors import NotFound
from hpcserve.store.records import ApiKeyRecord, Usage
from hpcserve.store.schema import ApiKeyRow, UsageRow
from hpcserve.store.sql import dialect_insert, select_record, to_records

K, U = ApiKeyRow, UsageRow


def add_key(conn: Connection, key: ApiKeyRecord) -> ApiKeyRecord:
    """Insert ``key``; its id is random, so a clash is a bug (IntegrityError)."""
    values = {name: getattr(key, name) for name in ApiKeyRecord.__dataclass_fields__}
    conn.execute(dialect_insert(conn, K).values(values))
    return key


def keys(conn: Connection, owner: str | None = None, *, live_only: bool = False) -> list[ApiKeyRecord]:
    """Keys (of ``owner`` when given; not revoked ones with ``live_only``), oldest first."""
    stmt = select_record(K, ApiKeyRecord).order_by(K.created_at, K.id)
    if owner is not None:
        stmt = stmt.where(K.owner == owner)
    if live_only:
        stmt = stmt.where(K.revoked_at.is_(None))
    return to_records(conn.execute(stmt), ApiKeyRecord)


def get_key(conn: Connection, key_id: str) -> ApiKeyRecord | None:
    found = to_records(conn.execute(select_record(K, ApiKeyRecord).where(K.id == key_id)), ApiKeyRecord)
    return found[0] if found else None


def revoke_key(conn: Connection, key_id: str, user: str, admin: bool, now: datetime) -> ApiKeyRecord:
    """Mark the key revoked (again is a no-op). ``NotFound`` when there is none, and likewise for another
    user's key unless ``user`` is an admin (the same answer, so key ids cannot be probed)."""
    found = get_key(conn, key_id)
    if found is None or (found.owner != user and not admin):
        raise NotFound(f"no API key {key_id!r} of yours: `hpcserve keys list` lists them")
    if found.revoked_at is None:
        conn.execute(update(K).where(K.id == key_id, K.revoked_at.is_(None)).values(revoked_at=now))
    revoked = get_key(conn, key_id)
    assert revoked is not None
    return revoked


def usage_of(conn: Connection, key_ids: Collection[str] | None, since: date | None) -> list[Usage]:
    """Usage rows of ``key_ids`` (every key's when None) from ``since`` on, by day."""
    stmt = select_record(U, Usage).order_by(U.day, U.key_id, U.model)
    if key_ids is not None:
        stmt = stmt.where(U.key_id.in_(list(key_ids)))
    if since is not None:
        stmt = stmt.where(U.day >= since)
    return to_records(conn.execute(stmt), Usage)
