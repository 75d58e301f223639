"""Small SQL helpers the store's modules share: the dialect's INSERT (for ON CONFLICT), time windows, and
selecting the columns a record class names."""

from __future__ import annotations

from dataclasses import fields
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import Connection, Select, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql.elements import KeyedColumnElement

from hpcserve.store.errors import StoreError
from hpcserve.store.schema import Base

R = TypeVar("R")
S = TypeVar("S", bound=Select[Any])


def dialect_insert(conn: Connection, model: type[Base]) -> postgresql.Insert | sqlite.Insert:
    """INSERT for ``model`` with the dialect's ON CONFLICT clauses (both dialects spell them alike)."""
    if conn.dialect.name == "postgresql":
        return postgresql.insert(model)
    if conn.dialect.name == "sqlite":
        return sqlite.insert(model)
    raise StoreError(f"unsupported database {conn.dialect.name!r}: use SQLite or PostgreSQL")


def columns(model: type[Base], names: tuple[str, ...] | list[str]) -> list[KeyedColumnElement[Any]]:
    table = model.__table__
    return [table.c[name] for name in names]


def select_record(model: type[Base], record: type[Any]) -> Select[Any]:
    """SELECT of ``model``'s columns named like the dataclass ``record``'s fields, in field order."""
    return select(*columns(model, [f.name for f in fields(record)]))


def to_records(rows: Any, record: type[R]) -> list[R]:
    return [record(**row._mapping) for row in rows]


def within(stmt: S, column: Any, since: datetime | None, until: datetime | None) -> S:
    """``stmt`` restricted to ``since <= column < until`` (either end open when None)."""
    if since is not None:
        stmt = stmt.where(column >= since)
    if until is not None:
        stmt = stmt.where(column < until)
    return stmt
