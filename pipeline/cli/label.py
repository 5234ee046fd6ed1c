"""``cxrlabel label``: stage 4, masks, measurements and quality for a selection."""

from __future__ import annotations

import os

import click

from pipeline.cli.common import batch_exit, engine_of, handle_errors, selection_options


@click.command("label")
@selection_options
@click.option("--model", default="default", show_default=True,
              help="'default' (shipped), a registered name, or a checkpoint path.")
@click.option("--batch-size", default="auto", show_default=True, help="auto or N.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--workers", type=click.IntRange(min=1),
              help="Processes that decode uncached images and post-process [default: cores]; on a CPU, the "
                   "labelling streams, each with a copy of the model, sharing --threads [default: one a thread, "
                   "up to 8]; not with --ray.")
@click.option("--threads", type=click.IntRange(min=1),
              help="CPU threads for torch [all cores]: on a CPU, shared by the labelling streams; with --ray, each "
                   "actor's CPUs [1].")
@click.option("--cache", "cache_dir", type=click.Path(file_okay=False))
@click.option("--ray", "ray_address", metavar="ADDRESS|local",
              help="Run on a Ray cluster (its address, or 'local' for one started here); needs cxrlabel[ray].")
@click.option("--actors", type=click.IntRange(min=1),
              help="--ray: model actors [one per GPU; on CPUs one per core].")
@click.option("--tta", is_flag=True,
              help="Also run two test-time-augmented copies of each image for a sharper quality score "
                   "(3x the model's work; the masks are unchanged). Needs the model's tta score.")
@click.pass_context
@handle_errors
def label_cmd(ctx, selection, model, batch_size, device, workers, threads, cache_dir, ray_address, actors,
              tta) -> None:
    """Stage 4: masks, measurements and quality for a selection; resumable.

    Exit status: 0 every image labelled (or labelled before), 3 some failed and the rest
    labelled, 4 images failed and none was labelled (see `cxrlabel failures`).

    \b
    Example:
        cxrlabel label --group cardiomegaly
        cxrlabel label --sample test70k --device cuda --batch-size auto
        cxrlabel --db postgresql+psycopg://me@db/cxr label --sample test70k --ray 10.0.0.5:6379
    """
    import torch

    from pipeline.label import LabelOptions, label
    if batch_size != "auto" and (not batch_size.isdigit() or int(batch_size) < 1):
        raise click.BadParameter(f"{batch_size!r}: use auto or a positive number",
                                 param_hint="--batch-size")
    if actors and not ray_address:
        raise click.UsageError("--actors is for --ray: the local loop runs one model")
    from pipeline import db as D
    from pipeline.failures import summary
    torch.set_num_threads(threads or os.cpu_count() or 1)
    engine = engine_of(ctx)
    started = D.utcnow()
    chosen = selection.select(engine)
    options = LabelOptions(model, device, None if batch_size == "auto" else int(batch_size), cache_dir, workers, tta)
    executor = None
    if ray_address:
        from pipeline.distributed import Ray
        executor = Ray(ray_address, actors, threads or 1)
    s = label(engine, chosen, options, executor)
    click.echo(f"label run {s.run_id} ({s.model} on {s.device}): {s.labelled} labelled, "
               f"{s.skipped} already labelled, {s.failed} failed of {s.selected} selected")
    for line in summary(engine, "label", started, s.selected - s.skipped, s.run_id):
        click.echo(line)
    batch_exit(s.labelled, s.failed)


COMMANDS = [label_cmd]
