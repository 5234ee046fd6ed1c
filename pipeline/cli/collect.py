"""``cxrlabel collect`` and ``cxrlabel masks``: stage 2, the image cache and manual masks."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.cli.common import EXIT_NONE_DONE, batch_exit, engine_of, handle_errors, selection_options


@click.command("collect")
@selection_options
@click.option("--model", default="default", show_default=True,
              help="Cache at the size and geometry this model reads, so `label --model` finds the work done.")
@click.option("--size", type=click.IntRange(32, 4096), help="Side of the square cached image [the model's].")
@click.option("--mode", type=click.Choice(["pad", "stretch"]),
              help="pad: keep aspect, pad to square; stretch: rescale to 1:1 (the paper's way) [the model's].")
@click.option("--workers", type=click.IntRange(min=1), help="Decoder processes [default: every core].")
@click.option("--cache", "cache_dir", type=click.Path(file_okay=False),
              help="Cache folder [env CXRLABEL_CACHE; default data/cache].")
@click.option("--verify", is_flag=True,
              help="Check every cached entry's checksum, not only that its file is whole.")
@click.option("--ray", "ray_address", metavar="ADDRESS|local",
              help="Decode on a Ray cluster (its address, or 'local'); needs cxrlabel[ray].")
@click.pass_context
@handle_errors
def collect_cmd(ctx, selection, model, size, mode, workers, cache_dir, verify, ray_address) -> None:
    """Stage 2: decode and preprocess images into the cache; skips what is cached.

    Exit status: 0 every image cached (or cached before), 3 some failed and the rest cached,
    4 images failed and none was cached (see `cxrlabel failures`).

    \b
    Example:
        cxrlabel collect --group cardiomegaly --size 256 --workers 4
    """
    from pipeline import db as D
    from pipeline.collect import Settings, collect
    from pipeline.failures import summary
    engine = engine_of(ctx)
    if size is None or mode is None:  # what the model reads: labelling with it then finds the cache done
        from pipeline.model import model_spec
        spec = model_spec(engine, model)
        size, mode = size or spec.size, mode or spec.mode
    chosen = selection.select(engine)
    started = D.utcnow()
    if ray_address:
        from pipeline.distributed import collect_on_ray
        s = collect_on_ray(engine, chosen.pairs(), Settings(size, mode), cache_dir, ray_address)
    else:
        s = collect(engine, chosen.pairs(), Settings(size, mode), cache_dir, workers, verify=verify)
    click.echo(f"collect ({size} px, {mode}): {s.selected} selected, {s.cached} cached now, {s.skipped} already "
               f"cached, {s.failed} failed"
               + (f"; {s.rebuilt} broken entries found and collected again" if s.rebuilt else ""))
    for line in summary(engine, "collect", started, s.selected - s.skipped):
        click.echo(line)
    batch_exit(s.cached, s.failed)


@click.group()
def masks() -> None:
    """Stage 2: import hand-drawn (manual) masks."""


@masks.command("import")
@click.argument("fmt", metavar="FORMAT", type=click.Choice(["generalblockchain", "png-dirs"]))
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--images", default="images", show_default=True, help="png-dirs: image folder.")
@click.option("--mask", "mask_dirs", multiple=True, metavar="STRUCTURE=FOLDER",
              help="png-dirs: mask folder of a structure: heart (the heart alone), cardiomediastinum "
                   "(heart and upper mediastinum), left_lung, right_lung.")
@click.option("--source", default="annotated", show_default=True, help="png-dirs: images.source.")
@click.option("--lungs", type=click.Choice(["scr", "behind-heart"]), default="scr", show_default=True,
              help="png-dirs: how the set draws the lungs: scr (no pixel behind the heart) or behind-heart.")
@click.option("--uid-prefix", default="", help="png-dirs: put this before each file's name to make its uid "
                                                "(for a set whose names the catalogue already uses).")
@click.pass_context
@handle_errors
def masks_import(ctx, fmt, directory, images, mask_dirs, source, lungs, uid_prefix) -> None:
    """Catalogue an annotated set's images and store its masks as manual masks, recording
    what the set's structures mean (`mask_sources`): training takes from each source only
    what it defines, and a lung pixel a source also drew as heart teaches nothing.

    \b
    Example:
        cxrlabel masks import generalblockchain ../shared/data/generalblockchain
        cxrlabel masks import png-dirs ../shared/data/wingspan --images png --source wingspan \\
            --mask heart=mask/heart --mask left_lung=mask/left_lung --mask right_lung=mask/right_lung
    """
    from pipeline import masks as M
    engine = engine_of(ctx, create=True)
    if fmt == "generalblockchain":
        s = M.import_generalblockchain(engine, directory)
    else:
        s = M.import_png_dirs(engine, directory, images, M.parse_mask_dirs(mask_dirs), source, lungs, uid_prefix)
    click.echo(f"{directory}: {s.images} images, {s.masks} masks stored"
               + (f", {s.skipped} left out (unreadable, a mask of another size, or a name the catalogue uses for "
                  "another image: see the warnings)" if s.skipped else ""))
    if s.images == 0 and s.skipped:  # nothing was imported: the documented status for it, never 0
        raise click.exceptions.Exit(EXIT_NONE_DONE)


COMMANDS = [collect_cmd, masks]
