"""Pictures of labelling results: a contact sheet of overlays, CTR histograms per group, and
the quality score's calibration.

Overlays are drawn on the cached image (cache geometry): heart contour in red, lung
contours in green/blue, the heart width (yellow) and thoracic width (cyan) lines whose
ratio is the CTR, and under each tile the CTR (marked AP on AP films, where the heart is
magnified) and the quality score, an estimated Dice, with the structure it doubts most.
The sheet shows the lowest-quality images first: the ones to review. The CTR histogram puts
the groups side by side, PA (and unknown view) and AP films apart (the 0.5 rule is for PA
films), lateral films left out; with two groups, the ROC of the CTR separating them.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from pipeline import CxrlabelError
from pipeline import db as D
from pipeline.collect import read_cached
from pipeline.imaging import Geometry
from pipeline.masks import load_masks
from pipeline.metrics import auc, auc_interval

log = logging.getLogger(__name__)

COLOURS = {"heart": (60, 60, 255), "left_lung": (80, 220, 80), "right_lung": (255, 160, 60)}


class ReportError(CxrlabelError):
    pass


@dataclass
class ReportFiles:
    contact_sheet: Path
    histogram: Path
    images: int
    calibration: Path | None = None  # the model's quality score: estimated vs true Dice, held out
    roc: Path | None = None  # two groups: how well the CTR separates them (AUC), by view
    bland_altman: Path | None = None  # the CTR against manual masks, where the model labelled annotated films
    summary: dict = field(default_factory=dict)  # the numbers behind the figures (ctr_summary)


TILE = 320  # a contact sheet's tile, px: its captions in a type a reader reads at the sheet's size


def overlay(image: np.ndarray, geom: Geometry, masks: dict[str, np.ndarray], meas: dict,
            size: int = TILE) -> np.ndarray:
    """``(size, size, 3) uint8`` BGR tile: contours and width lines drawn on the cached image,
    then brought to ``size`` and captioned there (CTR and quality, uid and group)."""
    tile = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    for s, m in masks.items():
        small = geom.to_cache(m.astype(np.float32)) > 0.5
        contours, _ = cv2.findContours(small.astype(np.uint8), cv2.RETR_EXTERNAL,
                                       cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(tile, contours, -1, COLOURS.get(s, (255, 255, 255)), 1)
    _width_lines(tile, geom, masks, meas)
    tile = cv2.resize(tile, (size, size), interpolation=cv2.INTER_LINEAR if size > tile.shape[0] else cv2.INTER_AREA)
    ctr = meas.get("ctr")
    q = meas.get("quality")
    label = f"CTR {ctr:.2f}" if ctr is not None else "CTR -"
    label += " AP" if meas.get("view") == "AP" else ""
    label += f"  q {q:.2f}" if q is not None else ""
    doubts: dict[str, float] = {s: meas[f"quality_{s}"] for s in COLOURS if meas.get(f"quality_{s}") is not None}
    if doubts:
        worst = min(doubts, key=lambda s: doubts[s])
        label += f" ({worst.replace('_lung', '')} {doubts[worst]:.2f})"
    flagged = meas.get("input_check") not in (None, "ok")
    uid = str(meas.get("uid") or "")
    top = (uid if len(uid) <= 26 else "..." + uid[-23:]) + (f"  {meas['group_name']}" if meas.get("group_name") else "")
    _caption(tile, top, 0)
    _caption(tile, flag_caption(meas["input_check"]) if flagged else label, 1,
             (80, 80, 255) if flagged else (255, 255, 255))
    return tile


def _width_lines(tile: np.ndarray, geom: Geometry, masks: dict[str, np.ndarray], meas: dict) -> None:
    """The heart's width across the lower heart, where the transverse diameter lies, and the
    thorax's below it at the lungs' widest row (at least a tenth of the heart's height lower:
    two lines on top of each other read as one)."""
    heart = masks.get("heart")
    if heart is None or not heart.any() or meas.get("heart_x0") is None:
        return
    rows = np.flatnonzero(heart.any(axis=1))
    y = int(rows[int(len(rows) * 0.7)])
    cv2.line(tile, geom.point_to_cache(meas["heart_x0"], y), geom.point_to_cache(meas["heart_x1"], y),
             (0, 230, 255), 1)
    lungs = [m for s, m in masks.items() if s in ("left_lung", "right_lung") and m.any()]
    if meas.get("lungs_x0") is None or not lungs:
        return
    union = np.logical_or.reduce(lungs)
    left, right = np.argmax(union, axis=1), union.shape[1] - np.argmax(union[:, ::-1], axis=1)
    spans = np.where(union.any(axis=1), right - left, 0)
    yt = int(np.argmax(spans))
    gap = max(8, (rows[-1] - rows[0]) // 10)
    yt = yt if abs(yt - y) >= gap else y + gap
    (x0, yc), (x1, _) = geom.point_to_cache(meas["lungs_x0"], yt), geom.point_to_cache(meas["lungs_x1"], yt)
    cv2.line(tile, (x0, yc), (x1, yc), (255, 255, 0), 1)


def flag_caption(reason: str, width: int = 34) -> str:
    """The input check's stored reason, as short as a tile's caption holds: its question
    ("cropped?", "flipped left-right (or situs inversus)?") or the words before its colon."""
    short = reason.split("?", 1)[0] + "?" if "?" in reason else reason.split(":", 1)[0]
    short = "flag: " + short
    if len(short) > width:  # an aside in brackets goes first
        short = re.sub(r"\s*\([^)]*\)", "", short)
    return short if len(short) <= width else short[:width - 3] + "..."


def _selection(engine: Engine, model: str, groups: Sequence[str], sample: str | None) -> list[dict]:
    r = D.measurements
    view = func.upper(D.images.c.view).label("view")
    i = D.images
    q = (select(r, D.groups.c.group_name, view, i.c.source, i.c.patient_id, i.c.study_date)
         .join(D.images, D.images.c.uid == r.c.uid)
         .join(D.groups, D.groups.c.uid == r.c.uid, isouter=True))
    q = q.where(r.c.model == model)
    if groups:
        q = q.where(D.groups.c.group_name.in_(list(groups)))
    if sample:
        q = q.join(D.samples, D.samples.c.uid == r.c.uid).where(D.samples.c.name == sample)
    with engine.connect() as conn:
        return [dict(row._mapping) for row in conn.execute(q.order_by(r.c.uid))]


def report(engine: Engine, out_dir: Path, model: str = "default", group: str | Sequence[str] | None = None,
           sample: str | None = None, tiles: int = 24, columns: int = 6, include_flagged: bool = False,
           per_film: bool = False) -> ReportFiles:
    """Contact sheet of the ``tiles`` lowest-quality images of the group(s) or sample, the CTR
    distributions of the groups side by side (PA and AP apart), and with two groups the ROC
    of the CTR separating the first from the second. Films the input check flagged (not a
    frontal chest film the model can read) head the contact sheet and are left out of the
    distributions and the ROC, unless ``include_flagged``. The distributions and the ROC count
    one film per patient (:func:`one_per_patient`), or with ``per_film`` every film."""
    groups = [group] if isinstance(group, str) else list(group or [])
    from pipeline.groups import missing_name
    with engine.connect() as conn:  # a name that does not exist is said so, with the names that do
        for missing in (*(missing_name(conn, group=g) for g in groups), missing_name(conn, sample_name=sample),
                        missing_name(conn, labelled_by=model)):
            if missing:
                raise ReportError(missing)
    rows = _selection(engine, model, groups, sample)
    if not rows:
        raise ReportError(f"no images labelled by model {model!r} in this selection: run "
                          "`cxrlabel label` first")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", "_".join(groups) or sample or "all")  # a file name, whatever the label
    # the lowest quality first; twice as many as shown, so films stored twice can be shown once
    chosen = sorted(rows, key=lambda r: (r["quality"] if r["quality"] is not None else -1))[:2 * tiles]
    uids = [r["uid"] for r in chosen]
    with engine.connect() as conn:
        cached = read_cached(conn, uids)
        masks = load_masks(conn, uids, kind="predicted", model=model)
    images: list = []
    seen: set = set()
    for r in chosen:
        e = cached.get(r["uid"])
        if e is None or len(images) == tiles:
            continue
        pixels = hashlib.sha1(e.image.tobytes()).digest()
        if pixels in seen:  # the same film under another uid (an archive's copy): shown once
            continue
        seen.add(pixels)
        images.append(overlay(e.image, e.geom, masks.get(r["uid"], {}), r))
    sheet = _grid(images, columns)
    sheet_path = out_dir / f"contact_sheet_{name}.png"
    cv2.imwrite(str(sheet_path), sheet)
    hist_path = out_dir / f"ctr_histogram_{name}.png"
    def counted(these: list[dict]) -> list[dict]:
        these = _in_statistics(these, include_flagged)
        return these if per_film else one_per_patient(these)
    unit = "films" if per_film else "patients"
    _histogram(counted(_selection(engine, model, [], sample) if not groups else rows), hist_path, model, unit)
    roc_path = out_dir / f"ctr_roc_{name}.png" if len(groups) >= 2 else None
    if roc_path and not _roc(counted(rows), groups[0], groups[1], roc_path, model, unit):
        roc_path = None
    summary = ctr_summary(counted(_selection(engine, model, [], sample) if not groups else rows), groups, unit)
    return ReportFiles(sheet_path, hist_path, len(images), _calibration(engine, model, out_dir), roc_path,
                       _agreement(engine, model, out_dir), summary)


def ctr_summary(rows: list[dict], groups: Sequence[str], unit: str = "patients") -> dict:
    """The numbers behind the histogram and the ROC, per view (PA and unknown, AP): for each
    group its count (of ``unit``), CTR mean, SD, median and quartiles, and the share above 0.5;
    with two groups the AUC of the CTR calling the first against the second and its 95%
    interval (DeLong)."""
    out: dict = {"unit": unit, "views": {}}
    for view, vrows in _views(rows).items():
        by_group: dict = {}
        for g in groups or sorted({r.get("group_name") or "(no group)" for r in vrows}):
            ctr = np.array([r["ctr"] for r in vrows if (r.get("group_name") or "(no group)") == g], float)
            if not len(ctr):
                continue
            q1, median, q3 = (float(v) for v in np.percentile(ctr, [25, 50, 75]))
            by_group[g] = {"n": len(ctr), "mean": float(ctr.mean()), "sd": float(ctr.std(ddof=1)) if len(ctr) > 1
                           else float("nan"), "median": median, "q1": q1, "q3": q3,
                           "above_0_5": float((ctr > 0.5).mean())}
        entry: dict = {"groups": by_group}
        if len(groups) >= 2 and groups[0] in by_group and groups[1] in by_group:
            pos = [r["ctr"] for r in vrows if r.get("group_name") == groups[0]]
            neg = [r["ctr"] for r in vrows if r.get("group_name") == groups[1]]
            area, lo, hi = auc_interval(pos, neg)
            entry["auc"] = {"positive": groups[0], "negative": groups[1], "auc": area, "ci95": [lo, hi],
                            "method": "DeLong"}
        out["views"][view] = entry
    return out


def _agreement(engine: Engine, model: str, out_dir: Path) -> Path | None:
    """The CTR's Bland-Altman plot and bias by true-CTR band over the model's images that have
    manual masks (none: no picture)."""
    from pipeline.evaluate import EvaluateError, bland_altman_figure, evaluate
    try:
        ev = evaluate(engine, model)
        if not ev.ctr_error["n"]:
            return None
        return bland_altman_figure(ev, out_dir / f"ctr_bland_altman_{re.sub(r'[^A-Za-z0-9._-]+', '_', model)}.png")
    except EvaluateError:
        return None


LATERAL = ("LL", "RL", "LAT", "LATERAL")


def one_per_patient(rows: list[dict]) -> list[dict]:
    """One film per patient and group, as ``label_results.patient_film`` picks it: the
    patient's earliest film with a CTR (undated after dated, then by uid); a film without a
    patient id is a patient of its own."""
    best: dict[tuple, tuple[tuple, dict]] = {}
    for r in rows:
        patient = f"{r.get('source')}:{r['patient_id']}" if r.get("patient_id") else f"film:{r['uid']}"
        key = (r.get("group_name"), patient)
        rank = (r.get("ctr") is None, r.get("study_date") is None, r.get("study_date") or "", r["uid"])
        if key not in best or rank < best[key][0]:
            best[key] = (rank, r)
    return [r for _, r in best.values()]


def _in_statistics(rows: list[dict], include_flagged: bool = False) -> list[dict]:
    """The rows CTR statistics count: all of them with ``include_flagged``, else those the
    input check passed (or that were labelled before it)."""
    return rows if include_flagged else [r for r in rows if r.get("input_check") in (None, "ok")]


def _views(rows: list[dict]) -> dict[str, list[dict]]:
    """Frontal rows with a CTR, by how to read them: PA (and unknown view), AP."""
    out: dict[str, list[dict]] = {"PA and unknown view": [], "AP": []}
    for r in rows:
        if r["ctr"] is not None and r.get("view") not in LATERAL:
            out["AP" if r.get("view") == "AP" else "PA and unknown view"].append(r)
    return {k: v for k, v in out.items() if v}


def _roc(rows: list[dict], positive: str, negative: str, path: Path, model: str, unit: str = "patients") -> bool:
    """ROC of the CTR calling ``positive`` against ``negative``, per view; False when a
    group has no CTR to compare."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(4.4, 4.4))
    drawn = False
    for view, vrows in _views(rows).items():
        pos = np.array([r["ctr"] for r in vrows if r.get("group_name") == positive])
        neg = np.array([r["ctr"] for r in vrows if r.get("group_name") == negative])
        if not len(pos) or not len(neg):
            continue
        cuts = np.r_[np.inf, np.sort(np.concatenate([pos, neg]))[::-1]]
        tpr = [(pos >= c).mean() for c in cuts]
        fpr = [(neg >= c).mean() for c in cuts]
        ax.plot(fpr, tpr, label=f"{view}: AUC {auc(pos, neg):.3f} ({len(pos)} vs {len(neg)} {unit})")
        drawn = True
    if drawn:
        ax.plot([0, 1], [0, 1], color="k", lw=0.8, ls="--")
        ax.set(xlabel=f"{negative} called {positive} (false positive rate)",
               ylabel=f"{positive} found (true positive rate)",
               title=f"CTR separating {positive}\nfrom {negative} ({model})")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), fontsize=8, frameon=False)  # under the axes
        fig.tight_layout()
        fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return drawn


