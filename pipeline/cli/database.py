"""``cxrlabel db``: the database itself."""

from __future__ import annotations

import click

from pipeline import db as D
from pipeline.cli.common import engine_of, handle_errors


@click.group()
def db() -> None:
    """The database itself: create, upgrade, print the schema."""


@db.command("init")
@click.pass_context
@handle_errors
def db_init(ctx: click.Context) -> None:
    """Create or upgrade the schema and views (every command does this on start-up).

    \b
    Example:
        cxrlabel --db postgresql+psycopg://me@localhost/cxr db init
    """
    engine_of(ctx)
    click.echo(f"schema version {D.SCHEMA_VERSION} at {D.resolve_url(ctx.obj.get('url'))}")


@db.command("schema")
def db_schema() -> None:
    """Print the schema DDL (SQLite dialect): what sql/schema.sql holds.

    \b
    Example:
        cxrlabel db schema > sql/schema.sql
    """
    click.echo(D.schema_ddl(), nl=False)


COMMANDS = [db]
