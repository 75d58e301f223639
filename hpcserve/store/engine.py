"""Creating the store's engine: SQLite tuned for several processes (WAL, busy timeout, write locks taken up
front), PostgreSQL through psycopg 3.

On SQLite, a transaction opened through ``writer(engine)`` starts with ``BEGIN IMMEDIATE``: it takes the
write lock before its first read, so it waits (busy_timeout) instead of failing with SQLITE_BUSY when another
process committed in between. Plain transactions start with ``BEGIN`` and read concurrently (WAL).

The database belongs to whoever runs the service: a SQLite file hpcserve creates is 0600 (SQLite gives its
-wal and -shm files the same mode), and a folder hpcserve creates for it is 0700; a file of the caller's own
that others could read (an older hpcserve's 0644) is closed to them on open. Nobody else opens it; users reach
the service's API instead.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

from hpcserve.store.errors import DatabaseUnavailable, StoreError

BUSY_TIMEOUT_MS = 5000
FILE_MODE = 0o600  # a new SQLite file: its owner's only
FOLDER_MODE = 0o700  # a folder hpcserve makes for it
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
    """An engine for ``url``; for a SQLite file, its folder (0700) and the empty file (0600) are created
    first when missing."""
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
    path = url.database or ""
    if path and path != ":memory:" and not path.startswith("file:"):
        try:
            create_private(Path(path))
        except OSError as exc:
            raise DatabaseUnavailable(
                url.render_as_string(), f"cannot open or create {path}: {exc.strerror}"
            ) from exc
    engine = create_engine(url)
    event.listen(engine, "connect", _sqlite_connect)
    event.listen(engine, "begin", _sqlite_begin)
    return engine


def create_private(path: Path) -> None:
    """Make ``path``'s folder (0700, if missing; its parents as the umask says) and ``path`` itself, empty
    and 0600, if missing. A file that exists and is the caller's own loses any group and other access (a
    database an older hpcserve left 0644); someone else's file is left as it is."""
    folder = path.parent
    if not folder.is_dir():
        folder.parent.mkdir(parents=True, exist_ok=True)
        try:
            folder.mkdir(mode=FOLDER_MODE)
            folder.chmod(FOLDER_MODE)  # mkdir's mode passes through the umask
        except FileExistsError:
            pass  # another process made it first
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
    except FileExistsError:
        for each in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
            _close_to_others(each)
        return
    os.close(fd)  # an empty file is an empty SQLite database; -wal and -shm will copy its mode


def _close_to_others(path: Path) -> None:
    try:
        st = path.stat()
    except OSError:
        return  # missing, or in a folder the caller cannot enter: the open reports it
    if st.st_uid == os.geteuid() and st.st_mode & 0o077:
        path.chmod(st.st_mode & 0o700)


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
