"""The ``cxrlabel`` command line: a thin click layer over the stage modules."""

from __future__ import annotations

import logging
from pathlib import Path

import click
from sqlalchemy import bindparam, select, text

from pipeline import db as D
from pipeline.cli_common import CONTEXT, _select, emit, engine_of, handle_errors, selection_options


@click.group(context_settings=CONTEXT)
@click.option("--db", "url", envvar="CXRLABEL_DB", metavar="URL",
              help="SQLAlchemy URL [env CXRLABEL_DB; default sqlite:///data/catalogue.db].")
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
@click.version_option(package_name="cxrlabel")
@click.pass_context
def cli(ctx: click.Context, url: str | None, verbose: int) -> None:
    """Label chest X-ray archives with heart and lung masks in a SQL catalogue.

    \b
    Example:
        cxrlabel catalogue load nih ../shared/data/catalogues/nih/Data_Entry_2017_v2020.csv.gz
        cxrlabel groups assign && cxrlabel groups list
    """
    logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)],
                        format="%(levelname)s %(name)s: %(message)s")
    ctx.ensure_object(dict)["url"] = url


# ---------------------------------------------------------------- db


@cli.group()
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


# ---------------------------------------------------------------- catalogue


@cli.group()
def catalogue() -> None:
    """Stage 1: load clinic metadata (CSV, DICOM headers, reports) into the catalogue."""


@catalogue.command("load")
@click.argument("fmt", metavar="FORMAT", type=click.Choice(["nih", "dicom", "openi", "csv"]))
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.option("--image-root", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder holding the image files (searched at any depth).")
@click.option("--map", "mapping", multiple=True, metavar="FIELD=COLUMN",
              help="csv: a catalogue field and the column holding it (repeat).")
@click.option("--encoding", default="utf-8", show_default=True, help="csv: text encoding (e.g. cp1251).")
@click.option("--delimiter", default=",", show_default=True, help="csv: field separator.")
@click.option("--source-name", default="csv", show_default=True, help="csv: value of images.source.")
@click.option("--workers", type=click.IntRange(min=1), help="dicom: header reader processes.")
@click.option("--uid-from", type=click.Choice(["path", "sop"]), default="path", show_default=True,
              help="dicom: uid = relative file path, or SOP Instance UID.")
@click.option("--text-csv", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="dicom: CSV with diagnosis text to join.")
@click.option("--text-key", default="sop_uid", show_default=True,
              help="dicom: catalogue field to join on (sop_uid, study_uid, patient_id, uid).")
@click.option("--text-key-column", help="dicom: key column in --text-csv [default: --text-key].")
@click.option("--text-column", default="text", show_default=True, help="dicom: text column in --text-csv.")
@click.pass_context
@handle_errors
def catalogue_load(ctx, fmt, source, image_root, mapping, encoding, delimiter, source_name,
                   workers, uid_from, text_csv, text_key, text_key_column, text_column) -> None:
    """Load FORMAT metadata from SOURCE; re-running updates rows, never duplicates them.

    \b
    Formats: nih (Data_Entry_2017 CSV[.gz]), dicom (folder tree, headers only),
    openi (NLMCXR_reports.tgz), csv (any clinic export, with --map).
    Malformed rows go to load_errors (see `catalogue errors`); the rest loads.

    \b
    Example:
        cxrlabel catalogue load nih Data_Entry_2017_v2020.csv.gz --image-root /data/nih
        cxrlabel catalogue load csv export.csv --map uid=AccessionNo --map text=Conclusion \\
            --map age=Age --map sex=Sex --map path=File --encoding cp1251 --delimiter ';'
        cxrlabel catalogue load dicom /pacs/export --text-csv reports.csv --text-key study_uid \\
            --text-key-column StudyUID --text-column Report
    """
    from pipeline import catalogue as C
    engine = engine_of(ctx)
    if fmt == "nih":
        s = C.load_nih(engine, source, image_root)
    elif fmt == "openi":
        s = C.load_openi(engine, source, image_root)
    elif fmt == "dicom":
        s = C.load_dicom(engine, source, workers, uid_from, text_csv, text_key, text_column,
                         text_key_column)
    else:
        s = C.load_csv(engine, source, C.parse_mapping(mapping), image_root, encoding, delimiter,
                       source_name)
    click.echo(f"{source}: {s.loaded} rows loaded, {s.errors} malformed rows in load_errors")
    for reason, n in sorted(s.reasons.items(), key=lambda kv: -kv[1]):
        click.echo(f"  {n:>7}  {reason}")


@catalogue.command("errors")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(min=1))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
@handle_errors
def catalogue_errors(ctx, limit, as_json) -> None:
    """Malformed rows recorded by `catalogue load`, newest first.

    \b
    Example:
        cxrlabel catalogue errors --limit 20
    """
    t = D.load_errors
    with engine_of(ctx).connect() as conn:
        rows = [dict(r._mapping) for r in conn.execute(
            select(t.c.source_file, t.c.line, t.c.uid, t.c.reason).order_by(t.c.id.desc()).limit(limit))]
    emit(rows, as_json)


