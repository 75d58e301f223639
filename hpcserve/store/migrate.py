"""Schema migrations with Alembic, configured in code: the revision files live in ``migrations/`` inside the
package, and every command runs on a connection the caller's engine opened (no alembic.ini).

A new revision: change ``schema.py``, then, on a database at head and from a source checkout (not a strict
editable install: script.py.mako is not package data), ``new_revision(engine, "what changed")`` writes
``migrations/versions/<rev>_<slug>.py``; read and tidy it.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, text

from hpcserve.store.engine import writer
from hpcserve.store.records import SchemaStatus

MIGRATIONS = Path(__file__).with_name("migrations")
# pg_advisory_xact_lock key: two `hpcserve db upgrade` at once run in turn (SQLite: BEGIN IMMEDIATE)
UPGRADE_LOCK_KEY = 0x68706373  # "hpcs"


def alembic_config(connection: Connection | None = None) -> Config:
    """Alembic's config for hpcserve's migrations, handing ``connection`` to ``migrations/env.py``."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, "hpcserve ships at least one migration"
    return head


def current_revision(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


def schema_status(engine: Engine) -> SchemaStatus:
    with engine.connect() as conn:
        return SchemaStatus(current=current_revision(conn), head=head_revision())


def upgrade(engine: Engine, target: str = "head") -> str | None:
    """Migrate the database to ``target`` in one transaction; the revision it is at afterwards."""
    with writer(engine).begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": UPGRADE_LOCK_KEY})
        command.upgrade(alembic_config(conn), target)
        return current_revision(conn)


def new_revision(engine: Engine, message: str) -> None:
    """Autogenerate a revision from the difference between ``schema.py`` and the database (development)."""
    with engine.begin() as conn:
        command.revision(alembic_config(conn), message=message, autogenerate=True)
