"""Does the quality score tell a reviewer which masks to look at? Fits and validates it.

Takes a cross-validation run (``cxrlabel train --folds K``: RUN_DIR/foldK/best.pt and
RUN_DIR/splits.json; with ``--checkpoint final`` each fold's last epoch, RUN_DIR/foldK/final.pt,
for a score meant for a model trained on every image to its last epoch: the score's features
read the model's confidence, which grows with training, so it must be fitted on models trained
as long as the one it will score). Each fold's model labels its own held-out annotated images, as they are
and put through every equipment-like shift of `pipeline.shifts` at two strengths (contrast
and gamma curves, noise, blur, resolution loss, JPEG, crops, rotations, aspect, a collimator's
rim, an inverted MONOCHROME1), through the labelling path (`label.postprocess`, at cache
geometry). For every mask it records the score's features and the true Dice against the
annotation (shifted with the image where the shift moves it), and its fit to an atlas of the
fold's training masks (`pipeline.quality.Atlas`: the held-out images are never in it).

The score (`pipeline.quality.QualityModel`) is fitted leaving one fold out at a time and
judged on that fold: Spearman of the estimated against the true mean Dice per image (goal
>= 0.7), mean absolute error of the estimate, and the share of masks with true Dice below 0.9
that fall in the worst 10% by estimate (goal >= 0.5); the older heuristic score is judged the
same way for comparison. Also printed: mean Dice per shift against no shift (the models'
robustness). With --out, the score fitted on every fold is written there (a model's
``<checkpoint>.quality.json``), with its held-out calibration table and the atlas of every
annotated image (what the model the run's recipe trains on all of them was trained on).

Usage: python bench/quality.py --db sqlite:///data/catalogue.db --cv runs/cv [--cache data/cache]
       [--checkpoint final] [--out models/default/model.quality.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline import db as D  # noqa: E402
from pipeline.imaging import Geometry  # noqa: E402
from pipeline.label import Item, postprocess, reframe  # noqa: E402
from pipeline.measure import bbox, measure  # noqa: E402
from pipeline.metrics import dice  # noqa: E402
from pipeline.model import infer, read_checkpoint, resolve_model  # noqa: E402
from pipeline.quality import FEATURES, SHAPE, Atlas, QualityModel, recipe_of, tta_agreement, tta_copies  # noqa: E402
from pipeline.shifts import SHIFTS, apply  # noqa: E402
from pipeline.train.config import TrainConfig  # noqa: E402
from pipeline.train.data import load_dataset  # noqa: E402
from pipeline.train.enlarge import widen_heart  # noqa: E402
from pipeline.train.folds import SPLITS_FILE  # noqa: E402

STRENGTHS = (0.5, 1.0)


def rank(x: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (for Spearman's rho)."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.cumsum(counts) - counts + (counts - 1) / 2)[inverse]


def spearman(a, b) -> float:
    a, b = rank(np.asarray(a, float)), rank(np.asarray(b, float))
    return float(np.corrcoef(a, b)[0, 1])


def _still_training(fold: Path) -> bool:
    """A fold whose resume point has not reached its last epoch (its best.pt is provisional)."""
    if not (fold / "last.pt").exists():
        return False
    last = torch.load(fold / "last.pt", map_location="cpu", weights_only=True)
    return last["state"]["epoch"] < last["config"]["epochs"]


def tta_features(lm, images: list[np.ndarray], bases: list, structures: list[str]) -> list[dict[str, float]]:
    """Per image, per structure: `pipeline.quality.tta_agreement` of its masks with those of
    its two test-time-augmented copies (as `label --tta` computes it)."""
    probs = infer(lm, [c for img in images for c in tta_copies(img)])
    return [tta_agreement({s: b.masks[s].decode() for s in structures}, [probs[2 * n], probs[2 * n + 1]], structures)
            for n, b in enumerate(bases)]


WIDEN = {0.5: 1.15, 1.0: 1.3}  # strength: heart widening factor of the "widened" variant


def variants(widened: bool = False) -> list[tuple[str, float]]:
    """``(shift, strength)`` of every variant of a held-out image: as it is, each shift at
    each strength (the inversion only at full strength), and with ``widened`` also its heart
    widened as `pipeline.train.enlarge` does (a synthetic enlarged heart)."""
    out = [("none", 0.0)] + [(name, s) for name in SHIFTS for s in (STRENGTHS if name != "inverted" else (1.0,))]
    return out + ([("widened", s) for s in WIDEN] if widened else [])


def make_variant(name: str, strength: float, image: np.ndarray, masks: np.ndarray, structures: list[str],
                 rng: np.random.Generator, film: tuple[float, float, float, float] | None = None,
                 ) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float, float]]:
    """The image and its true masks put through one variant of :func:`variants`, and where
    the film then lies in the image (``film``: where it lay before, as
    :meth:`pipeline.imaging.Geometry.film_box` gives it; None: the whole image). A shift
    that moves the anatomy (a crop, a rotation, another aspect) moves the film's edges with
    it, so labelling judges a film cut short (:func:`pipeline.label.reframe`) as it would
    judge the real one."""
    side = image.shape[-1]
    film = film or (0.0, 0.0, side - 1.0, side - 1.0)
    if name == "none":
        return image, masks, film
    if name == "widened":  # the thorax's borders stay put, and with them the film's
        return (*widen_heart(image, masks, structures, WIDEN[strength]), film)
    where = np.zeros((1, side, side), masks.dtype)
    x0, y0, x1, y1 = (int(round(v)) for v in film)
    where[0, y0:y1 + 1, x0:x1 + 1] = 1
    shifted, moved = apply(name, image, np.concatenate([masks, where]), strength, rng)
    box = bbox(moved[-1] > 0.5)
    return shifted, moved[:-1], tuple(map(float, box)) if box else film


def ctr_fields(pred: dict[str, np.ndarray], truth: dict[str, np.ndarray]) -> dict[str, float | None]:
    """The true and measured CTR of an image, and the measured heart and thoracic widths as
    shares of the true ones (None where either side lacks a structure)."""
    t, p = measure(truth), measure(pred)
    def ratio(key: str) -> float | None:
        return p[key] / t[key] if p[key] and t[key] else None
    return {"ctr_true": t["ctr"], "ctr_pred": p["ctr"], "heart_width_ratio": ratio("heart_width_px"),
            "thoracic_width_ratio": ratio("thoracic_width_px")}


def run_dataset(engine, run_dir: Path, cache: str | None):
    """The cross-validation run's training configuration and annotated dataset."""
    first = read_checkpoint(run_dir / "fold0" / "best.pt")
    cfg = TrainConfig.from_dict(first.training)
    return cfg, load_dataset(engine, cfg, cache)


