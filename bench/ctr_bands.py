"""Does the CTR hold where it matters? CTR error by the true CTR's band, per model.

Takes one or more cross-validation runs (``cxrlabel train --folds K``). Each fold's model
labels its own held-out annotated images three ways (`bench/quality.py`'s rows):

* as they are;
* through the equipment-like shifts of `pipeline.shifts` at two strengths;
* with the heart widened 1.15x and 1.3x (`pipeline.train.enlarge.widen_heart`): synthetic
  enlarged hearts, since the annotated set holds only four hearts above CTR 0.6. A model
  trained with `--widen-heart` has seen such warps, so for it this part is in-distribution:
  read it next to the first two.

For each, by band of the true CTR (from the manual masks): images, CTR bias (measured -
true: the mean, which the goal counts, and the median, which a few images read far off do
not move), CTR MAE, and the median measured / true heart width and thoracic width. Also the
cardiomegaly AUC of the measured CTR against true CTR > 0.5, and mean Dice per structure.
With --picture, writes the widening augmentation on a few annotated images.

Usage: python bench/ctr_bands.py --db sqlite:///data/catalogue.db --cache data/cache \\
           --cv shipped=runs/quality_cv [--cv widened=runs/widen_cv] [--rows-dir DIR] [--picture PNG]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from quality import collect_rows, spearman  # noqa: E402

from pipeline import db as D  # noqa: E402
from pipeline.metrics import auc  # noqa: E402
from pipeline.quality import QualityModel  # noqa: E402

BANDS = ((0.0, 0.45), (0.45, 0.50), (0.50, 0.55), (0.55, 0.60), (0.60, 9.0))
PARTS = {"held-out, as they are": ("none",), "under equipment-like shifts": "shifted",
         "hearts widened 1.15x / 1.3x (synthetic)": ("widened",)}
MIN_BAND = 5  # the goal counts bands with at least this many images


def band_name(lo: float, hi: float) -> str:
    return f"< {hi:.2f}" if lo == 0 else f">= {lo:.2f}" if hi > 1 else f"{lo:.2f}-{hi:.2f}"


def images(rows: list[dict], part) -> list[dict]:
    """One row per labelled image variant of ``part`` (its CTR fields and mean Dice)."""
    out: dict[str, dict] = {}
    for r in rows:
        keep = r["shift"] not in ("none", "widened") if part == "shifted" else r["shift"] in part
        if keep:
            out.setdefault(r["image"], {**r, "dices": {}})["dices"][r["structure"]] = r["dice"]
    return list(out.values())


def band_table(imgs: list[dict]) -> list[dict]:
    """Per true-CTR band: images, bias (mean and median error), MAE, median heart and
    thoracic width ratios."""
    scored = [r for r in imgs if r["ctr_true"] is not None and r["ctr_pred"] is not None]
    out = []
    for lo, hi in BANDS:
        inside = [r for r in scored if lo <= r["ctr_true"] < hi]
        if not inside:
            continue
        err = np.array([r["ctr_pred"] - r["ctr_true"] for r in inside])
        out.append({"band": band_name(lo, hi), "n": len(inside), "bias": float(err.mean()),
                    "median": float(np.median(err)),
                    "mae": float(np.abs(err).mean()),
                    "heart": float(np.median([r["heart_width_ratio"] for r in inside])),
                    "thorax": float(np.median([r["thoracic_width_ratio"] for r in inside]))})
    return out


def summary(imgs: list[dict]) -> dict:
    scored = [r for r in imgs if r["ctr_true"] is not None and r["ctr_pred"] is not None]
    err = np.array([r["ctr_pred"] - r["ctr_true"] for r in scored])
    structures = sorted({s for r in imgs for s in r["dices"]})
    return {"n": len(scored), "bias": float(err.mean()), "mae": float(np.abs(err).mean()),
            "auc": auc([r["ctr_pred"] for r in scored if r["ctr_true"] > 0.5],
                       [r["ctr_pred"] for r in scored if r["ctr_true"] <= 0.5]),
            "dice": {s: float(np.mean([r["dices"][s] for r in imgs if s in r["dices"]])) for s in structures}}


def worst_band(table: list[dict]) -> float:
    """The largest |bias| over the bands holding at least :data:`MIN_BAND` images."""
    return max((abs(b["bias"]) for b in table if b["n"] >= MIN_BAND), default=float("nan"))


def estimated(rows: list[dict], score: QualityModel) -> dict[str, float]:
    """Each image variant's estimated mean Dice by ``score`` (the score of the run's model)."""
    by_image: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_image.setdefault(r["image"], {})[r["structure"]] = {f: r[f] for f in score.features}
    return {image: float(np.mean(list(score.estimate(f).values()))) for image, f in by_image.items()}


def doubt_on_large_hearts(rows: list[dict], score: QualityModel) -> None:
    """Whether the quality score falls where the heart is larger than in training: the
    estimated and true mean Dice of the held-out images as they are and widened."""
    est = estimated(rows, score)
    print("| held-out images | true CTR (median) | estimated Dice (mean) | true Dice (mean) |")
    print("|---|---|---|---|")
    for label, shift, strength in (("as they are", "none", 0.0), ("heart widened 1.15x", "widened", 0.5),
                                   ("heart widened 1.3x", "widened", 1.0)):
        imgs = [r for r in images(rows, (shift,)) if r["strength"] == strength]
        if imgs:
            print(f"| {label} | {np.median([r['ctr_true'] for r in imgs if r['ctr_true']]):.3f} | "
                  f"{np.mean([est[r['image']] for r in imgs]):.4f} | "
                  f"{np.mean([np.mean(list(r['dices'].values())) for r in imgs]):.4f} |")
    print()


FAR_OFF = 0.03  # a CTR error a reviewer should see: more than half the 0.45-0.55 band's width


def doubt_on_ctr_errors(rows: list[dict], score: QualityModel) -> None:
    """Whether the quality score sends the images whose CTR reads far off to review: of
    the held-out images as they are, those off by more than :data:`FAR_OFF`, and how many
    of them the worst 10% and 20% by estimated Dice hold."""
    est = estimated(rows, score)
    imgs = sorted((r for r in images(rows, ("none",)) if r["ctr_true"] is not None and r["ctr_pred"] is not None),
                  key=lambda r: est[r["image"]])
    err = np.array([abs(r["ctr_pred"] - r["ctr_true"]) for r in imgs])
    far = err > FAR_OFF
    held = {share: int(far[:max(1, round(share * len(imgs)))].sum()) for share in (0.1, 0.2)}
    print(f"CTR off by more than {FAR_OFF}: {int(far.sum())} of {len(imgs)} held-out images; the worst 10% by "
          f"estimated Dice hold {held[0.1]}, the worst 20% {held[0.2]}; Spearman(estimated Dice, |CTR error|) "
          f"{spearman([est[r['image']] for r in imgs], err):+.3f}\n")


def report(name: str, rows: list[dict], score: QualityModel | None = None) -> None:
    print(f"\n### {name}\n")
    for part, which in PARTS.items():
        imgs = images(rows, which)
        if not imgs:
            continue
        table, total = band_table(imgs), summary(imgs)
        dices = ", ".join(f"{s} {d:.4f}" for s, d in total["dice"].items())
        print(f"{part}: {total['n']} images, CTR bias {total['bias']:+.4f}, MAE {total['mae']:.4f}, "
              f"cardiomegaly AUC {total['auc']:.3f}; largest |bias| in a band of >= {MIN_BAND}: "
              f"{worst_band(table):.4f}; Dice {dices}\n")
        print("| true CTR | images | CTR bias | median CTR error | CTR MAE | heart width measured / true | "
              "thoracic width measured / true |")
        print("|---|---|---|---|---|---|---|")
        for b in table:
            print(f"| {b['band']} | {b['n']} | {b['bias']:+.4f} | {b['median']:+.4f} | {b['mae']:.4f} | "
                  f"{b['heart']:.3f} | {b['thorax']:.3f} |")
        print()
    if score is not None:
        doubt_on_large_hearts(rows, score)
        doubt_on_ctr_errors(rows, score)


def picture(engine, cache: str | None, path: Path, count: int = 4) -> None:
    """The widening on ``count`` annotated images (the largest hearts left out): each row the
    image as annotated, widened 1.15x and 1.3x, with the warped masks' outlines."""
    import cv2

    from pipeline.measure import measure
    from pipeline.train.config import TrainConfig
    from pipeline.train.data import load_dataset
    from pipeline.train.enlarge import widen_heart

    cfg = TrainConfig.from_preset("cxr_deep")
    ds = load_dataset(engine, cfg, cache)
    s = list(cfg.structures)
    whole = [i for i in range(len(ds.uids)) if ds.valid[i].all()]
    ctrs = {i: measure({n: ds.masks[i, j] > 0.5 for j, n in enumerate(s)})["ctr"] for i in whole}
    picks = sorted(whole, key=lambda i: ctrs[i])[len(whole) // 5::max(1, len(whole) // (count + 1))][:count]
    colours = {"heart": (40, 40, 230), "left_lung": (40, 200, 40), "right_lung": (230, 140, 30)}
    rows = []
    for i in picks:
        tiles = []
        for factor in (1.0, 1.15, 1.3):
            img, masks = widen_heart(ds.images[i], ds.masks[i], s, factor)
            rgb = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
            for j, n in enumerate(s):
                outline, _ = cv2.findContours((masks[j] > 0.5).astype(np.uint8), cv2.RETR_EXTERNAL,
                                              cv2.CHAIN_APPROX_NONE)
                cv2.drawContours(rgb, outline, -1, colours.get(n, (255, 255, 255)), 1)
            ctr = measure({n: masks[j] > 0.5 for j, n in enumerate(s)})["ctr"]
            cv2.putText(rgb, f"x{factor:.2f} CTR {ctr:.2f}", (6, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45,
                        (255, 255, 255), 1, cv2.LINE_AA)
            tiles.append(rgb)
        rows.append(np.hstack(tiles))
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.vstack(rows))
    print(f"picture of the widening written to {path}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", required=True)
    ap.add_argument("--cache")
    ap.add_argument("--cv", action="append", default=[], metavar="NAME=RUN_DIR",
                    help="a cross-validation run to measure, under a name (repeat for candidates)")
    ap.add_argument("--rows-dir", type=Path, help="keep each run's measured rows here as NAME.json and reuse "
                                                   "them (also readable by bench/quality.py --rows)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--checkpoint", choices=("best", "final"), default="best",
                    help="each fold's best epoch on its held-out images, or its last (final.pt)")
    ap.add_argument("--picture", type=Path, help="write the widening augmentation's picture here")
    ap.add_argument("--score", type=Path, default=REPO / "models" / "default" / "model.quality.json",
                    help="the quality score to judge on widened hearts [the shipped model's]")
    args = ap.parse_args(argv)
    engine = D.connect(args.db)
    if args.picture:
        picture(engine, args.cache, args.picture)
    for spec in args.cv:
        name, _, run = spec.partition("=")
        if not run:
            ap.error(f"--cv {spec}: give NAME=RUN_DIR")
        cached = args.rows_dir / f"{name}.json" if args.rows_dir else None
        if cached and cached.exists():
            rows = json.loads(cached.read_text())
        else:
            rows = collect_rows(engine, Path(run), args.cache, args.seed, widened=True,
                                checkpoint=args.checkpoint)
            if cached:
                cached.parent.mkdir(parents=True, exist_ok=True)
                cached.write_text(json.dumps(rows))
        report(f"{name} ({run})", rows, QualityModel.load(args.score) if args.score.exists() else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
