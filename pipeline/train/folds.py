"""Held-out splits stored as uid lists, so that new annotated images never move old ones.

A run folder keeps ``splits.json`` (as nnU-Net keeps ``splits_final.json``)::

    {"folds": 5, "val_frac": 0.2, "seed": 0, "uids": [every image], "val": [[uid, ...], ...]}

``val[k]`` is fold ``k``'s held-out images (one list without K-fold cross-validation; empty
with ``--val-frac 0``). The first split is a seeded permutation of the sorted uids (fold
``k`` takes every K-th image from position ``k``; without folds the first ``val_frac``),
which reproduces the folds of runs made before splits were stored. Afterwards a new image
joins by its uid alone (fold ``sha256(uid) mod K``; held out when its hash falls below
``val_frac``) and an image no longer annotated leaves: existing folds never shift.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.train.config import TrainConfig, TrainError

log = logging.getLogger(__name__)

SPLITS_FILE = "splits.json"


@dataclass
class Splits:
    folds: int
    val_frac: float
    seed: int
    uids: list[str]
    val: list[list[str]]

    def fits(self, cfg: TrainConfig) -> bool:
        return (self.folds, self.seed) == (cfg.folds, cfg.seed) and (
            cfg.folds > 1 or self.val_frac == cfg.val_frac)


def make_splits(uids: list[str], folds: int = 1, val_frac: float = 0.2, seed: int = 0) -> Splits:
    """The first split of ``uids``: ``folds`` folds, or one held-out share ``val_frac``."""
    uids = sorted(uids)
    order = list(range(len(uids)))
    random.Random(seed).shuffle(order)
    if folds > 1:
        val = [sorted(uids[i] for i in order[k::folds]) for k in range(folds)]
    elif val_frac > 0:
        val = [sorted(uids[i] for i in order[: max(1, round(len(uids) * val_frac))])]
    else:
        val = [[]]
    return Splits(folds, val_frac, seed, uids, val)


def update_splits(splits: Splits, uids: list[str]) -> tuple[Splits, list[str], list[str]]:
    """``splits`` over the current ``uids``: ``(splits, joined, left)``."""
    now, before = set(uids), set(splits.uids)
    val = [[u for u in fold if u in now] for fold in splits.val]
    joined = sorted(now - before)
    for u in joined:
        h = int.from_bytes(hashlib.sha256(u.encode()).digest()[:8], "big")
        if splits.folds > 1:
            val[h % splits.folds].append(u)
        elif (h % 10_000) / 10_000 < splits.val_frac:
            val[0].append(u)
    updated = Splits(splits.folds, splits.val_frac, splits.seed, sorted(now), [sorted(f) for f in val])
    return updated, joined, sorted(before - now)


def splits_for(run_dir: Path, uids: list[str], cfg: TrainConfig) -> Splits:
    """The run folder's stored splits brought up to date with ``uids`` (made and stored on
    first use). A folder split another way (folds, seed, val_frac) is refused."""
    path = Path(run_dir) / SPLITS_FILE
    if not path.exists():
        splits = make_splits(uids, cfg.folds, cfg.val_frac, cfg.seed)
    else:
        try:
            splits = Splits(**json.loads(path.read_text()))
        except (ValueError, TypeError) as e:
            raise TrainError(f"{path} is not a splits file ({e}): move it away to split anew") from e
        if not splits.fits(cfg):
            raise TrainError(f"{path} splits the images another way (folds {splits.folds}, seed "
                             f"{splits.seed}, val_frac {splits.val_frac}): use a new run folder")
        splits, joined, left = update_splits(splits, uids)
        if joined or left:
            log.warning("%s: %d new annotated images joined by uid hash, %d left", path, len(joined),
                        len(left))
        if not joined and not left:
            return splits
    write_splits(path, splits)
    return splits


def write_splits(path: Path, splits: Splits) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(asdict(splits), indent=1))
    tmp.replace(path)