def atlas_of(ds, structures: list[str], leave_out=()) -> Atlas:
    """The atlas of the dataset's images whose every structure is drawn, but ``leave_out``."""
    skip = set(leave_out)
    return Atlas.build(ds.masks[[i for i in range(len(ds.uids)) if ds.valid[i].all() and i not in skip]],
                       structures)


def collect_rows(engine, run_dir: Path, cache: str | None, seed: int, tta: bool = False,
                 widened: bool = False, dataset=None, checkpoint: str = "best") -> list[dict]:
    """One row per (fold, held-out image, variant, structure): features (the atlas's fit read
    against the fold's training masks), true Dice, heuristic, and the image's true and
    measured CTR (:func:`ctr_fields`). ``dataset``: :func:`run_dataset`'s, when loaded already.
    ``checkpoint``: each fold's ``best`` epoch on its held-out images, or its ``final`` one."""
    splits = json.loads((run_dir / SPLITS_FILE).read_text())
    cfg, ds = dataset or run_dataset(engine, run_dir, cache)
    structures = list(cfg.structures)
    size = cfg.size
    geom = Geometry.fit(size, size, size, "pad")  # masks come back at cache geometry
    rng = np.random.default_rng(seed)
    kinds = variants(widened)
    rows = []
    for k, held in enumerate(splits["val"]):
        fold = run_dir / f"fold{k}"
        if not (fold / f"{checkpoint}.pt").exists() or _still_training(fold):
            print(f"fold {k}: not trained to the end yet: left out", flush=True)
            continue
        lm = resolve_model(None, str(fold / f"{checkpoint}.pt"), "cpu")
        atlas = atlas_of(ds, structures, leave_out=ds.indices(held))
        for i in ds.indices(held):
            film = ds.geoms[i].film_box() if ds.geoms else None
            made = [make_variant(name, s, ds.images[i], ds.masks[i], structures, rng, film) for name, s in kinds]
            shifted = [(img, truth) for img, truth, _ in made]
            images = [img for img, _ in shifted]
            probs = reframe(lm, images, [box for _, _, box in made], infer(lm, images))  # as `label` does
            results = [postprocess(Item(ds.uids[i], img, geom), p, structures)
                       for (img, _), p in zip(shifted, probs, strict=True)]
            agreement = (tta_features(lm, images, results, structures) if tta else [{}] * len(results))
            for (name, strength), (_, truth), r, extra in zip(kinds, shifted, results, agreement, strict=True):
                pred = {s: r.masks[s].decode() for s in structures}  # cache geometry: the cleaned masks
                shape = atlas.fit(pred)
                annotated = {s: truth[j] > 0.5 for j, s in enumerate(structures) if ds.valid[i, j]}
                ctr = ctr_fields({s: pred[s] for s in annotated}, annotated)
                for j, s in enumerate(structures):
                    if not ds.valid[i, j]:
                        continue
                    rows.append({"fold": k, "uid": ds.uids[i], "shift": name, "strength": strength,
                                 "image": f"{k}/{ds.uids[i]}/{name}/{strength}",
                                 "structure": s, "dice": dice(pred[s], annotated[s]),
                                 "heuristic": r.measurements["quality"], **r.features[s], SHAPE: shape[s], **ctr,
                                 **({"tta": extra[s]} if extra else {})})
        print(f"fold {k}: {len(held)} held-out images, {len(rows)} masks so far", flush=True)
    return rows


