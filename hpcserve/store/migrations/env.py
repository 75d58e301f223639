"""Alembic's environment, run by ``hpcserve.store.migrate``: it always hands over an open connection (in
``config.attributes["connection"]``); there is no alembic.ini."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from hpcserve.store.schema import Base


def run_migrations(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters tables by copying them
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


connection = context.config.attributes.get("connection")
if not isinstance(connection, Connection):
    raise RuntimeError("run migrations through hpcserve.store.migrate (hpcserve db upgrade), not alembic")
run_migrations(connection)
