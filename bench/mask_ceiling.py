"""What the manual masks allow: the Dice lost to the cache resolution alone, and how much of
each lung the heart mask covers.

For every manual mask: area-average it into the cache geometry at each ``--size`` (the soft
target a perfect network would output), map it back to the original geometry the way
labelling does, threshold at 0.5 and score it against the mask itself. A ceiling near 1
means the cache side is not what limits the CV Dice. The overlap column is the share of each
lung's area inside the heart (cardiomediastinum) mask: the annotators drew the lungs on
behind the heart, where the lung's outline is barely visible.

Usage: python bench/mask_ceiling.py --db URL [--size 256 288 ...]
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from pipeline import db as D
from pipeline.imaging import Geometry
from pipeline.masks import load_masks
from pipeline.metrics import dice


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", required=True)
    ap.add_argument("--size", type=int, nargs="+", default=[256])
    args = ap.parse_args(argv)
    engine = D.connect(args.db)
    i = D.images.c
    with engine.connect() as c:
        dims = {u: (h, w) for u, h, w in c.execute(
            D.images.select().with_only_columns(i.uid, i.height, i.width))}
        truth = load_masks(c, list(dims))
    if not truth:
        sys.exit(f"no manual masks in {args.db}: import them with `cxrlabel masks import`")
    for lung in ("left_lung", "right_lung"):
        share = [(m["heart"] & m[lung]).sum() / m[lung].sum()
                 for m in truth.values() if "heart" in m and m.get(lung) is not None and m[lung].any()]
        print(f"{lung}: share inside the heart mask, median {np.median(share):.3f} "
              f"(quartiles {np.percentile(share, 25):.3f}-{np.percentile(share, 75):.3f}, n={len(share)})")
    for size in args.size:
        scores: dict[str, list[float]] = {}
        for uid, masks in truth.items():
            geom = Geometry.fit(*dims[uid], size, "pad")
            for s, m in masks.items():
                back = geom.to_original(geom.to_cache(m.astype(np.float32))) > 0.5
                scores.setdefault(s, []).append(dice(back, m))
        print(f"size {size}: Dice ceiling " + ", ".join(
            f"{s} {np.mean(v):.4f} (min {np.min(v):.4f})" for s, v in sorted(scores.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
