"""Cross-validated Dice of the labelling pipeline, in original image geometry.

Training reports Dice at cache resolution on raw thresholded outputs. This script takes a
`cxrlabel train --folds K` run folder, and for each fold runs that fold's best checkpoint
through the labelling path (`label.postprocess`: largest component, holes filled, mapped
back to original geometry) on the fold's held-out images, scoring against the manual masks.

Usage: python bench/cv_eval.py RUN_DIR --db URL [--cache DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from pipeline import db as D
from pipeline.collect import Settings, collect, load_cached
from pipeline.imaging import model_input
from pipeline.label import Item, postprocess
from pipeline.masks import decode, load_masks
from pipeline.train import annotated_uids, hard_dice, load_checkpoint, predict, split


def evaluate_fold(engine, ckpt: Path, cache: str | None) -> dict[str, list[float]]:
    model, cfg, _ = load_checkpoint(ckpt)
    uids = annotated_uids(engine)
    _, val = split(len(uids), cfg)
    val_uids = [uids[i] for i in val]
    settings = Settings(cfg.size, cfg.mode)
    with engine.connect() as c:
        paths = dict(c.execute(D.images.select().with_only_columns(D.images.c.uid, D.images.c.path)
                               .where(D.images.c.uid.in_(val_uids))).all())
    collect(engine, [(u, paths[u]) for u in val_uids], settings, cache, progress=False)
    with engine.connect() as c:
        cached = load_cached(c, settings, val_uids)
        truth = load_masks(c, val_uids)
    scores: dict[str, list[float]] = {s: [] for s in cfg.structures}
    for uid in val_uids:
        img, geom = cached[uid]
        probs = predict(model, torch.from_numpy(model_input(img, cfg.norm)[None]), cfg.roi)[0].numpy()
        r = postprocess(Item(uid, img, geom), probs, cfg.structures)
        for s in cfg.structures:
            if s in truth.get(uid, {}):
                scores[s].append(hard_dice(decode(r.masks[s].data), truth[uid][s]))
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
    per_fold = []
    for ckpt in folds:
        scores = evaluate_fold(engine, ckpt, args.cache)
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
