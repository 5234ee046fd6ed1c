"""``cxrlabel db``: the database itself."""

from __future__ import annotations

import click

from pipeline import db as D
from pipeline.cli.common import emit_json, engine_of, handle_errors


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
    engine_of(ctx, create=True)
    click.echo(f"schema version {D.SCHEMA_VERSION} at {D.display_url(ctx.obj.get('url'))}")


@db.command("schema")
def db_schema() -> None:
    """Print the schema DDL (SQLite dialect): what sql/schema.sql holds.

    \b
    Example:
        cxrlabel db schema > sql/schema.sql
    """
    click.echo(D.schema_ddl(), nl=False)


@click.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
@handle_errors
def status_cmd(ctx, as_json) -> None:
    """What the database holds, stage by stage, the last label runs, and the likely next step.

    \b
    Example:
        cxrlabel status
        cxrlabel --db postgresql+psycopg://me@db/cxr status --json
    """
    import json

    from pipeline.status import status
    s = status(engine_of(ctx))
    if as_json:
        emit_json(s)
        return

    def line(title: str, counts: dict[str, int], unit: str) -> None:
        total = sum(counts.values())
        parts = ", ".join(f"{k} {v}" for k, v in counts.items())
        click.echo(f"{title:<11}{total} {unit}" + (f" ({parts})" if parts else ""))

    click.echo(f"database   {D.display_url(ctx.obj.get('url'))} (schema {D.SCHEMA_VERSION})")
    line("catalogue", s["images"], "images by source")
    if s["load_errors"]:
        click.echo(f"{'':<11}{s['load_errors']} malformed catalogue rows (cxrlabel catalogue errors)")
    line("groups", s["groups"], "images grouped")
    line("samples", s["samples"], "images in samples")
    line("cache", s["cache"], "entries by size and geometry")
    line("labelled", s["labelled"], "images by model")
    for model, n in s["older_heart"].items():
        click.echo(f"{'':<11}{n} images labelled by {model} carry the older heart, GeneralBlockchain's "
                   "cardiomediastinum (heart and upper mediastinum; CTR reads low in enlarged hearts): "
                   "label them again with a model that learned the heart alone (`cxrlabel label --model "
                   "NAME`; the earlier rows are kept as NAME@SHA12)")
    models = s["models"]
    parents = {m["name"]: m for m in models["registered"]}
    current = parents.get(models["current"])
    click.echo(f"{'model':<11}{models['current']} labels now" + (
        f", adapted from {current['parent']} (sha256 {str(current['parent_sha256'])[:12]}) on "
        f"{current['adapted_on']} films" if current and current["parent"] else ""))
    adapted = [f"{m['name']} (from {m['parent']})" for m in models["registered"] if m["parent"]]
    if adapted:
        click.echo(f"{'':<11}adapted models: {', '.join(adapted)}")
    if models["calibrated"]:
        click.echo(f"{'':<11}CTR calibrations: {', '.join(models['calibrated'])} (label_results.ctr_calibrated)")
    line("masks", s["masks"], "masks by kind")
    for source, definitions in s["mask_sources"].items():
        click.echo(f"{'':<11}{source}: " + "; ".join(f"{k} = {v}" for k, v in json.loads(definitions).items()))
    line("failures", s["failures"], "images by stage" + (" (cxrlabel failures)" if s["failures"] else ""))
    if s["runs"]:
        click.echo("last label runs:")
        for r in s["runs"]:
            click.echo(f"  run {r['id']}: {r['model']} on {r['device']}, {r['status']}, {r['n_labelled']} labelled, "
                       f"{r['n_skipped']} skipped, {r['n_failed']} failed of {r['n_selected']} ({r['selection']}), "
                       f"started {str(r['started_at'])[:19]}")
    click.echo(f"next: {s['next']}")


COMMANDS = [db, status_cmd]
