"""``cxrlabel catalogue``: stage 1, clinic metadata into the catalogue."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline import catalogue as C
from pipeline.cli.common import EXIT_NONE_DONE, emit, engine_of, handle_errors, json_option, selection_options


@click.group()
def catalogue() -> None:
    """Stage 1: load clinic metadata (CSV, DICOM headers, reports) into the catalogue."""


@catalogue.command("load")
@click.argument("fmt", metavar="FORMAT", type=click.Choice(list(C.LOADERS)))
@click.argument("source")
@click.option("--image-root", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder holding the image files (searched at any depth).")
@click.option("--map", "mapping", multiple=True, metavar="FIELD=COLUMN",
              help="csv: a catalogue field and the column holding it (repeat; uid is required). Fields: "
                   + ", ".join(C.CSV_FIELDS) + ".")
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
@click.option("--modality", "modalities", multiple=True, default=("CR", "DX"), show_default=True,
              help="dicomweb, dimse: modalities to catalogue (repeat).")
@click.option("--study-date", metavar="RANGE",
              help="dicomweb, dimse: YYYYMMDD, YYYYMMDD-YYYYMMDD, -YYYYMMDD or YYYYMMDD-.")
@click.option("--body-part", help="dicomweb, dimse: BodyPartExamined to match, e.g. CHEST.")
@click.option("--page-size", type=click.IntRange(1, 10000), default=500, show_default=True,
              help="dicomweb: instances a QIDO request asks for (limit/offset paging).")
@click.option("--fields", type=click.Choice(["metadata", "qido"]), default="metadata", show_default=True,
              help="dicomweb: metadata reads each new series' headers (every field `load dicom` reads, one request "
                   "a series); qido keeps the search's answer (no view, spacing or age on most servers).")
@click.option("--allow-http", is_flag=True, help="dicomweb: allow plain HTTP to another machine (a network you trust).")
@click.option("--aet", default="CXRLABEL", show_default=True, help="dimse: our AE title (the PACS must know it).")
@click.option("--called-aet", help="dimse: the PACS's AE title.")
@click.option("--move-port", type=int, help="dimse: fetch pixels by C-MOVE to our storage SCP on this port (the one "
                                            "the PACS has for --aet), for an archive that allows no C-GET.")
@click.pass_context
@handle_errors
def catalogue_load(ctx, fmt, source, **options) -> None:
    """Load FORMAT metadata from SOURCE; re-running updates rows, never duplicates them.

    \b
    Formats: nih (Data_Entry_2017 CSV[.gz]), dicom (folder tree, headers only),
    openi (NLMCXR_reports.tgz), csv (any clinic export, with --map), dicomweb (a PACS's
    DICOMweb URL; credentials from CXRLABEL_PACS_USER/_PASSWORD, _TOKEN or netrc; pixels are
    fetched when collected or labelled), dimse (a PACS's HOST:PORT over C-FIND, pixels by
    C-GET, or C-MOVE with --move-port; --called-aet and --aet).
    Rows that cannot be loaded go to load_errors with the reason (see `catalogue errors`); the
    rest loads. A load that loaded nothing exits 4.

    \b
    Example:
        cxrlabel catalogue load nih Data_Entry_2017_v2020.csv.gz --image-root /data/nih
        cxrlabel catalogue load csv export.csv --map uid=AccessionNo --map text=Conclusion \\
            --map age=Age --map sex=Sex --map path=File --encoding cp1251 --delimiter ';'
        cxrlabel catalogue load dicom /pacs/export --text-csv reports.csv --text-key study_uid \\
            --text-key-column StudyUID --text-column Report
        CXRLABEL_PACS_USER=me CXRLABEL_PACS_PASSWORD=... cxrlabel catalogue load dicomweb \\
            https://pacs.example.org/dicom-web --study-date 20230101-20231231 --source-name clinic_a \\
            --text-csv ris.csv --text-key accession --text-key-column Accession --text-column Report
    """
    if fmt in ("dicomweb", "dimse"):
        if ctx.get_parameter_source("source_name") == click.core.ParameterSource.DEFAULT:
            options["source_name"] = "pacs"
        options["modalities"] = tuple(m.upper() for m in options["modalities"])
    else:
        source = click.Path(exists=True, path_type=Path).convert(source, None, ctx)
    s = C.load(engine_of(ctx, create=True), fmt, source, C.LoadOptions(**options))
    click.echo(f"{source}: {s.loaded} rows loaded, {s.errors} rows left out (in load_errors, with the reason)"
               + (f", {s.kept} already in the catalogue (kept as they were)" if s.kept else ""))
    for reason, n in sorted(s.reasons.items(), key=lambda kv: -kv[1]):
        click.echo(f"  {n:>7}  {reason}")
    if s.notes:
        click.echo(f"{sum(s.notes.values())} junk fields left out of rows that loaded (in load_errors):")
        for reason, n in sorted(s.notes.items(), key=lambda kv: -kv[1]):
            click.echo(f"  {n:>7}  {reason}")
    if s.loaded == 0 and s.errors:  # nothing was done: the documented status for it, never 0
        raise click.exceptions.Exit(EXIT_NONE_DONE)


@catalogue.command("errors")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(min=1))
@json_option
@click.pass_context
@handle_errors
def catalogue_errors(ctx, limit, as_json) -> None:
    """Malformed rows recorded by `catalogue load`, newest first.

    \b
    Example:
        cxrlabel catalogue errors --limit 20
    """
    emit(C.list_errors(engine_of(ctx), limit), as_json)


@catalogue.command("list")
@selection_options
@json_option
@click.pass_context
@handle_errors
def catalogue_list(ctx, selection, as_json) -> None:
    """Rows of the `catalogue` view for a selection.

    \b
    Example:
        cxrlabel catalogue list --group cardiomegaly --limit 5 --json
    """
    engine = engine_of(ctx)
    chosen = selection.select(engine, limit=20)
    emit(C.list_rows(engine, [it.uid for it in chosen.items]), as_json)


@catalogue.command("reroot")
@click.argument("old_prefix")
@click.argument("new_prefix", type=click.Path(file_okay=False))
@click.option("--force", is_flag=True, help="Move the paths even when none of them leads to a file there.")
@click.pass_context
@handle_errors
def catalogue_reroot(ctx, old_prefix, new_prefix, force) -> None:
    """Move an archive: image paths under OLD_PREFIX now lie under NEW_PREFIX (one transaction);
    says how many rows changed and how many of the new paths exist. Stored paths are absolute,
    so OLD_PREFIX is an absolute folder. Refused, changing nothing, when no moved path would
    lead to a file (unless --force).

    \b
    Example:
        cxrlabel catalogue reroot /mnt/old_nas/cxr /data/cxr
    """
    s = C.reroot(engine_of(ctx), old_prefix, new_prefix, force=force)
    if not s.changed:
        hint = "" if old_prefix.startswith("/") else " (paths are stored absolute: give OLD_PREFIX as an absolute path)"
        click.echo(f"0 image paths moved: no stored path lies under {old_prefix}{hint}")
        return
    click.echo(f"{s.changed} image paths moved from {old_prefix} to {new_prefix}; {s.existing} of them "
               "lead to a file" + ("" if s.existing == s.changed else
                                   f" ({s.changed - s.existing} do not: is NEW_PREFIX the right folder?)"))


COMMANDS = [catalogue]