def per_image(rows: list[dict], estimate: list[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean true Dice, mean estimate and heuristic score per (fold, image, variant)."""
    groups: dict[tuple, list[int]] = {}
    for n, r in enumerate(rows):
        groups.setdefault((r["fold"], r["uid"], r["shift"], r["strength"]), []).append(n)
    true = np.array([np.mean([rows[n]["dice"] for n in g]) for g in groups.values()])
    est = np.array([np.mean([estimate[n] for n in g]) for g in groups.values()])
    heur = np.array([rows[g[0]]["heuristic"] for g in groups.values()])
    return true, est, heur


def worst_share(score: np.ndarray, true: np.ndarray, bad: float = 0.9, worst: float = 0.1) -> float:
    """Share of the items with true Dice below ``bad`` that the lowest ``worst`` of ``score`` holds."""
    flagged = np.argsort(score, kind="stable")[:max(1, int(round(worst * len(score))))]
    n_bad = int(np.sum(true < bad))
    return float(np.sum(true[flagged] < bad) / n_bad) if n_bad else float("nan")


def held_out_estimates(rows: list[dict], folds: list[int], structures: list[str], alpha: float,
                       names: tuple[str, ...] = FEATURES) -> list[float]:
    """Each mask's estimate by a score fitted on the other folds."""
    dice_true = [r["dice"] for r in rows]
    estimate = [0.0] * len(rows)
    for k in folds:  # leave one fold out: the score never sees the images it is judged on
        train_idx = [n for n, r in enumerate(rows) if r["fold"] != k]
        model = QualityModel.fit([rows[n] for n in train_idx], [dice_true[n] for n in train_idx], structures,
                                 alpha, names=names)
        _estimate_into(estimate, model, rows, [n for n, r in enumerate(rows) if r["fold"] == k], names)
    return estimate


def fixed_estimates(rows: list[dict], score: QualityModel) -> list[float]:
    """Each mask's estimate by an already fitted score (``--judge``: a shipped score read on
    another run's models)."""
    estimate = [0.0] * len(rows)
    _estimate_into(estimate, score, rows, range(len(rows)), score.features)
    return estimate


def _estimate_into(estimate: list[float], score: QualityModel, rows: list[dict], which, names) -> None:
    """``score``'s estimate of the masks ``which`` (indices into ``rows``), each image's
    structures read together as labelling reads them, written into ``estimate``."""
    images: dict[str, dict[str, int]] = {}
    for n in which:
        images.setdefault(rows[n]["image"], {})[rows[n]["structure"]] = n
    for members in images.values():
        got = score.estimate({s: {f: rows[n][f] for f in names} for s, n in members.items()})
        for s, n in members.items():
            estimate[n] = got[s]


def recipe(run_dir: Path) -> str:
    """How the cross-validation run was trained and what it scored, from its summary (the
    options that differ from the preset's), for the fitted score's ``info``; the folder's
    name when the run has no summary yet."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return run_dir.name
    cfg = summary["config"]
    base = json.loads(json.dumps(TrainConfig.from_preset(cfg["preset"]).as_dict()))  # tuples as lists
    flags = {"widen": "widen-heart"}
    options = []
    for k, v in cfg.items():
        if k in ("fold", "folds", "epochs", "threads", "seed") or v == base.get(k):
            continue
        flag = "--" + flags.get(k, k.replace("_", "-"))
        options.append(flag if v is True else f"--no-{flag[2:]}" if v is False else
                       f"{flag} {','.join(map(str, v))}" if isinstance(v, list) else f"{flag} {v}")
    dice = ", ".join(f"{s.replace('_', ' ')} {d['mean']:.3f}" for s, d in summary["dice"].items())
    return (f"cxrlabel train --model {cfg['preset']} --epochs {cfg['epochs']} --folds {cfg['folds']}"
            f"{''.join(' ' + o for o in options)}; CV Dice {dice}")


def fold_models(run_dir: Path, checkpoint: str) -> dict:
    """Which of each fold's checkpoints the score was fitted on and how they were trained
    (length and augmentation, :data:`pipeline.model.SCORE_RECIPE`): what `pipeline.model`
    checks a model against before trusting the score's calibration."""
    first = read_checkpoint(run_dir / "fold0" / f"{checkpoint}.pt")
    return {"checkpoint": checkpoint, "epochs": first.training.get("epochs"), "epoch": first.info.get("epoch"),
            "training": recipe_of(first.training)}


def save_score(path: Path, rows, dice_true, structures, args, est, true, names, atlas: Atlas) -> None:
    """The score fitted on every fold, with its held-out figures and calibration table."""
    bins = np.quantile(est, np.linspace(0, 1, 11))
    which = np.clip(np.searchsorted(bins, est, "right") - 1, 0, 9)
    calibration = [[float(est[which == b].mean()), float(true[which == b].mean()), int(np.sum(which == b))]
                   for b in range(10) if np.any(which == b)]
    final = QualityModel.fit(rows, dice_true, structures, args.alpha, names=names, info={
        "fitted": datetime.date.today().isoformat(), "cv_run": recipe(args.cv), "masks": len(rows),
        "fold_models": fold_models(args.cv, args.checkpoint),
        "images": len(true), "shifts": list(SHIFTS), "strengths": list(STRENGTHS), "features": list(names),
        "held_out": {"spearman": round(spearman(est, true), 4), "mae": round(float(np.mean(np.abs(est - true))), 4),
                     "worst_10pct_share_below_0_9": round(worst_share(est, true), 4)},
        "calibration": calibration}, atlas=atlas)
    final.save(path)
    print(f"score fitted on all folds written to {path}")


def shift_table(rows: list[dict]) -> None:
    """Mean Dice per shift and strength, and its change against the images as they are."""
    print("| shift | strength | mean Dice | vs none |")
    print("|---|---|---|---|")
    base = np.mean([r["dice"] for r in rows if r["shift"] == "none"])
    for name in ["none", *SHIFTS]:
        for s in ([0.0] if name == "none" else STRENGTHS):
            if not any(r["shift"] == name and r["strength"] == s for r in rows):
                continue
            d = np.mean([r["dice"] for r in rows if r["shift"] == name and r["strength"] == s])
            print(f"| {name} | {s:g} | {d:.4f} | {d - base:+.4f} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", required=True)
    ap.add_argument("--cv", type=Path, required=True, help="cross-validation run folder")
    ap.add_argument("--cache")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--alpha", type=float, default=1.0, help="ridge penalty")
    ap.add_argument("--checkpoint", choices=("best", "final"), default="best",
                    help="each fold's best epoch on its held-out images, or its last (final.pt): use "
                         "final for a score meant for a model trained on every image to the end")
    ap.add_argument("--out", type=Path, help="write the score fitted on every fold here")
    ap.add_argument("--tta", action="store_true",
                    help="also measure test-time augmentation's agreement as a signal (3x the labelling)")
    ap.add_argument("--out-tta", type=Path, help="with --tta: write the score that reads it here "
                                                  "(a model's <checkpoint>.quality-tta.json, for label --tta)")
    ap.add_argument("--judge", type=Path, action="append", default=[], metavar="SCORE",
                    help="also judge this fitted score (a <checkpoint>.quality.json) on the run's masks as "
                         "it is, without refitting (repeatable)")
    ap.add_argument("--rows", type=Path, help="keep the measured masks' rows in this JSON file and reuse "
                                               "them when it exists (refit without labelling again)")
    args = ap.parse_args(argv)
    started = time.time()
    reuse = args.rows and args.rows.exists()
    # the annotated set, loaded once: for labelling the rows and for the written score's atlas
    data = run_dataset(D.connect(args.db), args.cv, args.cache) if not reuse or args.out or args.out_tta else None
    if reuse:
        rows = json.loads(args.rows.read_text())
    else:
        rows = collect_rows(D.connect(args.db), args.cv, args.cache, args.seed, args.tta, dataset=data,
                            checkpoint=args.checkpoint)
        if args.rows:
            args.rows.write_text(json.dumps(rows))
    rows = [r for r in rows if r["shift"] != "widened"]  # bench/ctr_bands.py's synthetic hearts: not here
    structures = sorted({r["structure"] for r in rows})
    folds = sorted({r["fold"] for r in rows})
    dice_true = [r["dice"] for r in rows]
    names = FEATURES + ((SHAPE,) if SHAPE in rows[0] else ())  # rows kept before the atlas lack it
    if len(folds) < 2:  # the score is judged leaving a fold out: the models' robustness alone
        print(f"only fold {folds[0]} is trained to the end: the score is fitted leaving a fold out, so it needs "
              "two folds or more; the shift table alone follows")
        shift_table(rows)
        return 2 if args.out or args.out_tta else 0
    if SHAPE in rows[0]:  # what the atlas adds
        w_true, w_est = per_image(rows, held_out_estimates(rows, folds, structures, args.alpha))[:2]
        print(f"without the atlas's fit: Spearman {spearman(w_est, w_true):.3f}, "
              f"MAE {np.mean(np.abs(w_est - w_true)):.4f}, worst 10% hold {worst_share(w_est, w_true):.2f}")
    estimate = held_out_estimates(rows, folds, structures, args.alpha, names)
    if "tta" in rows[0]:  # does test-time augmentation add to the one-pass features?
        tta_true, tta_est = per_image(rows, held_out_estimates(rows, folds, structures, args.alpha,
                                                               names + ("tta",)))[:2]
        print(f"with test-time augmentation's agreement added (3x the labelling): Spearman "
              f"{spearman(tta_est, tta_true):.3f}, MAE {np.mean(np.abs(tta_est - tta_true)):.4f}, "
              f"worst 10% hold {worst_share(tta_est, tta_true):.2f}")
    true, est, heur = per_image(rows, estimate)
    clean_only = np.array([r["shift"] == "none" for r in rows])
    print(f"{len(rows)} masks of {len(true)} image variants ({len(folds)} folds, {len(SHIFTS)} shifts x "
          f"{len(STRENGTHS)} strengths + none), {time.time() - started:.0f} s")
    print("| score | Spearman with true mean Dice | MAE of the estimate | worst 10% hold, of images < 0.9 |")
    print("|---|---|---|---|")
    print(f"| estimated Dice (leave-fold-out) | {spearman(est, true):.3f} | {np.mean(np.abs(est - true)):.4f} | "
          f"{worst_share(est, true):.2f} ({int(np.sum(true < 0.9))} images < 0.9) |")
    print(f"| heuristic (before) | {spearman(heur, true):.3f} | {np.mean(np.abs(heur - true)):.4f} | "
          f"{worst_share(heur, true):.2f} |")
    for path in args.judge:
        fixed = fixed_estimates(rows, QualityModel.load(path))
        j_true, j_est = per_image(rows, fixed)[:2]
        clean_true, clean_est = per_image([r for r, c in zip(rows, clean_only, strict=True) if c],
                                          [e for e, c in zip(fixed, clean_only, strict=True) if c])[:2]
        print(f"| {path} as it is | {spearman(j_est, j_true):.3f} | {np.mean(np.abs(j_est - j_true)):.4f} "
              f"(bias {np.mean(j_est - j_true):+.4f}; unshifted {np.mean(clean_est - clean_true):+.4f}) | "
              f"{worst_share(j_est, j_true):.2f} |")
    m_true, m_est = np.array(dice_true), np.array(estimate)
    print(f"per mask: Spearman {spearman(m_est, m_true):.3f}, MAE {np.mean(np.abs(m_est - m_true)):.4f}, worst 10% "
          f"hold {worst_share(m_est, m_true):.2f} of the {int(np.sum(m_true < 0.9))} masks below 0.9")
    unshifted = per_image([r for r, c in zip(rows, clean_only, strict=True) if c],
                          [e for e, c in zip(estimate, clean_only, strict=True) if c])
    print(f"unshifted images only: Spearman {spearman(unshifted[1], unshifted[0]):.3f}, "
          f"MAE {np.mean(np.abs(unshifted[1] - unshifted[0])):.4f}")
    shift_table(rows)
    if args.out or args.out_tta:
        cfg, ds = data
        atlas = atlas_of(ds, list(cfg.structures))
    if args.out:
        save_score(args.out, rows, dice_true, structures, args, est, true, names, atlas)
    if args.out_tta and "tta" in rows[0]:
        save_score(args.out_tta, rows, dice_true, structures, args, tta_est, tta_true, names + ("tta",), atlas)
    return 0


if __name__ == "__main__":
    sys.exit(main())
