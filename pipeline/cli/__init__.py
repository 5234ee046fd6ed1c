"""The ``cxrlabel`` command line: one module per command group, registered here.

Each command parses its arguments, calls one library function and formats the result;
library errors (:class:`pipeline.CxrlabelError`) become one-line messages.
"""

from __future__ import annotations

import errno
import logging
import os
import sys

import click

from pipeline.cli import catalogue, collect, database, groups, label, quality, results, review, train
from pipeline.cli.common import CONTEXT


class Cli(click.Group):
    """The root group: an unexpected error is one line too, unless -v asks for the traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort, KeyboardInterrupt):
            raise
        except BrokenPipeError:
            # the reader went away (`cxrlabel query ... | head`): stop quietly, as a command
            # killed by SIGPIPE does, with nothing more written to the closed pipe
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(141)
        except Exception as e:
            known = environment_error(e, (ctx.obj or {}).get("url"))
            if known and not (ctx.obj or {}).get("verbose"):
                raise click.ClickException(known) from e
            if (ctx.obj or {}).get("verbose"):
                raise
            first = (str(e).strip().splitlines() or [""])[0]
            raise click.ClickException(f"unexpected {type(e).__name__}: {first} (run again with -v for the "
                                       "traceback, and report it)") from e


NEXT_STEP = {
    errno.ENOSPC: "free space there or choose another place",
    errno.EDQUOT: "free space within your quota or choose another place",
    errno.EROFS: "the file system is mounted read-only: choose a writable place",
    errno.EACCES: "you may not write there: choose a place you own, or ask for the rights",
    errno.EPERM: "you may not write there: choose a place you own, or ask for the rights",
    errno.EIO: "the disk or network share reports an I/O error: check it, then run again",
}


def environment_error(e: BaseException, url: str | None) -> str | None:
    """One line for a failure of the machine rather than of cxrlabel (a full disk, a
    read-only or forbidden folder, a database that cannot be written), naming the path and
    the next step; None for anything else."""
    from pipeline import db as D
    for err in (e, e.__cause__, e.__context__):
        if isinstance(err, OSError) and err.errno in NEXT_STEP:
            where = err.filename or "a file"
            return f"cannot write {where}: {err.strerror or err}: {NEXT_STEP[err.errno]}"
    text = str(e).lower()
    if "database or disk is full" in text or "could not extend file" in text or "no space left" in text:
        return (f"the database {D.display_url(url)} cannot grow: its disk is full: free space there, "
                "then run again (nothing stored so far is lost)")
    if "disk i/o error" in text:
        return f"the database {D.display_url(url)} reports a disk I/O error: check its disk, then run again"
    if "unable to open database file" in text:
        return (f"cannot open the database {D.display_url(url)}: check that its folder exists and that you "
                "may write there (--db / CXRLABEL_DB)")
    return None


@click.group(cls=Cli, context_settings=CONTEXT)
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
    if not verbose:  # pydicom logs each value it finds odd as it reads it (an age of '62'), which the
        # catalogue reads as it can and records where it cannot (load_errors); -v shows them. A
        # filter, not a level: pydicom sets its logger's level when it is imported, later
        logging.getLogger("pydicom").addFilter(lambda record: record.levelno >= logging.ERROR)
    ctx.ensure_object(dict).update(url=url, verbose=verbose)


for _module in (database, catalogue, groups, collect, train, label, quality, results, review):
    for _command in _module.COMMANDS:
        cli.add_command(_command)
