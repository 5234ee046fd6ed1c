"""``cxrlabel quality``: fit a model's quality score on your own annotated films, and show which
score a model carries."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.cli.common import emit, emit_json, engine_of, handle_errors, json_option


@click.group()
def quality() -> None:
    """The quality score (estimated Dice per structure): fit it on your films, show it."""


@quality.command("fit")
@click.option("--model", default="default", show_default=True, help="The model whose score is fitted.")
@click.option("--cv", "cv", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Fit on the held-out films of this cross-validation run of the model's recipe "
                   "(`cxrlabel train --folds K`); without it, on the database's annotated films the model "
                   "did not train on.")
@click.option("--checkpoint", type=click.Choice(["final", "best"]), default="final", show_default=True,
              help="With --cv: each fold's last epoch (as long as the shipped model trained), or its best.")
@click.option("--sample", help="Only the annotated films of this named sample (a checkpoint that does not record "
                               "the films it trained on needs one: films it never saw).")
@click.option("--folds", type=click.IntRange(min=2), default=5, show_default=True,
              help="Without --cv: leave-fold-out folds, films of one patient together.")
@click.option("--shifts", is_flag=True, help="Also label each film under the equipment-like shifts (contrast, "
                                             "noise, JPEG, crops, rotations, a collimator's rim...) at two "
                                             "strengths: ~25x the labelling, a score that knows odd films.")
@click.option("--tta", is_flag=True, help="Also fit the score that reads test-time augmentation (label --tta).")
@click.option("--alpha", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="Ridge penalty (above 0).")
@click.option("--force", is_flag=True, help="Keep the score even when its held-out figures are missing or below "
                                            "the floor (Spearman 0.3).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the score to this file (e.g. CHECKPOINT.quality.json, to ship beside it).")
@click.option("--figure", type=click.Path(dir_okay=False, path_type=Path),
              help="Draw the held-out calibration here (PNG).")
@click.option("--cache", type=click.Path(file_okay=False), envvar="CXRLABEL_CACHE")
@click.option("--seed", type=int, default=0, show_default=True)
@json_option
@click.pass_context
@handle_errors
def quality_fit(ctx, model, cv, checkpoint, sample, folds, shifts, tta, alpha, force, out, figure, cache, seed,
                as_json) -> None:
    """Fit a model's quality score on annotated films it did not train on, and keep it.

    Every film is labelled as `cxrlabel label` would; the score is fitted leaving one fold out
    at a time, and its held-out figures are printed: Spearman and mean absolute error against
    the true mean Dice, calibration by decile, and the AUROC of finding the worst tenth of films
    by mean Dice and by CTR error, by the score and by the review worklist's trust (the score
    together with how plainly each film shows the heart's width-setting borders); with films of
    two or more sources, also each source's figures with the score fitted without its films (a
    source the score never saw). Under 50 films, it says the figures are rough. The score fitted on every fold
    is kept in the database for the model's checkpoint, where `label` finds it before the file
    beside the checkpoint.

    \b
    Example:
        cxrlabel quality fit --model default --sample my_annotated --figure reports/calibration.png
        cxrlabel quality fit --model cxr_deep_all --cv runs/cxr_deep_cv --shifts --tta
    """

    from pipeline.quality.fit import fit
    result = fit(engine_of(ctx), model, cv, checkpoint, sample, folds, shifts, tta, alpha, out, figure, cache, seed,
                 force=force)
    judged = [("score", result.judged)] + ([("score with --tta", result.tta_judged)] if result.tta_judged else [])
    if as_json:
        emit_json({name: j.as_dict() for name, j in judged} | {"films": result.films, "too_few": result.too_few(),
                                                                "stored": result.stored})
        return
    for name, j in judged:
        click.echo(f"{name}, held out ({result.films} films, {j.films} with their variants): Spearman "
                   f"{j.spearman:.3f} with the true mean Dice (heuristic {j.heuristic_spearman:.3f}), MAE {j.mae:.4f}; "
                   f"the worst tenth found at AUROC {j.auroc_dice:.3f} by mean Dice, {j.auroc:.3f} by CTR error "
                   f"({j.ctr_films} with a true CTR)")
        if j.trust_auroc == j.trust_auroc:
            click.echo(f"  the worklist's trust (quality and the heart's borders) finds them at AUROC "
                       f"{j.trust_auroc_dice:.3f} by mean Dice, {j.trust_auroc:.3f} by CTR error")
    for source, j in result.judged.by_source.items():
        click.echo(f"  {source} films only ({j.films}): Spearman {j.spearman:.3f}, MAE {j.mae:.4f}, "
                   f"AUROC {j.auroc_dice:.3f} by mean Dice, {j.auroc:.3f} by CTR error ({j.ctr_films} with a true CTR)")
    for source, j in result.judged.unseen.items():
        click.echo(f"  {source} films, the score and trust fitted without them ({j.films}): Spearman "
                   f"{j.spearman:.3f}; worst tenth at AUROC {j.auroc_dice:.3f} by mean Dice, {j.auroc:.3f} by CTR "
                   f"error; by trust {j.trust_auroc_dice:.3f} and {j.trust_auroc:.3f}")
    if warning := result.too_few():
        click.secho(f"note: {warning}", fg="yellow")
    click.echo("calibration by decile of the estimate (held out):")
    emit([{"estimated": e, "true": t, "films": n} for e, t, n in result.judged.calibration], False)
    for where in result.stored:
        click.echo(f"kept in {where}")
    if figure:
        click.echo(f"calibration figure: {figure}")


@quality.command("show")
@click.option("--model", help="One model (default: the shipped default and every registered model).")
@json_option
@click.pass_context
@handle_errors
def quality_show(ctx, model, as_json) -> None:
    """Which quality score each model carries, where it came from and how it did held out.

    \b
    Example:
        cxrlabel quality show --model default
    """
    from pipeline.model import model_scores
    emit(model_scores(engine_of(ctx), model), as_json)


COMMANDS = [quality]
