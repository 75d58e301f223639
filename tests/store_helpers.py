"""What the store's tests share: the two backends, a scratch PostgreSQL database (127.0.0.1:5432, user
postgres) made for a test and dropped after, an empty database of either backend, and the ``hpcserve``
CLI run as a user would."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import create_engine

PG_SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432"
BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@contextmanager
def scratch_database() -> Iterator[str]:
    """A new, empty PostgreSQL database for the caller, dropped afterwards."""
    name = f"hpcserve_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(f"{PG_SERVER}/test", isolation_level="AUTOCOMMIT", pool_pre_ping=True)
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield f"{PG_SERVER}/{name}"
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


@contextmanager
def empty_database(backend: str, folder: Path) -> Iterator[str]:
    """The URL of an empty database: a SQLite file under ``folder``, or a scratch PostgreSQL database."""
    if backend == "sqlite":
        yield f"sqlite:///{folder}/fresh/hpcserve.db"
    else:
        with scratch_database() as url:
            yield url


def hpcserve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hpcserve", *args], capture_output=True, text=True,
                          timeout=120, check=False)  # fmt: skip
