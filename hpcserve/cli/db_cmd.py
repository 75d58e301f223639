"""``hpcserve db``: hpcserve's own database (schema migrations and where the schema stands).

An admin command: run it as the database's owner (the service account, or root), once after installing or
upgrading hpcserve; ``hpcserve service`` also migrates at start. Other commands never migrate: a schema that
is not the newest is an error naming ``hpcserve db upgrade``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from hpcserve.cli.main import Context
    from hpcserve.store import HistoryStore

JSON_HELP = "Print machine-readable JSON instead of text."
URL_HELP = ("Database URL (default: HPCSERVE_DATABASE_URL, else database.url in the site config, else "
            "hpcserve's SQLite default).")  # fmt: skip


@click.group()
def db() -> None:
    """hpcserve's database: create or migrate the schema, show its revision."""


@db.command()
@click.option("--url", help=URL_HELP)
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@click.pass_obj
def upgrade(ctx: Context | None, url: str | None, as_json: bool) -> None:
    """Migrate the database to the newest schema (creating it if needed). Safe to run again."""
    with _store(ctx, url) as store:
        before = store.schema_status().current
        after = store.upgrade()
        shown = _shown(store)
    if as_json:
        from hpcserve.cli.output import emit_json

        emit_json({"url": shown, "from": before, "to": after, "changed": before != after})
    elif before == after:
        click.echo(f"{shown}: already at revision {after}")
    else:
        click.echo(f"{shown}: upgraded from {before or 'empty'} to {after}")


@db.command()
@click.option("--url", help=URL_HELP)
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@click.pass_obj
def status(ctx: Context | None, url: str | None, as_json: bool) -> None:
    """The database's schema revision and the newest one this hpcserve ships."""
    with _store(ctx, url) as store:
        state = store.schema_status()
        shown = _shown(store)
    if as_json:
        from hpcserve.cli.output import emit_json

        emit_json(
            {"url": shown, "current": state.current, "head": state.head, "up_to_date": state.up_to_date}
        )
    elif state.up_to_date:
        click.echo(f"{shown}: at revision {state.head} (newest)")
    else:
        click.echo(f"{shown}: at revision {state.current or 'none (empty)'}, newest is {state.head} "
                   "(fix: hpcserve db upgrade)")  # fmt: skip


def _store(ctx: Context | None, url: str | None) -> HistoryStore:
    from hpcserve.store import HistoryStore

    return HistoryStore(url if url is not None else _configured_url(ctx))


def _configured_url(ctx: Context | None) -> str:
    """HPCSERVE_DATABASE_URL, the site config's database URL, or the documented default (as every command
    finds it: ``Context.database_url``)."""
    from hpcserve.cli.main import Context

    return Context.database_url(ctx.load_site() if ctx is not None else None)


def _shown(store: HistoryStore) -> str:
    return store.url.render_as_string(hide_password=True)
