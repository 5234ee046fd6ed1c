"""``cxrlabel query``, ``evaluate``, ``report`` and ``failures``: reading the results."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.cli.common import emit, emit_json, emit_stream, engine_of, handle_errors, json_option


@click.command()
@click.argument("sql")
@click.option("--csv", "as_csv", is_flag=True, help="Print CSV.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
@handle_errors
def query(ctx, sql, as_csv, as_json) -> None:
    """Run read-only SQL (a statement, a .sql file, or a ready query's name) and print the rows.

    --csv and --json print every row (streamed); the table shows the first 200.

    Ready queries ship with cxrlabel (sql/queries): ctr_by_group, healthy_ctr_over_0_5,
    review_lowest_quality, report_vs_measured_ctr (a CTR the report states against the
    measured one).

    \b
    Example:
        cxrlabel query "SELECT group_name, COUNT(*) FROM catalogue GROUP BY 1"
        cxrlabel query ctr_by_group --csv
        cxrlabel query my_queries/outliers.sql --json
    """
    from pipeline.results import read_only_query, statement
    result = read_only_query(engine_of(ctx, read_only=True), statement(sql))
    emit_stream(result.columns, result.rows, as_json, as_csv)


@click.command("evaluate")
@click.option("--truth", default="manual", show_default=True, help="Truth masks: manual.")
@click.option("--model", "models", multiple=True,
              help="The model [default]; repeat to compare models side by side on the films none of them "
                   "trained on (a parent and its adaptation).")
@click.option("--source", help="Only the films of this source (images.source, e.g. wingspan).")
@click.option("--sample", help="Only the films of this named sample (`cxrlabel groups sample`).")
@click.option("--include-trained", is_flag=True,
              help="Also the films the model trained on (or their patients'), marked as such: they read better "
                   "than new films.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (with per-image rows).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Also draw the CTR's Bland-Altman plot and bias by true-CTR band here.")
@click.pass_context
@handle_errors
def evaluate_cmd(ctx, truth, models, source, sample, include_trained, as_json, out_dir) -> None:
    """Dice per structure and the CTR's agreement with manual masks: bias, MAE, 95% limits of
    agreement and the share of films off by more than 0.03, overall and by true-CTR band. Films
    the model trained on are left out (and counted) unless --include-trained.

    \b
    Example:
        cxrlabel evaluate --truth manual --model default --out reports/
        cxrlabel evaluate --model my_clinic_model --source clinic_a --json
        cxrlabel evaluate --model default --model clinic_a --source clinic_a
    """
    from pipeline.evaluate import NothingHeldOut, bland_altman_figure, evaluate
    engine = engine_of(ctx)
    among = None
    if source or sample:
        from pipeline.groups import select_images
        with engine.connect() as conn:
            chosen = select_images(conn, sample_name=sample, all_images=not sample, source=source)
        among = {it.uid for it in chosen.items}
    if len(models) > 1:
        _compare(engine, list(dict.fromkeys(models)), truth, include_trained, among, as_json, out_dir)
        return
    model = models[0] if models else "default"
    try:
        ev = evaluate(engine, model, truth, include_trained, among)
    except NothingHeldOut as nothing:  # an answer, not a failure: there is no film to say it of
        if as_json:
            emit_json({"model": model, "images": 0, "note": str(nothing)})
        else:
            click.echo(str(nothing))
        return
    figure = bland_altman_figure(ev, out_dir / f"ctr_bland_altman_{_file_name(model)}.png") \
        if out_dir and ev.ctr_error["n"] else None
    if as_json:
        emit_json(ev.as_dict())
        return
    click.echo(f"{ev.model}: {ev.images} images with manual and predicted masks "
               "(lungs in their source's own convention)"
               + (f", {ev.trained} of them films it trained on" if ev.include_trained and ev.trained else ""))
    for note in ev.notes:
        click.echo(f"  note: {note}")
    for s, st in ev.dice.items():
        click.echo(f"  Dice {s:<11} {st['mean']:.4f} ± {st['sd']:.4f} (n={st['n']})")
    e = ev.ctr_error
    click.echo(f"  CTR           bias {e['mean']:+.4f}, MAE {e['mae']:.4f}, 95% limits of agreement "
               f"{e['loa'][0]:+.4f} to {e['loa'][1]:+.4f}, off by > 0.03: {e['off_by_0.03']:.1%} (n={e['n']})")
    for band, b in e["bands"].items():
        if b["n"]:
            click.echo(f"    true CTR {band:<9} bias {b['bias']:+.4f}, MAE {b['mae']:.4f}, "
                       f"off by > 0.03: {b['off_by_0.03']:.0%} (n={b['n']})")
    for reason, n in e["left_out_reasons"].items():
        click.echo(f"  left out of the CTR error: {n} image{'s' if n > 1 else ''} whose {reason}")
    if figure:
        click.echo(f"  Bland-Altman plot and bias by band: {figure}")


def _compare(engine, models: list[str], truth: str, include_trained: bool, among: set[str] | None,
             as_json: bool, out_dir: Path | None) -> None:
    """``evaluate --model A --model B``: each model on the same films, none of which any of them
    trained on, side by side (with --include-trained: on every film they all labelled)."""
    from pipeline.evaluate import NothingHeldOut, bland_altman_figure, common_held_out, evaluate
    if include_trained:
        chosen = among
    else:
        try:
            chosen = common_held_out(engine, models, among)
        except NothingHeldOut as nothing:
            click.echo(str(nothing))
            return
    evs = [evaluate(engine, m, truth, include_trained, chosen) for m in models]
    if as_json:
        emit_json([ev.as_dict() for ev in evs])
        return
    click.echo(f"{len(models)} models on the same {evs[0].images} films with manual masks"
               + (" (films they trained on included)" if include_trained else ", none of which any of them trained on"))
    width = max(14, *(len(m) for m in models))  # the widest cell: the limits, "-0.040..+0.018"
    click.echo(f"  {'':<24}" + "".join(f"{m:>{width + 2}}" for m in models))

    def line(label: str, cells: list[str]) -> None:
        click.echo(f"  {label:<24}" + "".join(f"{c:>{width + 2}}" for c in cells))

    for s in evs[0].dice:
        line(f"Dice {s}", [f"{ev.dice[s]['mean']:.4f}" if s in ev.dice else "-" for ev in evs])
    line("CTR bias", [f"{ev.ctr_error['mean']:+.4f}" for ev in evs])
    line("CTR MAE", [f"{ev.ctr_error['mae']:.4f}" for ev in evs])
    line("CTR 95% limits", [f"{ev.ctr_error['loa'][0]:+.3f}..{ev.ctr_error['loa'][1]:+.3f}" for ev in evs])
    line("off by > 0.03", [f"{ev.ctr_error['off_by_0.03']:.1%}" for ev in evs])
    line("films with a CTR", [str(ev.ctr_error["n"]) for ev in evs])
    for ev in evs:
        for note in ev.notes:
            click.echo(f"  note ({ev.model}): {note}")
        if out_dir and ev.ctr_error["n"]:
            click.echo(f"  Bland-Altman plot ({ev.model}): "
                       f"{bland_altman_figure(ev, out_dir / f'ctr_bland_altman_{_file_name(ev.model)}.png')}")


def _file_name(label: str) -> str:
    import re
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label)


@click.command("report")
@click.option("--group", "groups", multiple=True,
              help="A group; repeat to compare groups side by side (the first against the second: ROC).")
@click.option("--sample", help="A named sample instead of groups.")
@click.option("--model", default="default", show_default=True)
@click.option("--out", "out_dir", default="data/reports", show_default=True,
              type=click.Path(file_okay=False, path_type=Path))
@click.option("--tiles", default=24, show_default=True, type=click.IntRange(1, 400))
@click.option("--include-flagged", is_flag=True,
              help="Count films the input check flagged (not a frontal chest film the model can read) in the "
                   "CTR distributions and the ROC too.")
@click.option("--per-film", is_flag=True,
              help="Count every film in the distributions and the ROC [one film per patient: the earliest].")
@click.option("--json", "as_json", is_flag=True, help="Print the numbers and the files' paths as JSON.")
@click.pass_context
@handle_errors
def report_cmd(ctx, groups, sample, model, out_dir, tiles, include_flagged, per_film, as_json) -> None:
    """Contact sheet of overlays (lowest quality first), the groups' CTR distributions side by
    side (PA and AP apart), with two groups the ROC of the CTR separating them, and the
    quality score's calibration. Films the input check flagged head the contact sheet and
    are left out of the distributions and the ROC unless --include-flagged.

    \b
    Example:
        cxrlabel report --group cardiomegaly --group healthy --out reports/
    """
    from pipeline.report import report
    if bool(groups) == bool(sample):
        raise click.UsageError("choose --group (one or more) or --sample")
    if out_dir != Path("data/reports") and not out_dir.parent.exists():  # as --db: a mistyped path makes nothing
        raise click.UsageError(f"--out {out_dir}: the folder {out_dir.parent} does not exist: create it "
                               f"(mkdir -p {out_dir.parent}) or choose another")
    files = report(engine_of(ctx), out_dir, model, list(groups), sample, tiles, include_flagged=include_flagged,
                   per_film=per_film)
    if as_json:
        emit_json({"summary": files.summary, "files": {k: str(v) for k, v in (
            ("contact_sheet", files.contact_sheet), ("histogram", files.histogram), ("roc", files.roc),
            ("calibration", files.calibration), ("bland_altman", files.bland_altman)) if v is not None}})
        return
    unit = files.summary.get("unit", "patients")
    for view, entry in files.summary.get("views", {}).items():
        click.echo(f"CTR, {view} films ({unit}; one film each unless --per-film):")
        for g, st in entry["groups"].items():
            click.echo(f"  {g:<14} n={st['n']:<6} mean {st['mean']:.3f} (SD {st['sd']:.3f}), median {st['median']:.3f} "
                       f"(IQR {st['q1']:.3f}-{st['q3']:.3f}), above 0.5: {st['above_0_5']:.1%}")
        if "auc" in entry:
            a = entry["auc"]
            click.echo(f"  AUC of the CTR, {a['positive']} against {a['negative']}: {a['auc']:.3f} "
                       f"(95% CI {a['ci95'][0]:.3f}-{a['ci95'][1]:.3f}, DeLong)")
    click.echo(f"contact sheet ({files.images} images): {files.contact_sheet}")
    click.echo(f"CTR histogram: {files.histogram}")
    if files.roc:
        click.echo(f"CTR ROC, {groups[0]} against {groups[1]}: {files.roc}")
    if files.calibration:
        click.echo(f"quality score calibration (estimated vs true Dice, held out): {files.calibration}")
    if files.bland_altman:
        click.echo(f"CTR against manual masks (Bland-Altman, bias by true-CTR band): {files.bland_altman}")


FAILURES_SHOWN = 50  # rows the table shows unless --limit says otherwise


@click.command("failures")
@click.option("--stage", type=click.Choice(["collect", "label", "groups"]), help="Only this stage's failures.")
@click.option("--since", "since_run", type=click.IntRange(min=1), metavar="RUN",
              help="Only failures seen since label run RUN started.")
@click.option("--limit", type=click.IntRange(min=1),
              help=f"At most N (newest first) [the table: {FAILURES_SHOWN}; --csv and --json: all].")
@click.option("--csv", "as_csv", is_flag=True, help="Print CSV.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
@handle_errors
def failures_cmd(ctx, stage, since_run, limit, as_csv, as_json) -> None:
    """Images a stage could not process, one line per problem, newest first, each with its
    whole reason (catalogue rows that could not be loaded: `catalogue errors`).

    \b
    Example:
        cxrlabel failures --stage label --since 3
        cxrlabel failures --csv > failures.csv
    """
    from pipeline.failures import list_failures, run_started
    engine = engine_of(ctx)
    since = run_started(engine, since_run) if since_run else None
    if as_json or as_csv:
        emit(list_failures(engine, stage, since, limit), as_json, as_csv)
        return
    shown = limit or FAILURES_SHOWN
    rows = list_failures(engine, stage, since, shown + 1)
    emit([{"stage": r["stage"], "uid": r["uid"], "last_seen": str(r["last_seen_at"])[:19], "error": r["error_class"],
           "message": r["message"]} for r in rows[:shown]], False, uncut=("message",))
    if len(rows) > shown and not limit:
        total = len(list_failures(engine, stage, since))
        click.echo(f"... {total - shown} more not shown: `cxrlabel failures --limit N`, or --csv for all of them "
                   "(`cxrlabel status` groups them by reason)")


@click.command("calibrate")
@click.option("--model", default="default", show_default=True, help="Whose CTR to calibrate.")
@click.option("--source", "site", help="The site: a catalogue source whose annotated films the model never trained on.")
@click.option("--kind", type=click.Choice(["offset", "linear"]), default="offset", show_default=True,
              help="offset: the mean difference (10 films or more); linear: intercept and slope by least "
                   "squares, which also undoes a compressed range (20 films or more).")
@click.option("--min-films", type=click.IntRange(min=3), help="Fit on fewer films than the kind needs [10 / 20].")
@click.option("--dry-run", is_flag=True, help="Print the fit without storing it.")
@click.option("--list", "list_all", is_flag=True, help="List the stored calibrations.")
@click.option("--drop", is_flag=True, help="Remove the model's calibration at --source.")
@json_option
@click.pass_context
@handle_errors
def calibrate_cmd(ctx, model, site, kind, min_films, dry_run, list_all, drop, as_json) -> None:
    """Fit a site's CTR calibration: the CTR its own readers draw, from the model's, on the
    site's films with manual heart and lung masks. label_results then shows ctr_calibrated
    (and which calibration) beside the model's ctr on every film of that site the same model
    weights labelled; the raw ctr is never changed.

    \b
    Example:
        cxrlabel calibrate --model default --source clinic_a
        cxrlabel calibrate --list
    """
    from pipeline.calibration import calibrate, calibrations, forget
    engine = engine_of(ctx)
    if list_all:
        emit(calibrations(engine), as_json)
        return
    if not site:
        raise click.UsageError("--source SITE: the catalogue source whose films to calibrate on (or --list)")
    if drop:
        from pipeline.model import locate
        from pipeline.model.checkpoints import file_sha256
        n = forget(engine, file_sha256(locate(engine, model)[0]), site)
        click.echo(f"{model} at {site}: " + ("calibration removed" if n else "no calibration stored"))
        return
    cal = calibrate(engine, model, site, kind, min_films, store=not dry_run)
    if as_json:
        emit_json(cal.as_dict())
        return
    raw, loo = cal.details["raw"], cal.details["calibrated_loo"]
    formula = (f"CTR {cal.intercept:+.4f} (95% CI {cal.intercept_ci[0]:+.4f} to {cal.intercept_ci[1]:+.4f})"
               if cal.kind == "offset" else
               f"{cal.intercept:+.4f} (95% CI {cal.intercept_ci[0]:+.4f} to {cal.intercept_ci[1]:+.4f}) + "
               f"{cal.slope:.3f} (95% CI {cal.slope_ci[0]:.3f} to {cal.slope_ci[1]:.3f}) x CTR")
    click.echo(f"{model} at {site}: {cal.kind} calibration on {cal.films} films: calibrated = {formula}")
    click.echo(f"  on these films, each left out of its own fit: bias {raw['bias']:+.4f} -> {loo['bias']:+.4f}, "
               f"MAE {raw['mae']:.4f} -> {loo['mae']:.4f}")
    if loo["mae"] >= raw["mae"]:
        click.echo("  note: the calibration does not lower the error a new film of the site would see: "
                   "drop it (--drop), or annotate more films")
    click.echo("not stored (--dry-run)" if dry_run else
               f"stored: label_results.ctr_calibrated for {model}'s films of {site}")


COMMANDS = [query, evaluate_cmd, report_cmd, failures_cmd, calibrate_cmd]
