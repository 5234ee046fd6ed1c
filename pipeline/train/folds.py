"""Held-out splits stored as uid lists, grouped by patient, so that new annotated images
never move old ones and no patient is on both sides of a split.

A run folder keeps ``splits.json`` (as nnU-Net keeps ``splits_final.json``)::

    {"folds": 5, "val_frac": 0.2, "seed": 0, "uids": [every image], "val": [[uid, ...], ...],
     "grouped_by": "patient"}

``val[k]`` is fold ``k``'s held-out images (one list without K-fold cross-validation; empty
with ``--val-frac 0``). Films of one patient always share a fold: 45 of GeneralBlockchain's
100 films share their patient with another, and folds of single films put a patient's other
film in training, which inflates every held-out figure. The first split shuffles the
patients (seeded) and gives each, largest first, to the fold with the fewest films so far
(without folds: patients in shuffled order until ``val_frac`` of the films is held out).
Afterwards a new image joins its patient's fold where the patient is already there, else
the fold of ``sha256(patient) mod K`` (held out when that hash falls below ``val_frac``);
an image no longer annotated leaves; existing folds never shift. The stored file names uids
only, never a patient identifier.

Splits made before folds were grouped (``grouped_by`` "image") still resume their runs, with
a warning that their held-out figures may be inflated.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Mapping
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
    grouped_by: str = "image"  # splits.json files written before grouping lack the key

    def fits(self, cfg: TrainConfig) -> bool:
        return (self.folds, self.seed) == (cfg.folds, cfg.seed) and (
            cfg.folds > 1 or self.val_frac == cfg.val_frac)


def _hash(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")


def _patient_of(uid: str, groups: Mapping[str, str] | None) -> str:
    """``uid``'s patient; an image without a known patient is a patient of its own."""
    return (groups or {}).get(uid) or f"uid:{uid}"


def _patients(uids: list[str], groups: Mapping[str, str] | None) -> dict[str, list[str]]:
    """``{patient: [uid, ...]}``."""
    out: dict[str, list[str]] = {}
    for u in sorted(uids):
        out.setdefault(_patient_of(u, groups), []).append(u)
    return out


def make_splits(uids: list[str], folds: int = 1, val_frac: float = 0.2, seed: int = 0,
                groups: Mapping[str, str] | None = None) -> Splits:
    """The first split of ``uids``: ``folds`` folds, or one held-out share ``val_frac``;
    ``groups`` maps a uid to its patient (a uid without one is its own patient)."""
    patients = _patients(uids, groups)
    order = sorted(patients)
    random.Random(seed).shuffle(order)
    if folds > 1:
        val: list[list[str]] = [[] for _ in range(folds)]
        for p in sorted(order, key=lambda p: -len(patients[p])):  # stable: shuffled order among equals
            smallest = min(range(folds), key=lambda k: (len(val[k]), k))
            val[smallest] += patients[p]
        val = [sorted(f) for f in val]
    elif val_frac > 0:
        want, held = max(1, round(len(uids) * val_frac)), list[str]()
        for p in order:
            if len(held) >= want:
                break
            held += patients[p]
        val = [sorted(held)]
    else:
        val = [[]]
    return Splits(folds, val_frac, seed, sorted(uids), val, "patient")


def update_splits(splits: Splits, uids: list[str], groups: Mapping[str, str] | None = None,
                  ) -> tuple[Splits, list[str], list[str]]:
    """``splits`` over the current ``uids``: ``(splits, joined, left)``. A joining image goes
    where its patient already is, else by its patient's hash."""
    now, before = set(uids), set(splits.uids)
    val = [[u for u in fold if u in now] for fold in splits.val]
    joined = sorted(now - before)
    fold_of = {u: k for k, fold in enumerate(val) for u in fold}
    patient_fold: dict[str, int | None] = {}
    for u in sorted(now & before):
        patient_fold.setdefault(_patient_of(u, groups), fold_of.get(u))
    for u in joined:
        patient = _patient_of(u, groups)
        if patient in patient_fold:
            k = patient_fold[patient]
        elif splits.folds > 1:
            k = _hash(patient) % splits.folds
        else:
            k = 0 if (_hash(patient) % 10_000) / 10_000 < splits.val_frac else None
        patient_fold[patient] = k
        if k is not None:
            val[k].append(u)
    updated = Splits(splits.folds, splits.val_frac, splits.seed, sorted(now), [sorted(f) for f in val],
                     splits.grouped_by)
    return updated, joined, sorted(before - now)


def splits_for(run_dir: Path, uids: list[str], cfg: TrainConfig, groups: Mapping[str, str] | None = None,
               ) -> Splits:
    """The run folder's stored splits brought up to date with ``uids`` (made and stored on
    first use, grouped by ``groups``' patients). A folder split another way (folds, seed,
    val_frac) is refused."""
    path = Path(run_dir) / SPLITS_FILE
    if not path.exists():
        splits = make_splits(uids, cfg.folds, cfg.val_frac, cfg.seed, groups)
    else:
        try:
            splits = Splits(**json.loads(path.read_text()))
        except (ValueError, TypeError) as e:
            raise TrainError(f"{path} is not a splits file ({e}): move it away to split anew") from e
        if not splits.fits(cfg):
            raise TrainError(f"{path} splits the images another way (folds {splits.folds}, seed "
                             f"{splits.seed}, val_frac {splits.val_frac}): use a new run folder")
        if splits.grouped_by != "patient":
            log.warning("%s folds single films, not patients (made before folds were grouped): a patient's "
                        "other films may be in training, so held-out figures can be inflated; a new run "
                        "folder folds by patient", path)
        splits, joined, left = update_splits(splits, uids, groups)
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
