"""The ``cxrlabel`` command line: one module per command group, registered here.

Each command parses its arguments, calls one library function and formats the result;
library errors (:class:`pipeline.CxrlabelError`) become one-line messages.
"""

from __future__ import annotations

import logging

import click

from pipeline.cli import catalogue, collect, database, groups, label, results, review, train
from pipeline.cli.common import CONTEXT


class Cli(click.Group):
    """The root group: an unexpected error is one line too, unless -v asks for the traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort, KeyboardInterrupt):
            raise
        except Exception as e:
            if (ctx.obj or {}).get("verbose"):
                raise
            first = (str(e).strip().splitlines() or [""])[0]
            raise click.ClickException(f"unexpected {type(e).__name__}: {first} (run again with -v for the "
                                       "traceback, and report it)") from e


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
    ctx.ensure_object(dict).update(url=url, verbose=verbose)


for _module in (database, catalogue, groups, collect, train, label, results, review):
    for _command in _module.COMMANDS:
        cli.add_command(_command)
