"""``cxrlabel train`` and ``cxrlabel models``: stage 3, training and the model registry."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.cli.common import emit, engine_of, handle_errors, json_option


@click.command("train")
@click.option("--model", "preset", default="cxr_deep", show_default=True,
              help="Preset from models/presets.toml.")
@click.option("--from", "parent", metavar="MODEL",
              help="Adapt this model (default, a registered name or a checkpoint) to the database's manual "
                   "and reviewed films instead of training from scratch: its network and input are kept, "
                   "a few steps at a tenth of its learning rate, pulled toward its weights; structures the "
                   "films do not draw are taught by its own predictions. Registers NAME [PARENT_adapted].")
@click.option("--pull", type=click.FloatRange(0),
              help="With --from: how strongly each step pulls the weights back toward the parent's "
                   "(decoupled L2-SP); 0 = off [10].")
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
@click.option("--shifts/--no-shifts", default=None,
              help="Augment with equipment-like shifts too: a collimator's rim (filled as labelling "
                   "fills it), JPEG, another window, a field of view cut short [preset].")
@click.option("--widen-heart", "widen", type=click.FloatRange(0, 1),
              help="Share of training images whose heart is widened (an enlarged heart, image and masks "
                   "warped together; by --widen-range); 0 = off [preset].")
@click.option("--widen-range", "widen_range", metavar="LO,HI",
              help="Heart width factors for --widen-heart, drawn uniformly; below 1 narrows [TrainConfig's].")
@click.option("--widen-ctr", "widen_ctr", metavar="LO,HI",
              help="Instead of --widen-range: widen (or narrow) each heart to a CTR drawn uniformly from "
                   "LO-HI, so the widened share sees every heart size alike, e.g. 0.40,0.66.")
@click.option("--loss", type=click.Choice(["dicece", "dice", "ce"]),
              help="Segmentation loss: soft Dice + BCE, soft Dice, or BCE alone [preset].")
@click.option("--width-loss", "width_loss", type=click.FloatRange(0),
              help="Weight of a loss on each structure's horizontal extent (which columns it reaches), "
                   "the widths behind the CTR that Dice barely weighs; 0 = off [preset].")
@click.option("--masks", "masks", metavar="SOURCES",
              help="Which masks train, comma-separated: manual (always), reviewed (corrected in "
                   "`cxrlabel review`), accepted (the model's, accepted there) [manual]. Validation "
                   "uses manual masks only.")
@click.option("--review-model", help="Whose reviewed masks --masks reviewed/accepted takes [default].")
@click.option("--source", "sources", multiple=True,
              help="Only the annotated (and reviewed) films of this source (images.source; repeatable), "
                   "e.g. a clinic's own beside the public sets [every source].")
@click.option("--structures", metavar="NAMES",
              help="The network's outputs, comma-separated, from heart, left_lung, right_lung and "
                   "cardiomediastinum (an auxiliary output, never labelled) [all four]: leave out what "
                   "no annotated film draws.")
@click.option("--folds", type=click.IntRange(min=2), help="K-fold cross-validation (folds group films by patient).")
@click.option("--fold", "only", type=click.IntRange(min=0), multiple=True,
              help="With --folds: train only this fold (repeatable), so a cross-validation can span sessions; "
                   "a later run of every fold resumes finished ones at once and writes the summary.")
@click.option("--val-frac", type=click.FloatRange(0, 0.9),
              help="Held-out share without --folds; 0 trains on everything [TrainConfig's].")
@click.option("--seed", type=int, help="Folds and augmentation [TrainConfig's].")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads for torch.")
@click.option("--name", help="Registered model name [preset].")
@click.option("--run-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Checkpoints, splits and curves [runs/NAME].")
@click.option("--no-resume", is_flag=True, help="Start over even if RUN_DIR/last.pt exists.")
@click.option("--parallel-folds", type=click.IntRange(min=1), default=1, show_default=True,
              help="Train this many folds at once, in separate processes: for a CPU of many cores. "
                   "On one GPU, folds in turn are faster (the processes would take turns on it).")
@click.option("--loader-workers", type=click.IntRange(min=0),
              help="Processes augmenting batches ahead of the model [none on a CPU; on a GPU the "
                   "fold's CPU threads but one, up to 8]. Results do not depend on it.")
@click.option("--cache", "cache_dir", type=click.Path(file_okay=False))
@click.pass_context
@handle_errors
def train_cmd(ctx, preset, parent, folds, only, device, name, run_dir, no_resume, cache_dir, parallel_folds,
              loader_workers, **overrides) -> None:
    """Stage 3: train a network on the manual masks; registers the best checkpoint.

    Held-out images are stored as uid lists in RUN_DIR/splits.json and reused on resume;
    images annotated later join a fold by their uid, never moving the others.

    \b
    Example:
        cxrlabel train --model cxr_deep --epochs 100 --folds 5
        cxrlabel train --model unet7_res --size 512 --folds 5 --device cuda
        cxrlabel train --from default --name clinic_a --source clinic_a
    """
    from pipeline.train import TrainConfig, cross_validate
    overrides["sources"] = tuple(overrides.get("sources") or ()) or None
    for key in ("masks", "structures"):
        if overrides.get(key):
            overrides[key] = tuple(m.strip() for m in overrides[key].split(",") if m.strip())
    if parent is not None:
        _adapt(ctx, parent, preset, folds, name, run_dir, no_resume, cache_dir, device, overrides)
        return
    if overrides.get("pull") is not None:
        raise click.UsageError("--pull is an adaptation's setting: give --from MODEL too")
    for key, example in (("widen_range", "0.85,1.35"), ("widen_ctr", "0.40,0.66")):
        if overrides.get(key):
            overrides[key] = _pair(overrides[key], f"--{key.replace('_', '-')}", example)
    if only and not folds:
        raise click.UsageError("--fold needs --folds K (which cross-validation the fold belongs to)")
    cfg = TrainConfig.from_preset(preset, folds=folds or 1, **overrides)
    from pipeline.model.registry import check_model_name
    name = check_model_name(name or preset)
    run_dir = run_dir or Path("runs") / name
    cv = cross_validate(engine_of(ctx), cfg, run_dir, cache_dir, device, not no_resume,
                        register_as=name, parallel=parallel_folds, workers=loader_workers,
                        only=list(only) or None)
    for fold_name, r in zip(cv.names, cv.results, strict=True):
        scored = {k: v for k, v in r.dice.items() if v == v}  # NaN: no held-out images
        click.echo(f"{fold_name}: " + (f"best epoch {r.best_epoch}, Dice " + ", ".join(
            f"{k} {v:.4f}" for k, v in scored.items()) if scored else
            f"no held-out images (--val-frac 0): the model is the last epoch, {r.best_epoch}"))
    if cfg.folds > 1 and len(cv.results) == cfg.folds:
        click.echo("cross-validation: " + ", ".join(
            f"{k} {v['mean']:.4f} ± {v['sd']:.4f}" for k, v in cv.summary.items()))
    if cfg.masks != ("manual",):
        click.echo("trained on " + ", ".join(f"{n} images with {k} masks" for k, n in (cv.images or {}).items())
                   + " (validation: manual masks only)")
    click.echo(f"checkpoints and learning curves in {run_dir}")


@click.group()
def models() -> None:
    """Registered models: trained checkpoints with their validation Dice."""


@models.command("list")
@json_option
@click.pass_context
@handle_errors
def models_list(ctx, as_json) -> None:
    """Models in the registry with their validation Dice.

    \b
    Example:
        cxrlabel models list --json
    """
    from pipeline.model import list_models
    rows = list_models(engine_of(ctx))
    # the whole sha256 and path, last (they identify the file); every other cell as a table shows it
    emit([{**{k: v for k, v in r.items() if k not in ("sha256", "path")}, "sha256": r["sha256"], "path": r["path"]}
          for r in rows], as_json, uncut=("sha256", "path"))


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
    from pipeline.model import export_checkpoint
    sha = export_checkpoint(checkpoint, destination, half=not fp32)
    click.echo(f"{destination}: {destination.stat().st_size / 1e6:.1f} MB, sha256 {sha}")


@models.command("upgrade")
@click.argument("checkpoints", nargs=-1, required=True,
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.pass_context
@handle_errors
def models_upgrade(ctx, checkpoints) -> None:
    """Rewrite checkpoints of earlier cxrlabel versions in the current format, in place.

    Weights are kept bit for bit; the file's sha256 changes, and registered models that
    named the file (with its old hash) are updated to the new one.

    \b
    Example:
        cxrlabel models upgrade runs/cxr_deep_cv/fold*/best.pt
    """
    from pipeline.model import FORMAT, upgrade_checkpoint
    for path in checkpoints:
        was, sha = upgrade_checkpoint(path, engine=engine_of(ctx))
        click.echo(f"{path}: {was} -> {FORMAT}, sha256 {sha}")


COMMANDS = [train_cmd, models]


def _adapt(ctx, parent: str, preset: str, folds: int | None, name: str | None, run_dir: Path | None,
           no_resume: bool, cache_dir: str | None, device: str, overrides: dict) -> None:
    """``train --from PARENT``: adapt a model (see :mod:`pipeline.train.adapt`)."""
    from pipeline.model.registry import check_model_name
    from pipeline.train.adapt import adapt
    if folds:
        raise click.UsageError("--from adapts one model: leave out --folds (evaluate the adapted model "
                               "on the clinic's films it did not see with `cxrlabel evaluate`)")
    if ctx.get_parameter_source("preset") != click.core.ParameterSource.DEFAULT:
        raise click.UsageError(f"--from keeps {parent}'s network: leave out --model {preset}")
    for key in ("widen_range", "widen_ctr"):
        if overrides.get(key):
            raise click.UsageError(f"--from keeps {parent}'s recipe: leave out --{key.replace('_', '-')}")
    stem = Path(parent).stem if parent.endswith(".pt") else parent
    name = check_model_name(name or f"{stem}_adapted")
    run_dir = run_dir or Path("runs") / name
    overrides = {k: v for k, v in overrides.items() if k not in ("widen_range", "widen_ctr")}
    a = adapt(engine_of(ctx), parent, run_dir, name, cache_dir, device, not no_resume, **overrides)
    taught = "; " + ", ".join(f"{s} taught by {a.parent} on {n}" for s, n in a.taught.items()) if a.taught else ""
    click.echo(f"{a.name}: {a.parent} (sha256 {a.parent_sha256[:12]}) adapted on {a.films} films, "
               f"{a.result.history[-1]['epoch'] if a.result.history else 0} epochs in {a.seconds:.0f} s{taught}")
    click.echo(f"checkpoints and learning curve in {run_dir}; label with `cxrlabel label --model {a.name}`, "
               f"compare with `cxrlabel evaluate --model {a.parent} --model {a.name}`")


def _pair(text: str, option: str, example: str) -> tuple[float, float]:
    """``LO,HI`` as two floats, or a usage error naming the option."""
    try:
        pair = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise click.BadParameter(f"two numbers, e.g. {example}", param_hint=option) from None
    if len(pair) != 2:
        raise click.BadParameter(f"two numbers, e.g. {example}", param_hint=option)
    return pair
