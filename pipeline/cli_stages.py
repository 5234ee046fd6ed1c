"""CLI commands of stages 2-4: collect, masks, train, models, label, query, evaluate, report."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import click
from sqlalchemy import select

from pipeline import db as D
from pipeline.cli_common import _select, emit, engine_of, handle_errors, selection_options


def register_stage_commands(cli: click.Group) -> None:
    for command in (collect_cmd, masks, train_cmd, models, label_cmd, query, evaluate_cmd,
                    report_cmd):
        cli.add_command(command)


@click.command("collect")
@selection_options
@click.option("--size", default=512, show_default=True, type=click.IntRange(32, 4096),
              help="Side of the square cached image.")
@click.option("--mode", type=click.Choice(["pad", "stretch"]), default="pad", show_default=True,
              help="pad: keep aspect, pad to square; stretch: rescale to 1:1 (the paper's way).")
@click.option("--workers", type=click.IntRange(min=1), help="Decoder processes [default: cores].")
@click.option("--cache", "cache_dir", type=click.Path(file_okay=False),
              help="Cache folder [env CXRLABEL_CACHE; default data/cache].")
@click.pass_context
@handle_errors
def collect_cmd(ctx, group, sample, all_images, limit, source, size, mode, workers, cache_dir) -> None:
    """Stage 2: decode and preprocess images into the cache; skips what is cached.

    \b
    Example:
        cxrlabel collect --group cardiomegaly --size 256 --workers 4
    """
    from pipeline.collect import Settings, collect
    engine = engine_of(ctx)
    items = _select(engine, group, sample, all_images, limit, source)
    s = collect(engine, items, Settings(size, mode), cache_dir, workers)
    click.echo(f"collect: {s.selected} selected, {s.cached} cached now, {s.skipped} already "
               f"cached, {s.failed} failed (see the failures table)")


@click.group()
def masks() -> None:
    """Stage 2: import hand-drawn (manual) masks."""


@masks.command("import")
@click.argument("fmt", metavar="FORMAT", type=click.Choice(["generalblockchain", "png-dirs"]))
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--images", default="images", show_default=True, help="png-dirs: image folder.")
@click.option("--mask", "mask_dirs", multiple=True, metavar="STRUCTURE=FOLDER",
              help="png-dirs: mask folder of a structure (heart, left_lung, right_lung).")
@click.option("--source", default="annotated", show_default=True, help="png-dirs: images.source.")
@click.pass_context
@handle_errors
def masks_import(ctx, fmt, directory, images, mask_dirs, source) -> None:
    """Catalogue an annotated set's images and store its masks as manual masks.

    \b
    Example:
        cxrlabel masks import generalblockchain ../shared/data/generalblockchain
        cxrlabel masks import png-dirs ./my_set --images png --mask heart=mask/heart \\
            --mask left_lung=mask/left_lung --mask right_lung=mask/right_lung
    """
    from pipeline import masks as M
    engine = engine_of(ctx)
    if fmt == "generalblockchain":
        s = M.import_generalblockchain(engine, directory)
    else:
        mapping = {}
        for pair in mask_dirs:
            key, sep, folder = pair.partition("=")
            if not sep:
                raise click.BadParameter(f"{pair!r}: expected STRUCTURE=FOLDER", param_hint="--mask")
            mapping[key] = folder
        s = M.import_png_dirs(engine, directory, images, mapping or None, source)
    click.echo(f"{directory}: {s.images} images, {s.masks} masks stored"
               + (f", {s.skipped} masks skipped (size mismatch)" if s.skipped else ""))


@click.command("train")
@click.option("--model", "preset", default="cxr_deep", show_default=True,
              help="Preset from models/presets.toml.")
@click.option("--size", type=click.IntRange(32, 4096), help="Image side [preset].")
@click.option("--mode", type=click.Choice(["pad", "stretch"]), help="Geometry mode [preset].")
@click.option("--roi", type=click.IntRange(16, 4096), help="Training crop side [preset].")
@click.option("--epochs", type=click.IntRange(min=1), help="Epochs [preset].")
@click.option("--batch", type=click.IntRange(min=1), help="Batch size [preset].")
@click.option("--lr", type=float, help="Peak learning rate [preset].")
@click.option("--ema", type=click.FloatRange(0, 1, max_open=True),
              help="Validate and keep a moving average of the weights, decay per step, "
                   "e.g. 0.99; 0 = off [preset].")
@click.option("--norm", type=click.Choice(["zscore", "clahe"]),
              help="Model input: z-score, or CLAHE then z-score [preset].")
@click.option("--folds", type=click.IntRange(min=2), help="K-fold cross-validation.")
@click.option("--val-frac", type=click.FloatRange(0, 0.9), default=0.2, show_default=True,
              help="Held-out share without --folds; 0 trains on everything.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads for torch.")
@click.option("--name", help="Registered model name [preset].")
@click.option("--run-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Checkpoints and curves [runs/NAME].")
@click.option("--no-resume", is_flag=True, help="Start over even if RUN_DIR/last.pt exists.")
@click.option("--cache", "cache_dir", type=click.Path(file_okay=False))
@click.pass_context
@handle_errors
def train_cmd(ctx, preset, size, mode, roi, epochs, batch, lr, ema, norm, folds, val_frac, seed, device,
              threads, name, run_dir, no_resume, cache_dir) -> None:
    """Stage 3: train a network on the manual masks; registers the best checkpoint.

    \b
    Example:
        cxrlabel train --model cxr_deep --epochs 100 --folds 5
        cxrlabel train --model unet7_res --size 512 --val-frac 0.2 --device cuda
    """
    from pipeline import train as T
    engine = engine_of(ctx)
    cfg = T.TrainConfig.from_preset(preset, size=size, mode=mode, roi=roi, epochs=epochs,
                                    batch=batch, lr=lr, ema=ema, norm=norm, seed=seed, val_frac=val_frac,
                                    folds=folds or 1, threads=threads)
    name = name or preset
    run_dir = run_dir or Path("runs") / name
    data = T.load_dataset(engine, cfg, cache_dir)
    started = time.time()
    results = []
    for fold in range(cfg.folds):
        fold_cfg = T.TrainConfig(**{**cfg.as_dict(), "fold": fold})
        fold_dir = run_dir / f"fold{fold}" if cfg.folds > 1 else run_dir
        r = T.train(engine, fold_cfg, fold_dir, cache_dir, device, not no_resume, dataset=data)
        fold_name = f"{name}_fold{fold}" if cfg.folds > 1 else name
        T.register_model(engine, fold_name, fold_dir / "best.pt", fold_cfg, r.dice, data.hash,
                         {"best_epoch": r.best_epoch, "history": r.history, "seconds": r.seconds})
        results.append(r)
        scored = {k: v for k, v in r.dice.items() if v == v}  # NaN: no held-out images
        click.echo(f"{fold_name}: " + (f"best epoch {r.best_epoch}, Dice " + ", ".join(
            f"{k} {v:.4f}" for k, v in scored.items()) if scored else
            f"no held-out images (--val-frac 0): the model is the last epoch, {r.best_epoch}"))
    summary = T.summarise_folds(results)
    (run_dir / "summary.json").write_text(json.dumps(
        {"preset": preset, "config": cfg.as_dict(), "dice": summary,
         "seconds": time.time() - started, "data_hash": data.hash}, indent=2))
    if cfg.folds > 1:
        click.echo("cross-validation: " + ", ".join(
            f"{k} {v['mean']:.4f} ± {v['sd']:.4f}" for k, v in summary.items()))
    click.echo(f"checkpoints and learning curves in {run_dir}")


@click.group()
def models() -> None:
    """Registered models: trained checkpoints with their validation Dice."""


@models.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
@handle_errors
def models_list(ctx, as_json) -> None:
    """Models in the registry with their validation Dice.

    \b
    Example:
        cxrlabel models list --json
    """
    m = D.models
    with engine_of(ctx).connect() as conn:
        rows = [dict(r._mapping) for r in conn.execute(select(
            m.c.name, m.c.preset, m.c.dice_heart, m.c.dice_left_lung, m.c.dice_right_lung,
            m.c.sha256, m.c.path, m.c.created_at).order_by(m.c.name))]
    emit(rows, as_json)


@models.command("export")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("destination", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--fp32", is_flag=True, help="Keep float32 weights (default: float16, half the size).")
@handle_errors
def models_export(checkpoint, destination, fp32) -> None:
    """Write a checkpoint for shipping, e.g. as the default model.

    \b
    Example:
        cxrlabel models export runs/cxr_deep_all/best.pt models/default/model.pt
    """
    from pipeline.train import export_checkpoint
    sha = export_checkpoint(checkpoint, destination, half=not fp32)
    click.echo(f"{destination}: {destination.stat().st_size / 1e6:.1f} MB, sha256 {sha}")


@click.command("label")
@selection_options
@click.option("--model", default="default", show_default=True,
              help="'default' (shipped), a registered name, or a checkpoint path.")
@click.option("--batch-size", default="auto", show_default=True, help="auto or N.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--workers", type=click.IntRange(min=1), help="Decoder processes for uncached images [default: cores].")
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads for torch [all cores].")
@click.option("--cache", "cache_dir", type=click.Path(file_okay=False))
@click.pass_context
@handle_errors
def label_cmd(ctx, group, sample, all_images, limit, source, model, batch_size, device, workers,
              threads, cache_dir) -> None:
    """Stage 4: masks, measurements and quality for a selection; resumable.

    \b
    Example:
        cxrlabel label --group cardiomegaly
        cxrlabel label --sample test70k --device cuda --batch-size auto
    """
    import torch

    from pipeline.label import label
    torch.set_num_threads(threads or os.cpu_count() or 1)
    if batch_size != "auto" and (not batch_size.isdigit() or int(batch_size) < 1):
        raise click.BadParameter(f"{batch_size!r}: use auto or a positive number",
                                 param_hint="--batch-size")
    engine = engine_of(ctx)
    items = _select(engine, group, sample, all_images, limit, source)
    what = f"group={group}" if group else f"sample={sample}" if sample else "all"
    what += f" source={source}" if source else ""
    s = label(engine, items, model, device, None if batch_size == "auto" else int(batch_size),
              what + (f" limit={limit}" if limit else ""), cache_dir, workers)
    click.echo(f"label run {s.run_id} ({s.model} on {s.device}): {s.labelled} labelled, "
               f"{s.skipped} already labelled, {s.failed} failed of {s.selected} selected")


@click.command()
@click.argument("sql")
@click.option("--csv", "as_csv", is_flag=True, help="Print CSV.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
@handle_errors
def query(ctx, sql, as_csv, as_json) -> None:
    """Run read-only SQL (a statement or a file under sql/queries) and print the rows.

    \b
    Example:
        cxrlabel query "SELECT group_name, COUNT(*) FROM catalogue GROUP BY 1"
        cxrlabel query sql/queries/ctr_by_group.sql --csv
    """
    from pipeline.results import read_only_query
    if sql.endswith(".sql") and Path(sql).exists():
        sql = Path(sql).read_text()
    emit(read_only_query(engine_of(ctx), sql), as_json, as_csv)


@click.command("evaluate")
@click.option("--truth", default="manual", show_default=True, help="Truth masks: manual.")
@click.option("--model", default="default", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON (with per-image rows).")
@click.pass_context
@handle_errors
def evaluate_cmd(ctx, truth, model, as_json) -> None:
    """Dice per structure and CTR error of a model's masks against manual masks.

    \b
    Example:
        cxrlabel evaluate --truth manual --model default --json
    """
    from pipeline.evaluate import evaluate
    ev = evaluate(engine_of(ctx), model, truth)
    if as_json:
        click.echo(json.dumps(ev.as_dict(), indent=2))
        return
    click.echo(f"{ev.model}: {ev.images} images with manual and predicted masks")
    for s, st in ev.dice.items():
        click.echo(f"  Dice {s:<11} {st['mean']:.4f} ± {st['sd']:.4f} (n={st['n']})")
    e = ev.ctr_error
    click.echo(f"  CTR error     mean {e['mean']:+.4f}, MAE {e['mae']:.4f} (n={e['n']})")


@click.command("report")
@click.option("--group")
@click.option("--sample")
@click.option("--model", default="default", show_default=True)
@click.option("--out", "out_dir", default="data/reports", show_default=True,
              type=click.Path(file_okay=False, path_type=Path))
@click.option("--tiles", default=24, show_default=True, type=click.IntRange(1, 400))
@click.pass_context
@handle_errors
def report_cmd(ctx, group, sample, model, out_dir, tiles) -> None:
    """Contact sheet of overlays (lowest quality first) and CTR histograms per group.

    \b
    Example:
        cxrlabel report --group cardiomegaly --out reports/
    """
    from pipeline.report import report
    if bool(group) == bool(sample):
        raise click.UsageError("choose exactly one of --group or --sample")
    files = report(engine_of(ctx), out_dir, model, group, sample, tiles)
    click.echo(f"contact sheet ({files.images} images): {files.contact_sheet}")
    click.echo(f"CTR histogram: {files.histogram}")