def _calibration(engine: Engine, model: str, out_dir: Path) -> Path | None:
    """The model's quality score: estimated against true mean Dice on held-out folds under
    equipment-like shifts (the table ``bench/quality.py`` stores with the score)."""
    from pipeline.model import ModelError, resolve_model
    try:
        scorer = resolve_model(engine, model, "cpu").quality
    except ModelError as e:
        log.warning("no calibration picture: %s", e)
        return None
    table = (scorer.info.get("calibration") if scorer is not None else None) or []
    if scorer is None or not table:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    est, true, n = (np.array(c, float) for c in zip(*table, strict=True))
    held = scorer.info.get("held_out", {})
    fig, ax = plt.subplots(figsize=(4.2, 4.2))
    lo = float(min(est.min(), true.min(), 0.8)) - 0.02
    ax.plot([lo, 1], [lo, 1], color="k", lw=0.8, ls="--", label="perfect calibration")
    ax.scatter(est, true, s=12 + 60 * n / n.max(), label="images binned by estimate")
    ax.set(xlim=(lo, 1), ylim=(lo, 1), xlabel="estimated Dice (quality)", ylabel="true mean Dice",
           title=f"quality score of {model}: held out\nSpearman {held.get('spearman', float('nan')):.2f}, "
                 f"MAE {held.get('mae', float('nan')):.3f}")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path = out_dir / f"quality_calibration_{re.sub(r'[^A-Za-z0-9._-]+', '_', model)}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _caption(tile: np.ndarray, text: str, where: int, colour=(255, 255, 255)) -> None:
    """``text`` on a dark band along the tile's top (``where`` 0) or bottom (1): readable on
    a bright film as on a dark one."""
    h, w = tile.shape[:2]
    band_h = max(16, h // 16)
    y0 = 0 if where == 0 else h - band_h
    band = tile[y0:y0 + band_h]
    band[:] = (band * 0.25).astype(np.uint8)
    cv2.putText(tile, text, (4, y0 + band_h - 6), cv2.FONT_HERSHEY_SIMPLEX, 0.38 * h / 256, colour, 1, cv2.LINE_AA)


LEGEND = (("heart", COLOURS["heart"]), ("left lung", COLOURS["left_lung"]), ("right lung", COLOURS["right_lung"]),
          ("heart width", (0, 230, 255)), ("thoracic width", (255, 255, 0)))


def _legend(width: int) -> np.ndarray:
    """The sheet's key: the outlines' and the width lines' colours, and how to read a caption."""
    band = np.full((40, width, 3), 32, np.uint8)
    x = 8
    for name, colour in LEGEND:
        cv2.line(band, (x, 13), (x + 18, 13), colour, 2)
        cv2.putText(band, name, (x + 24, 17), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (235, 235, 235), 1, cv2.LINE_AA)
        x += 24 + 9 * len(name) + 18
    cv2.putText(band, "top: uid, group   bottom: CTR, q = estimated Dice (the structure doubted most), lowest first",
                (8, 34), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (200, 200, 200), 1, cv2.LINE_AA)
    return band


def _grid(tiles: list[np.ndarray], columns: int) -> np.ndarray:
    """The tiles, ``columns`` to a row, under the legend."""
    if not tiles:
        return np.zeros((TILE, TILE, 3), np.uint8)
    rows = (len(tiles) + columns - 1) // columns
    cols = min(columns, len(tiles))
    sheet = np.zeros((rows * TILE, cols * TILE, 3), np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, columns)
        sheet[r * TILE:(r + 1) * TILE, c * TILE:(c + 1) * TILE] = t
    return np.concatenate([_legend(sheet.shape[1]), sheet])


def _histogram(rows: list[dict], path: Path, model: str, unit: str = "patients") -> None:
    """CTR distributions of the groups on one figure, with each group's share above 0.5; PA
    (and unknown view) and AP films in separate panels, lateral films left out."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    views = _views(rows) or {"PA and unknown view": []}
    fig, axes = plt.subplots(1, len(views), figsize=(6 * len(views), 3.6), squeeze=False)
    bins = np.linspace(0.2, 0.9, 36)
    for ax, (view, vrows) in zip(axes[0], views.items(), strict=True):
        by_group: dict[str, list[float]] = {}
        for r in vrows:
            by_group.setdefault(r.get("group_name") or "no group", []).append(r["ctr"])
        for k, (g, values) in enumerate(sorted(by_group.items())):
            share = float(np.mean(np.array(values) > 0.5))
            # each group's share of its own patients per bin, as an outline: groups of any size
            # compare, and overlapping groups stay readable (filled bars mixed into brown)
            ax.hist(values, bins=bins, weights=np.full(len(values), 100 / len(values)), histtype="step",
                    linewidth=1.8, color=f"C{k}", label=f"{g}: {len(values)} {unit}, {share:.0%} above 0.5")
        ax.axvline(0.5, color="k", lw=0.8, ls="--")
        ax.set(xlabel="cardiothoracic ratio", ylabel=f"% of the group's {unit}",
               title=f"CTR by group, {view}\n({model}; {'every film' if unit == 'films' else 'one film per patient'})")
        if by_group:
            ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