@catalogue.command("list")
@selection_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
@handle_errors
def catalogue_list(ctx, group, sample, all_images, limit, source, as_json) -> None:
    """Rows of the `catalogue` view for a selection.

    \b
    Example:
        cxrlabel catalogue list --group cardiomegaly --limit 5 --json
    """
    engine = engine_of(ctx)
    uids = [u for u, _ in _select(engine, group, sample, all_images, limit or 20, source)]
    q = text("SELECT uid, patient_id, age, sex, view, study_date, group_name, source, text "
             "FROM catalogue WHERE uid IN :uids ORDER BY uid").bindparams(
        bindparam("uids", expanding=True))
    with engine.connect() as conn:
        emit([dict(r._mapping) for r in conn.execute(q, {"uids": uids})], as_json)


# ---------------------------------------------------------------- groups


@cli.group()
def groups() -> None:
    """Stage 1: groups of interest from report text, and named samples."""


@groups.command("assign")
@click.option("--rules", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A rules file (TOML) in the form of pipeline/rules/default.toml.")
@click.pass_context
@handle_errors
def groups_assign(ctx, rules) -> None:
    """(Re)assign every image to cardiomegaly, healthy, or no group.

    \b
    Example:
        cxrlabel groups assign --rules my_clinic_rules.toml
    """
    from pipeline.groups import assign, load_rules
    counts = assign(engine_of(ctx), load_rules(rules))
    for name, n in sorted(counts.items()):
        click.echo(f"{name:>14}  {n}")


@groups.command("sample")
@click.option("--name", required=True, help="Sample name, e.g. test70k.")
@click.option("--per-group", required=True, type=click.IntRange(min=1), help="Images per group.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--group", "only", multiple=True, help="Groups to draw from [default: all].")
@click.pass_context
@handle_errors
def groups_sample(ctx, name, per_group, seed, only) -> None:
    """Store a balanced, reproducible sample (replacing one of the same name).

    \b
    Example:
        cxrlabel groups sample --name test70k --per-group 35000 --seed 0
    """
    from pipeline.groups import sample
    s = sample(engine_of(ctx), name, per_group, seed, only or None)
    for g, n in s.per_group.items():
        note = f"  (only {s.short[g]} images: taken whole)" if g in s.short else ""
        click.echo(f"{name}/{g}: {n}{note}")


@groups.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
@handle_errors
def groups_list(ctx, as_json) -> None:
    """Counts per group and per sample.

    \b
    Example:
        cxrlabel groups list --json
    """
    from pipeline.groups import counts
    c = counts(engine_of(ctx))
    rows = [{"kind": "group", "name": n, "images": k} for n, k in c["groups"]]
    rows += [{"kind": "sample", "name": n, "images": k} for n, k in c["samples"]]
    if as_json:
        emit(rows, True)
        return
    click.echo(f"catalogued images: {c['total']}")
    emit(rows, False)


from pipeline.cli_stages import register_stage_commands  # noqa: E402  (commands of stages 2-4)

register_stage_commands(cli)
