"""Cross-validated Dice of the labelling pipeline, in original image geometry.

Training reports Dice at cache resolution on raw thresholded outputs. This script takes a
`cxrlabel train --folds K` run folder, and for each fold runs that fold's best checkpoint
through the labelling path (`label.postprocess`: largest component, holes filled, mapped
back to original geometry) on the fold's held-out images, as stored in the run's
`splits.json`, scoring against the manual masks.

Usage: python bench/cv_eval.py RUN_DIR --db URL [--cache DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from sqlalchemy import select

from pipeline import db as D
from pipeline.collect import Entry, Settings, fetch
from pipeline.label import Item, postprocess
from pipeline.masks import load_masks
from pipeline.metrics import dice
from pipeline.model import infer, read_checkpoint, resolve_model
from pipeline.train.data import annotated_uids
from pipeline.train.folds import SPLITS_FILE, make_splits, write_splits


def evaluate_fold(engine, ckpt: Path, held_out: list[str], cache: str | None) -> dict[str, list[float]]:
    lm = resolve_model(engine, str(ckpt), "cpu")
    with engine.connect() as c:
        paths = {r.uid: r.path for r in D.rows_in(c, select(D.images.c.uid, D.images.c.path),
                                                  D.images.c.uid, held_out)}
        truth = load_masks(c, held_out)
    entries = [e for e in fetch(engine, [(u, paths.get(u)) for u in held_out],
                                Settings(lm.spec.size, lm.spec.mode), cache) if isinstance(e, Entry)]
    scores: dict[str, list[float]] = {s: [] for s in lm.spec.structures}
    for e in entries:
        probs = infer(lm, [e.image])[0]
        r = postprocess(Item(e.uid, e.image, e.geom), probs, lm.spec.structures)
        for s in lm.spec.structures:
            if s in truth.get(e.uid, {}):
                scores[s].append(dice(r.masks[s].decode(), truth[e.uid][s]))
    return scores


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--db", required=True)
    ap.add_argument("--cache")
    args = ap.parse_args(argv)
    engine = D.connect(args.db)
    folds = sorted(args.run_dir.glob("fold*/best.pt"))
    if not folds:
        sys.exit(f"no fold*/best.pt under {args.run_dir}")
    splits_path = args.run_dir / SPLITS_FILE
    if not splits_path.exists():  # a run from before folds were stored: its folds, rebuilt once
        t = read_checkpoint(folds[0]).training
        write_splits(splits_path, make_splits(annotated_uids(engine), t["folds"], t["val_frac"], t["seed"]))
        print(f"{splits_path}: rebuilt from the run's settings (folds {t['folds']}, seed {t['seed']})")
    val = json.loads(splits_path.read_text())["val"]
    per_fold = []
    for ckpt in folds:
        k = int(ckpt.parent.name.removeprefix("fold"))
        scores = evaluate_fold(engine, ckpt, val[k], args.cache)
        per_fold.append({s: float(np.mean(v)) for s, v in scores.items()})
        print(ckpt.parent.name, {s: round(v, 4) for s, v in per_fold[-1].items()})
    summary = {s: {"mean": float(np.mean([f[s] for f in per_fold])),
                   "sd": float(np.std([f[s] for f in per_fold], ddof=1)),
                   "folds": [f[s] for f in per_fold]} for s in per_fold[0]}
    for s, v in summary.items():
        print(f"{s}: {v['mean']:.4f} ± {v['sd']:.4f} (original geometry, post-processed)")
    (args.run_dir / "cv_original_geometry.json").write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
