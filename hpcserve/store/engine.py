"""Creating the store's engine: SQLite tuned for several processes (WAL, busy timeout, write locks taken up
front), PostgreSQL through psycopg 3.

On SQLite, a transaction opened through ``writer(engine)`` starts with ``BEGIN IMMEDIATE``: it takes the
write lock before its first read, so it waits (busy_timeout) instead of failing with SQLITE_BUSY when another
process committed in between. Plain transactions start with ``BEGIN`` and read concurrently (WAL).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

from hpcserve.store.errors import DatabaseUnavailable, StoreError

BUSY_TIMEOUT_MS = 5000
WRITE_OPTION = "hpcserve_write"
SQLITE_PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}",
    "PRAGMA foreign_keys=ON",
    "PRAGMA synchronous=NORMAL",
)


def parse_url(url: str) -> URL:
    """The URL as SQLAlchemy reads it, with ``~`` expanded in a SQLite path; plain ``postgresql://`` means
    psycopg 3, the driver hpcserve ships."""
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise StoreError(
            f"invalid database URL {url!r}: use sqlite:///PATH or postgresql+psycopg://USER@HOST/DB"
        ) from exc
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() == "sqlite" and (parsed.database or "").startswith("~"):
        parsed = parsed.set(database=str(Path(parsed.database or "").expanduser()))
    return parsed


def make_engine(url: URL) -> Engine:
    """An engine for ``url``; for a SQLite file, its folder is created first."""
    if url.get_backend_name() == "sqlite":
        return _sqlite_engine(url)
    try:
        return create_engine(url, pool_pre_ping=True)
    except NoSuchModuleError as exc:
        raise StoreError(f"unsupported database driver {url.drivername!r}: use sqlite or postgresql") from exc


def writer(engine: Engine) -> Engine:
    """The same engine (and pool), marked so that SQLite transactions take the write lock at BEGIN."""
    return engine.execution_options(**{WRITE_OPTION: True})


def _sqlite_engine(url: URL) -> Engine:
    if url.database and url.database != ":memory:" and not url.database.startswith("file:"):
        folder = Path(url.database).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DatabaseUnavailable(url.render_as_string(), f"cannot create {folder}: {exc}") from exc
    engine = create_engine(url)
    event.listen(engine, "connect", _sqlite_connect)
    event.listen(engine, "begin", _sqlite_begin)
    return engine


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    # Leave transactions to the "begin" hook below: pysqlite's own BEGIN comes late (before the first write)
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        for pragma in SQLITE_PRAGMAS:
            cursor.execute(pragma)
    finally:
        cursor.close()


def _sqlite_begin(conn: Connection) -> None:
    immediate = conn.get_execution_options().get(WRITE_OPTION, False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")
