"""What every command module shares: errors, the engine, output, selection options."""

from __future__ import annotations

import csv
import decimal
import functools
import itertools
import json
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import click
from sqlalchemy.exc import OperationalError

from pipeline import CxrlabelError
from pipeline import db as D

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

# Exit statuses of the batch commands (collect, label), for scripts: every item done (or nothing
# left to do), some items failed and the rest done, items failed and none done. A usage or
# setup error (no such group, no database) is 1 or 2, as for every command.
EXIT_SOME_FAILED = 3
EXIT_NONE_DONE = 4


def batch_exit(done: int, failed: int) -> None:
    """End a batch command with the status its counts call for (see :data:`EXIT_SOME_FAILED`)."""
    if failed:
        raise click.exceptions.Exit(EXIT_NONE_DONE if done == 0 else EXIT_SOME_FAILED)


def handle_errors(fn):
    """Library errors become one-line CLI errors that say what to do next."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CxrlabelError as e:
            raise click.ClickException(" ".join(str(e).split())) from e
        except OperationalError as e:
            if not D.is_read_only_error(e):
                raise
            raise click.ClickException("the database is read-only and this command writes to it: "
                                       "run it on a writable database (without mode=ro)") from e
    return wrapper


def engine_of(ctx: click.Context, read_only: bool = False, create: bool = False):
    """The database of ``--db``: created or upgraded as needed, or with ``read_only`` opened
    as it is and never written (``query``). Only a command that fills a database (``create``:
    ``catalogue load``, ``masks import``, ``db init``) makes a new SQLite file; any other refuses
    one that does not exist, naming the file it looked for: the default ``data/catalogue.db``
    is relative to the current folder, and a mistyped ``--db`` made an empty database that then
    said "catalogue 0 images" or "no group named 'healthy'"."""
    obj = ctx.ensure_object(dict)
    key = "engine_ro" if read_only else "engine"
    if key not in obj:
        path = D.sqlite_path(D.resolve_url(obj.get("url")))
        if not create and not read_only and path is not None and not path.exists():
            raise click.ClickException(
                f"no database at {path.absolute()} ({D.display_url(obj.get('url'))}): name yours with --db or "
                "CXRLABEL_DB (the default, data/catalogue.db, lies in the current folder), or create one with "
                "`cxrlabel catalogue load` or `cxrlabel db init`")
        try:
            obj[key] = (D.connect_read_only if read_only else D.connect)(obj.get("url"))
        except CxrlabelError:
            raise
        except Exception as e:
            raise click.ClickException(f"cannot open database {D.display_url(obj.get('url'))}: "
                                       f"{D.first_line(e)}. Check --db / CXRLABEL_DB") from e
    return obj[key]


def json_value(v):
    """What JSON cannot hold as it is: a NUMERIC (PostgreSQL's ROUND) as a number, the rest
    (dates) as text."""
    return float(v) if isinstance(v, decimal.Decimal) else str(v)


def finite(value: object) -> object:
    """``value`` with every NaN or infinite float (and NUMERIC) as None: JSON has no NaN, and
    Python's ``NaN`` in the output is no JSON any other reader takes."""
    if isinstance(value, float | decimal.Decimal):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def json_text(value: object, indent: int | None = 2) -> str:
    """Any result as valid JSON (:func:`finite`; dates and the like as text)."""
    return json.dumps(finite(value), indent=indent, default=json_value, ensure_ascii=False, allow_nan=False)


def emit_json(value: object) -> None:
    """Any result (rows, a mapping of them) as indented JSON; dates and the like as text."""
    click.echo(json_text(value))


def emit(rows: list[dict], as_json: bool, as_csv: bool = False, uncut: tuple[str, ...] = ()) -> None:
    """Rows as JSON, CSV or an aligned table (cells cut at :data:`CELL` characters with an
    ellipsis, but the columns ``uncut``, which should come last)."""
    if as_json:
        emit_json(rows)
        return
    if not rows:
        click.echo("(no rows)")
        return
    cols = list(rows[0])
    if as_csv:
        w = csv.DictWriter(sys.stdout, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
        return
    cells = [[_cell(r[c], c in uncut) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    click.echo("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    click.echo("  ".join("-" * w for w in widths))
    for row in cells:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


CELL = 60  # characters a table cell shows; a longer one ends in an ellipsis (--csv and --json show all)


def _cell(value, whole: bool) -> str:
    text = "" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)
    return text if whole or len(text) <= CELL else text[:CELL - 1] + "…"


def emit_stream(columns: list[str], rows: Iterator[dict], as_json: bool, as_csv: bool,
                table_rows: int = 200) -> None:
    """Every row as JSON or CSV, streamed; a table shows the first ``table_rows`` and says
    how many more there are."""
    if as_json:
        click.echo("[", nl=False)
        for n, row in enumerate(rows):
            click.echo(("," if n else "") + "\n  " + json_text(row, None), nl=False)
        click.echo("\n]")
        return
    if as_csv:
        w = csv.writer(sys.stdout)
        w.writerow(columns)
        for row in rows:
            w.writerow(row.values())
        return
    shown = list(itertools.islice(rows, table_rows))
    emit(shown, False)
    more = sum(1 for _ in rows)
    if more:
        click.echo(f"... {more} more rows not shown: use --csv or --json for all of them")


def json_option(fn):
    return click.option("--json", "as_json", is_flag=True, help="Print JSON.")(fn)


@dataclass(frozen=True)
class SelectionArgs:
    """The selection options every command that selects images takes, as one value
    (:func:`selection_options`)."""

    group: str | None = None
    sample: str | None = None
    all_images: bool = False
    limit: int | None = None
    source: str | None = None
    on_disk: bool = False

    def select(self, engine, limit: int | None = None):
        """The :class:`pipeline.groups.Selection` these options name (``limit``: a default
        when none was given)."""
        from pipeline.groups import select_images
        chosen = sum(bool(x) for x in (self.group, self.sample, self.all_images))
        if chosen > 1 or (chosen == 0 and not self.source):  # a usage error: exit 2, as click's own
            raise click.UsageError("choose exactly one of --group, --sample or --all (or --source alone)")
        with engine.connect() as conn:
            return select_images(conn, self.group, self.sample, self.all_images, self.limit or limit, self.source,
                                 on_disk=self.on_disk)


def selection_options(fn):
    """--group / --sample / --all / --source / --limit / --on-disk, the same on every command
    that selects images, handed to it as one ``selection`` (:class:`SelectionArgs`)."""
    @functools.wraps(fn)
    def wrapper(*args, group, sample, all_images, limit, source, on_disk, **kwargs):
        return fn(*args, selection=SelectionArgs(group, sample, all_images, limit, source, on_disk), **kwargs)

    options = [
        click.option("--group", help="A group, e.g. cardiomegaly or healthy."),
        click.option("--sample", help="A named sample (see `groups sample`)."),
        click.option("--all", "all_images", is_flag=True, help="Every catalogued image."),
        click.option("--source", "source", help="Only images of this dataset (images.source)."),
        click.option("--limit", type=click.IntRange(min=1), help="At most N images (by uid)."),
        click.option("--on-disk", is_flag=True, help="Only images whose file is on this machine (a pilot drawn "
                                                     "from an archive that is partly elsewhere)."),
    ]
    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper
