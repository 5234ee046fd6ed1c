"""``cxrlabel review`` and ``cxrlabel export``: people review masks; masks leave the database."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.cli.common import engine_of, handle_errors, selection_options


@click.command("review")
@click.option("--group", help="Only this group's images.")
@click.option("--sample", help="Only this sample's images.")
@click.option("--all", "all_images", is_flag=True, help="Every labelled image (the default).")
@click.option("--model", default="default", show_default=True, help="Whose masks to review.")
@click.option("--reviewer", default="", help="Your name, stored with each decision [or type it on the page].")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; anything but a loopback address needs --token.")
@click.option("--port", default=8765, show_default=True, type=click.IntRange(1, 65535))
@click.option("--token", envvar="CXRLABEL_REVIEW_TOKEN", metavar="SECRET",
              help="Every request must carry it (?token= once, then a cookie) [env CXRLABEL_REVIEW_TOKEN].")
@click.option("--allow-host", "allow_hosts", multiple=True, metavar="NAME",
              help="Also answer requests for this host name (a reverse proxy's); repeatable. Otherwise only "
                   "the --host address's names are answered.")
@click.pass_context
@handle_errors
def review_cmd(ctx, group, sample, all_images, model, reviewer, host, port, token, allow_hosts) -> None:
    """Review masks in the browser: a worklist least trusted first, contours to correct.

    Decisions (accepted, rejected, corrected) go to the `reviews` table with your name and
    the time; corrected masks are stored as masks of kind `reviewed`, never over the model's.
    `label_results` then shows each image's review state and the CTR from the reviewed masks.

    \b
    Example:
        cxrlabel review --group cardiomegaly --reviewer "Dr. Ivanova"
        cxrlabel review --sample test70k --host 0.0.0.0 --token "$(openssl rand -hex 16)"
        cxrlabel review --token "$T" --allow-host review.lab.example   # behind a reverse proxy
    """
    from pipeline import review as R
    from pipeline import webapp
    if sum(bool(x) for x in (group, sample, all_images)) > 1:
        raise R.ReviewError("choose one of --group, --sample or --all")
    token = webapp.check_binding(host, token)
    engine = engine_of(ctx)
    rows, counts = R.worklist(engine, model, R.Filters(group=group, sample=sample), limit=1)
    if not counts["images"]:
        from pipeline.groups import missing_name  # a name that does not exist is said so, as elsewhere
        with engine.connect() as conn:
            missing = missing_name(conn, group=group, sample_name=sample, labelled_by=model)
        raise R.ReviewError(missing or f"no images labelled by model {model!r} in this selection: run "
                            "`cxrlabel label` first")
    app = webapp.create_app(engine, model, R.Filters(group=group, sample=sample), reviewer, token, host, allow_hosts)
    address = f"http://{host}:{port}/" + (f"?token={token}" if token else "")
    click.echo(f"reviewing {counts['images']} images labelled by {model} ({counts['reviewed']} reviewed so far) "
               f"on {address}  (Ctrl-C stops)")
    webapp.serve(app, host, port)


@click.command("export")
@click.argument("fmt", metavar="FORMAT", type=click.Choice(["seg", "sr", "png", "rle"]))
@selection_options
@click.option("--model", default="default", show_default=True, help="Whose masks.")
@click.option("--reviewed", is_flag=True,
              help="The masks as people left them (corrected, or the model's where accepted); "
                   "images nobody reviewed are left out.")
@click.option("--include-rejected", is_flag=True, help="Also masks a reviewer rejected.")
@click.option("--out", type=click.Path(path_type=Path),
              help="A CSV file for rle; a folder for png, seg and sr.")
@click.option("--to", "to_url", metavar="URL",
              help="seg and sr: store them in this PACS instead of a folder: over DICOMweb (STOW-RS) at a URL, "
                   "credentials as for `catalogue load dicomweb`; or by C-STORE to dimse://HOST:PORT?called=AET.")
@click.option("--allow-http", is_flag=True, help="--to: allow plain HTTP to another machine.")
@click.pass_context
@handle_errors
def export_cmd(ctx, fmt, selection, model, reviewed, include_rejected, out, to_url, allow_http) -> None:
    """Export masks: DICOM SEG, a DICOM measurement report (TID 1500 SR: the CTR and the heart's
    and thorax's widths as lines on the film), 1-bit PNGs, or a CheXmask-layout run-length CSV.

    Resumable: what is already in OUT (or the PACS) and matches is kept; the rest is written.
    A changed result (corrected masks, another model) is a new object; in a PACS, the report
    names the one it supersedes.

    \b
    Example:
        cxrlabel export rle --group cardiomegaly --out exports/cardiomegaly.csv
        cxrlabel export seg --sample test70k --reviewed --out exports/seg/
        cxrlabel export png --all --model default --out exports/png/
        cxrlabel export sr --source pacs --to https://pacs.example.org/dicom-web
        cxrlabel export seg --source pacs --to 'dimse://pacs.example.org:104?called=PACS'
    """
    from pipeline.export import export
    from pipeline.groups import select_images
    if sum(map(bool, (selection.group, selection.sample, selection.all_images, selection.source))) < 1:
        # as `label`: never everything by omission
        raise click.UsageError("choose what to export: --group G, --sample NAME, --source S or --all")
    engine = engine_of(ctx)
    with engine.connect() as conn:
        chosen = select_images(conn, selection.group, selection.sample, selection.all_images, selection.limit,
                               selection.source, labelled_by=model, on_disk=selection.on_disk)
    if bool(out) == bool(to_url):
        raise click.UsageError("say where: --out PATH" + (", or --to URL (a PACS)" if fmt in ("seg", "sr") else ""))
    if to_url and fmt not in ("seg", "sr"):
        raise click.UsageError(f"--to stores DICOM in a PACS: seg or sr, not {fmt} (use --out)")
    if allow_http:
        import os
        os.environ["CXRLABEL_PACS_ALLOW_HTTP"] = "1"
    s = export(engine, fmt, to_url or out, chosen, model, reviewed, include_rejected)
    click.echo(f"{fmt} export to {s.out}: {s.written} written, {s.kept} already there and unchanged"
               + (f", {s.rejected} rejected masks left out" if s.rejected else ""))
    for reason, n in sorted(s.skipped.items()):
        click.echo(f"  {n} images skipped: {reason}")


COMMANDS = [review_cmd, export_cmd]
