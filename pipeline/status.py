"""What a database holds, stage by stage, and the step a user would likely take next."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from pipeline import db as D


def _counts(conn, column, *where) -> dict[str, int]:
    q = select(column, func.count()).group_by(column).order_by(column)
    for w in where:
        q = q.where(w)
    return {str(k) if k is not None else "(none)": int(n) for k, n in conn.execute(q)}


def status(engine: Engine, runs: int = 5) -> dict:
    """Per stage: catalogue by source, groups and samples, cache entries per settings,
    labelled images per model, manual and reviewed masks, failures by stage; the last
    ``runs`` label runs; and the next step."""
    i, g, m = D.images, D.groups, D.measurements
    with engine.connect() as conn:
        out = {
            "images": _counts(conn, i.c.source),
            "groups": _counts(conn, g.c.group_name),
            "samples": _counts(conn, D.samples.c.name),
            "cache": {f"{size} px {mode}": int(n) for size, mode, n in conn.execute(
                select(D.cache.c.size, D.cache.c.mode, func.count()).group_by(D.cache.c.size, D.cache.c.mode)
                .order_by(D.cache.c.size, D.cache.c.mode))},
            "labelled": _counts(conn, m.c.model),
            "masks": _counts(conn, D.masks.c.kind),
            "failures": _counts(conn, D.failures.c.stage),
            "load_errors": int(conn.execute(select(func.count()).select_from(D.load_errors)).scalar() or 0),
        }
        out["older_heart"] = {str(k): int(n) for k, n in conn.execute(
            select(m.c.model, func.count()).join(D.label_runs, D.label_runs.c.id == m.c.run_id)
            .where(D.label_runs.c.heart_definition == "cardiomediastinum").group_by(m.c.model).order_by(m.c.model))}
        out["mask_sources"] = {row.source: row.definitions for row in conn.execute(
            select(D.mask_sources.c.source, D.mask_sources.c.definitions).order_by(D.mask_sources.c.source))}
        r = D.label_runs
        last: list[dict] = [dict(row._mapping) for row in conn.execute(
            select(r.c.id, r.c.model, r.c.selection, r.c.device, r.c.status, r.c.n_selected, r.c.n_labelled,
                   r.c.n_skipped, r.c.n_failed, r.c.started_at, r.c.ended_at).order_by(r.c.id.desc()).limit(runs))]
        out["runs"] = last
        out["models"] = _models(conn, last[0]["model"] if last else "default")
    out["next"] = next_step(out)
    return out


def _models(conn, current: str) -> dict:
    """The model labelling now uses (the last run's; the shipped default before any) and the
    registered models with the parent each was adapted from (`train --from`)."""
    import json
    registered = []
    for name, metrics in conn.execute(select(D.models.c.name, D.models.c.metrics).order_by(D.models.c.name)):
        try:
            info = json.loads(metrics or "{}")
        except ValueError:
            info = {}
        parent = info.get("parent") if isinstance(info, dict) else None
        registered.append({"name": name, "parent": parent.get("name") if isinstance(parent, dict) else None,
                           "parent_sha256": parent.get("sha256") if isinstance(parent, dict) else None,
                           "adapted_on": info.get("adapted_on") if isinstance(info, dict) else None})
    calibrated = {(r.model, r.site) for r in conn.execute(select(D.ctr_calibrations.c.model,
                                                                 D.ctr_calibrations.c.site))}
    return {"current": current, "registered": registered,
            "calibrated": [f"{m} at {site}" for m, site in sorted(calibrated)]}


def next_step(s: dict) -> str:
    """The command a user would likely run next, from what :func:`status` found."""
    if not s["images"]:
        return ("cxrlabel catalogue load nih Data_Entry_2017_v2020.csv.gz --image-root DIR "
                "(or dicom DIR, csv FILE --map ...): catalogue your images")
    if not s["groups"]:
        return "cxrlabel groups assign: sort the images into cardiomegaly / healthy by their text"
    if not s["labelled"]:
        group = "cardiomegaly" if "cardiomegaly" in s["groups"] else next(iter(s["groups"]))
        return f"cxrlabel label --group {group}: masks and CTR for a group (the cache fills on the way)"
    if s["runs"] and s["runs"][0]["n_failed"]:
        return f"cxrlabel failures --since {s['runs'][0]['id']}: why the last run failed on some images"
    return ("cxrlabel report --group cardiomegaly --group healthy --out reports/, and cxrlabel review "
            "--reviewer NAME: look at the results, the doubtful masks first")
