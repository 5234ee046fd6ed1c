"""Does the quality score tell a reviewer which masks to look at? The shift bench.

`cxrlabel quality fit --cv RUN_DIR --shifts` fits the product's score (`pipeline.quality.fit`);
this bench reads the same held-out films (each fold's model labels its own held-out annotated
films, as they are and put through every equipment-like shift of `pipeline.shifts` at two
strengths) and adds what a developer compares: the score without the atlas's fit and with
test-time augmentation's agreement, the score judged on the unshifted films alone and per
mask, the older heuristic, a shipped score judged as it is (`--judge`), and the mean Dice per
shift against no shift (the models' robustness). With --out, the score fitted on every fold
is written there (a model's ``<checkpoint>.quality.json``).

Usage: python bench/quality.py --db sqlite:///data/catalogue.db --cv runs/cv [--cache data/cache]
       [--checkpoint final] [--out models/default/model.quality.json] [--tta --out-tta ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline import db as D  # noqa: E402
from pipeline.quality import FEATURES, SHAPE, QualityModel  # noqa: E402
from pipeline.quality.films import STRENGTHS, Films, from_folds, label, variants  # noqa: E402
from pipeline.quality.fit import (  # noqa: E402, F401  (spearman: bench/ctr_bands.py reads it here)
    estimate_into,
    fit_films,
    held_out_estimates,
    judge,
    spearman,
)
from pipeline.shifts import SHIFTS  # noqa: E402


def collect_rows(engine, run_dir: Path, cache: str | None, seed: int, tta: bool = False,
                 widened: bool = False, checkpoint: str = "best") -> list[dict]:
    """One row per (fold, held-out film, variant, structure), every shift at both strengths:
    :func:`pipeline.quality.films.from_folds`."""
    return label(from_folds(engine, run_dir, cache, checkpoint, True), variants(True, widened), tta, seed).rows


def fixed_estimates(rows: list[dict], score: QualityModel) -> list[float]:
    """Each mask's estimate by an already fitted score (``--judge``: a shipped score read on
    another run's models)."""
    estimate: list = [None] * len(rows)
    estimate_into(estimate, score, rows, range(len(rows)), score.features)
    return estimate


def line(name: str, rows: list[dict], estimate) -> str:
    j = judge(rows, estimate)
    return (f"| {name} | {j.films} | {j.spearman:.3f} | {j.mae:.4f} | {j.worst_share:.2f} | {j.auroc:.3f} "
            f"({j.ctr_films} films) |")


def shift_table(rows: list[dict]) -> None:
    """Mean Dice per shift and strength, and its change against the images as they are."""
    print("| shift | strength | mean Dice | vs none |")
    print("|---|---|---|---|")
    scored = [r for r in rows if r["dice"] is not None]
    base = np.mean([r["dice"] for r in scored if r["shift"] == "none"])
    for name in ["none", *SHIFTS]:
        for s in ([0.0] if name == "none" else STRENGTHS):
            d = [r["dice"] for r in scored if r["shift"] == name and r["strength"] == s]
            if d:
                print(f"| {name} | {s:g} | {np.mean(d):.4f} | {np.mean(d) - base:+.4f} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", required=True)
    ap.add_argument("--cv", type=Path, required=True, help="cross-validation run folder")
    ap.add_argument("--cache")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--alpha", type=float, default=1.0, help="ridge penalty")
    ap.add_argument("--checkpoint", choices=("best", "final"), default="final",
                    help="each fold's last epoch (final.pt, as long as the shipped model trained), or its best")
    ap.add_argument("--out", type=Path, help="write the score fitted on every fold here")
    ap.add_argument("--tta", action="store_true",
                    help="also measure test-time augmentation's agreement as a signal (3x the labelling)")
    ap.add_argument("--out-tta", type=Path, help="with --tta: write the score that reads it here")
    ap.add_argument("--judge", type=Path, action="append", default=[], metavar="SCORE",
                    help="also judge this fitted score as it is, without refitting (repeatable)")
    ap.add_argument("--rows", type=Path, help="keep the measured masks' rows in this JSON file and reuse "
                                               "them when it exists (refit without labelling again)")
    args = ap.parse_args(argv)
    started = time.time()
    engine = D.connect(args.db)
    if args.rows and args.rows.exists() and not (args.out or args.out_tta):
        films = Films(json.loads(args.rows.read_text()), 0, str(args.cv), None, None)
    else:
        films = label(from_folds(engine, args.cv, args.cache, args.checkpoint, True), variants(True), args.tta,
                      args.seed)
        if args.rows:
            args.rows.write_text(json.dumps(films.rows))
    rows = [r for r in films.rows if r["shift"] != "widened"]
    structures = sorted({r["structure"] for r in rows})
    names = FEATURES + ((SHAPE,) if all(SHAPE in r for r in rows) else ())
    print(f"{len(rows)} masks, {len({r['image'] for r in rows})} film variants ({len({r['fold'] for r in rows})} "
          f"folds, {len(SHIFTS)} shifts x {len(STRENGTHS)} strengths + none), {time.time() - started:.0f} s")
    print("| score | films | Spearman with true mean Dice | MAE | worst 10% hold, of films < 0.9 | "
          "AUROC, worst tenth by CTR error |")
    print("|---|---|---|---|---|---|")
    estimate = held_out_estimates(rows, structures, args.alpha, names)
    print(line("estimated Dice (leave-fold-out)", rows, estimate))
    if SHAPE in names:
        print(line("... without the atlas's fit", rows, held_out_estimates(rows, structures, args.alpha, FEATURES)))
    if all("tta" in r for r in rows):
        print(line("... with test-time augmentation's agreement (3x the labelling)", rows,
                   held_out_estimates(rows, structures, args.alpha, names + ("tta",))))
    print(line("heuristic (before)", rows, [r["heuristic"] for r in rows]))
    unshifted = [n for n, r in enumerate(rows) if r["shift"] == "none"]
    print(line("estimated Dice, unshifted films only", [rows[n] for n in unshifted], [estimate[n] for n in unshifted]))
    for path in args.judge:
        print(line(f"{path} as it is", rows, fixed_estimates(rows, QualityModel.load(path))))
    shift_table(rows)
    if args.out or args.out_tta:
        score, _, tta_score, _ = fit_films(films, structures, args.alpha, bool(args.out_tta))
        for path, s in ((args.out, score), (args.out_tta, tta_score)):
            if path and s is not None:
                s.save(path)
                print(f"score fitted on every fold written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
