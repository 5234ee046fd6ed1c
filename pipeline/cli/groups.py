"""``cxrlabel groups``: stage 1, groups of interest and named samples."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline import groups as G
from pipeline.cli.common import batch_exit, emit, emit_json, engine_of, handle_errors, json_option


@click.group()
def groups() -> None:
    """Stage 1: groups of interest from report text, and named samples."""


@groups.command("assign")
@click.option("--rules", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A rules file (TOML) in the form of pipeline/rules/default.toml.")
@click.pass_context
@handle_errors
def groups_assign(ctx, rules) -> None:
    """(Re)assign every image to cardiomegaly, healthy, or no group.

    \b
    Example:
        cxrlabel groups assign --rules my_clinic_rules.toml
    """
    from pipeline import db as D
    from pipeline.failures import list_failures, summary
    engine = engine_of(ctx)
    started = D.utcnow()
    counts = G.assign(engine, G.load_rules(rules))
    for name, n in sorted(counts.items()):
        click.echo(f"{name:>14}  {n}" + ("  (group_name NULL in the views)" if name == G.NO_GROUP else ""))
    total = sum(counts.values())
    for line in summary(engine, "groups", started, total):
        click.echo(line)
    failed = len(list_failures(engine, "groups", started))
    batch_exit(total - failed, failed)


@groups.command("coverage")
@click.option("--group", help="Only this group's reports; '(no group)' for the ungrouped [every group].")
@click.option("--top", type=click.IntRange(min=1), default=20, show_default=True, help="Phrasings per group.")
@click.option("--rules", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Cut reports into clauses as this rules file does.")
@json_option
@click.pass_context
@handle_errors
def groups_coverage(ctx, group, top, rules, as_json) -> None:
    """The most frequent phrasings among the reports of each group, the ungrouped among them.

    Each report clause is counted by its first words (numbers as #), with how many reports use
    it and one example uid: phrases, never whole reports. Read the '(no group)' list to see which
    of your own wordings the rules miss, add them to a rules file (`groups assign --rules`), and
    check one with `groups explain UID`.

    \b
    Example:
        cxrlabel groups coverage --group "(no group)" --top 30
        cxrlabel groups coverage --json > coverage.json
    """
    found = G.coverage(engine_of(ctx), G.load_rules(rules), top, group)
    if as_json:
        emit_json(found)
        return
    if not found:
        click.echo("no reports" + (f" in group {group!r}" if group else "") + ": run `cxrlabel groups assign` first")
    for name, rows in found.items():
        click.echo(f"{name}:")
        emit(rows, False)
        click.echo("")


@groups.command("explain")
@click.argument("uid")
@click.option("--rules", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Decide with this rules file instead of the shipped one (to try an edit).")
@json_option
@click.pass_context
@handle_errors
def groups_explain(ctx, uid, rules, as_json) -> None:
    """Which rule and which words put one image in its group (or in none).

    Decides the image again, step by step: the clauses its report was cut into, every
    phrase found with the negation or doubt that ruled it out, a CTR the report states,
    and the vetoes. Also shows the group stored by the last `groups assign`.

    \b
    Example:
        cxrlabel groups explain 00000013_005.png
        cxrlabel groups explain 1.2.840.1234 --rules my_clinic_rules.toml
    """
    e = G.explain(engine_of(ctx), uid, G.load_rules(rules))
    if as_json:
        emit_json(e)
        return
    click.echo(f"image      {e['uid']}")
    click.echo(f"labels     {e['labels'] or '-'}")
    click.echo(f"text       {e['text'] or '-'}")
    click.echo(f"decided    {e['group'] or 'no group'}  ({e['reason']})  with {e['rules']}")
    stored = e["stored_group"] or "no group"
    click.echo(f"stored     {stored}" + (f"  ({e['stored_rule']})" if e["stored_rule"] else "") +
               ("" if e["stored_group"] == e["group"] else "  <- differs: run `cxrlabel groups assign` to update"))
    if e["report_ctr"] is not None:
        click.echo(f"report CTR {e['report_ctr']:.2f}")
    click.echo("steps:")
    for step in e["steps"]:
        click.echo(f"  - {step}")


@groups.command("sample")
@click.option("--name", required=True, help="Sample name, e.g. test70k.")
@click.option("--per-group", required=True, type=click.IntRange(min=1), help="Images per group.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--group", "only", multiple=True, help="Groups to draw from [default: all].")
@click.option("--source", help="Only images of this dataset (images.source).")
@click.option("--on-disk", is_flag=True, help="Only images whose file is on this machine.")
@click.pass_context
@handle_errors
def groups_sample(ctx, name, per_group, seed, only, source, on_disk) -> None:
    """Store a balanced, reproducible sample (replacing one of the same name).

    \b
    Example:
        cxrlabel groups sample --name test70k --per-group 35000 --seed 0
    """
    s = G.sample(engine_of(ctx), name, per_group, seed, only or None, source, on_disk)
    for g, n in s.per_group.items():
        note = f"  (only {s.short[g]} images: taken whole)" if g in s.short else ""
        click.echo(f"{name}/{g}: {n}{note}")


@groups.command("list")
@json_option
@click.pass_context
@handle_errors
def groups_list(ctx, as_json) -> None:
    """Counts per group and per sample.

    \b
    Example:
        cxrlabel groups list --json
    """
    c = G.counts(engine_of(ctx))
    rows = [{"kind": "group", "name": n, "images": k} for n, k in c["groups"]]
    rows += [{"kind": "sample", "name": n, "images": k} for n, k in c["samples"]]
    if as_json:
        emit(rows, True)
        return
    click.echo(f"catalogued images: {c['total']}")
    emit(rows, False)


COMMANDS = [groups]
