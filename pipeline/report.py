"""Pictures of labelling results: a contact sheet of overlays, CTR histograms per group, and
the quality score's calibration.

Overlays are drawn on the cached image (cache geometry): heart contour in red, lung
contours in green/blue, the heart width (yellow) and thoracic width (cyan) lines whose
ratio is the CTR, and under each tile the CTR (marked AP on AP films, where the heart is
magnified) and the quality score, an estimated Dice, with the structure it doubts most.
The sheet shows the lowest-quality images first: the ones to review. The CTR histogram
leaves AP and lateral films out (the 0.5 rule is for PA films) and says how many.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
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


def overlay(image: np.ndarray, geom: Geometry, masks: dict[str, np.ndarray], meas: dict) -> np.ndarray:
    """``(S, S, 3) uint8`` BGR tile: contours, width lines, CTR and quality."""
    tile = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    for s, m in masks.items():
        small = geom.to_cache(m.astype(np.float32)) > 0.5
        contours, _ = cv2.findContours(small.astype(np.uint8), cv2.RETR_EXTERNAL,
                                       cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(tile, contours, -1, COLOURS.get(s, (255, 255, 255)), 1)
    heart = masks.get("heart")
    if heart is not None and heart.any() and meas.get("heart_x0") is not None:
        rows = np.flatnonzero(heart.any(axis=1))
        y = int(rows[int(len(rows) * 0.7)])  # lower heart: where the transverse diameter lies
        cv2.line(tile, geom.point_to_cache(meas["heart_x0"], y), geom.point_to_cache(meas["heart_x1"], y),
                 (0, 230, 255), 1)
        if meas.get("lungs_x0") is not None:
            (x0, yc), (x1, _) = geom.point_to_cache(meas["lungs_x0"], y), geom.point_to_cache(meas["lungs_x1"], y)
            cv2.line(tile, (x0, yc + 3), (x1, yc + 3), (255, 255, 0), 1)
    ctr = meas.get("ctr")
    q = meas.get("quality")
    label = f"CTR {ctr:.2f}" if ctr is not None else "CTR -"
    label += " AP" if meas.get("view") == "AP" else ""
    label += f"  q {q:.2f}" if q is not None else ""
    doubts = {s: meas.get(f"quality_{s}") for s in COLOURS if meas.get(f"quality_{s}") is not None}
    if doubts:
        worst = min(doubts, key=doubts.get)
        label += f" ({worst.replace('_lung', '')} {doubts[worst]:.2f})"
    cv2.putText(tile, label, (4, tile.shape[0] - 6), cv2.FONT_HERSHEY_SIMPLEX, 0.4,
                (255, 255, 255), 1, cv2.LINE_AA)
    return tile


def _selection(engine: Engine, model: str, group: str | None, sample: str | None) -> list[dict]:
    r = D.measurements
    view = func.upper(D.images.c.view).label("view")
    q = (select(r, D.groups.c.group_name, view).join(D.images, D.images.c.uid == r.c.uid)
         .join(D.groups, D.groups.c.uid == r.c.uid, isouter=True))
    q = q.where(r.c.model == model)
    if group:
        q = q.where(D.groups.c.group_name == group)
    if sample:
        q = q.join(D.samples, D.samples.c.uid == r.c.uid).where(D.samples.c.name == sample)
    with engine.connect() as conn:
        return [dict(row._mapping) for row in conn.execute(q.order_by(r.c.uid))]


def report(engine: Engine, out_dir: Path, model: str = "default", group: str | None = None,
           sample: str | None = None, tiles: int = 24, columns: int = 6) -> ReportFiles:
    """Contact sheet of the ``tiles`` lowest-quality images and a CTR histogram per group."""
    rows = _selection(engine, model, group, sample)
    if not rows:
        raise ReportError(f"no images labelled by model {model!r} in this selection: run "
                          "`cxrlabel label` first")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", group or sample or "all")  # a file name, whatever the label
    chosen = sorted(rows, key=lambda r: (r["quality"] if r["quality"] is not None else -1))[:tiles]
    uids = [r["uid"] for r in chosen]
    with engine.connect() as conn:
        cached = read_cached(conn, uids)
        masks = load_masks(conn, uids, kind="predicted", model=model)
    images = []
    for r in chosen:
        e = cached.get(r["uid"])
        if e is None:
            continue
        tile = overlay(e.image, e.geom, masks.get(r["uid"], {}), r)
        images.append(cv2.resize(tile, (256, 256), interpolation=cv2.INTER_AREA))
    sheet = _grid(images, columns)
    sheet_path = out_dir / f"contact_sheet_{name}.png"
    cv2.imwrite(str(sheet_path), sheet)
    hist_path = out_dir / f"ctr_histogram_{name}.png"
    _histogram(_selection(engine, model, None, sample) if not group else rows, hist_path, model)
    return ReportFiles(sheet_path, hist_path, len(images), _calibration(engine, model, out_dir))


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
    if not table:
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


def _grid(tiles: list[np.ndarray], columns: int) -> np.ndarray:
    if not tiles:
        return np.zeros((256, 256, 3), np.uint8)
    rows = (len(tiles) + columns - 1) // columns
    cols = min(columns, len(tiles))
    sheet = np.zeros((rows * 256, cols * 256, 3), np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, columns)
        sheet[r * 256:(r + 1) * 256, c * 256:(c + 1) * 256] = t
    return sheet


def _histogram(rows: list[dict], path: Path, model: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    by_group: dict[str, list[float]] = {}
    left_out = 0
    for r in rows:
        if r["ctr"] is None:
            continue
        if r.get("view") in ("AP", "LL", "RL", "LAT", "LATERAL"):
            left_out += 1
            continue
        by_group.setdefault(r.get("group_name") or "no group", []).append(r["ctr"])
    fig, ax = plt.subplots(figsize=(6, 3.6))
    bins = np.linspace(0.2, 0.9, 36)
    for g, values in sorted(by_group.items()):
        ax.hist(values, bins=bins, alpha=0.55, label=f"{g} (n={len(values)})", density=True)
    ax.axvline(0.5, color="k", lw=0.8, ls="--")
    ax.set(xlabel="cardiothoracic ratio", ylabel="density", title=f"CTR by group ({model})" + (
        f", {left_out} AP/lateral films left out" if left_out else ""))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
