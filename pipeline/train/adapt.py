"""Adapting a trained model to a clinic's own films: ``cxrlabel train --from MODEL``.

The parent's network, input and recipe are kept; its weights are the start. What keeps it from
forgetting what it knew, with a clinic's few dozen films:

- few steps (:data:`ADAPT_STEPS`, whatever the number of films) at a tenth of the parent's
  learning rate, with the parent's augmentation and weight average;
- every step pulls the weights back toward the parent's (L2-SP, decoupled as AdamW's decay
  is: :attr:`TrainConfig.pull`) instead of decaying them toward zero;
- a structure a clinic's film does not draw (a clinic rarely outlines a cardiomediastinum, or
  may outline only the heart) is taught by the parent's own prediction on that film, so no
  output drifts for want of a teacher, and the clinic needs no other source's films.

The adapted model records its parent (name and sha256) and the films it adapted on; its trained
films are the parent's and those, so ``evaluate`` and ``quality fit`` leave them all out.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sqlalchemy.engine import Engine

from pipeline.imaging import model_input
from pipeline.model import load_model, pick_device, predict, register_model
from pipeline.model.registry import verified
from pipeline.train.config import TrainConfig, TrainError
from pipeline.train.data import Dataset, load_dataset
from pipeline.train.folds import splits_for
from pipeline.train.loop import Start, TrainResult, train

log = logging.getLogger(__name__)

ADAPT_STEPS = 200  # optimiser steps of an adaptation, whatever the number of films (bench/adapt.py)
LR_SHARE = 0.1  # of the parent's peak learning rate
PULL = 10.0  # TrainConfig.pull of an adaptation (bench/adapt.py)
ADAPT_MASKS = ("manual", "reviewed")  # a clinic's own outlines and its corrections of the parent's
# what an adaptation may change of its parent: how it trains, never what the network is or reads
SETTINGS = frozenset({"epochs", "batch", "lr", "ema", "shifts", "masks", "review_model", "seed", "threads",
                      "val_frac", "pull", "loss", "width_loss", "sources"})


@dataclass
class Adaptation:
    result: TrainResult
    name: str
    parent: str  # its name
    parent_sha256: str
    films: int  # films adapted on
    taught: dict[str, int]  # structure: films on which the parent's prediction taught it
    seconds: float


def adaptation_config(ck_training: dict, spec_dict: dict, sha256: str, **overrides) -> TrainConfig:
    """The parent's training configuration made an adaptation's: its network, input and
    structures kept, :data:`ADAPT_STEPS` steps (``epochs`` is set from the films once they are
    known), a tenth of its learning rate, no held-out share; ``overrides`` (command-line options
    that are not None) on top, of :data:`SETTINGS` only."""
    shaping = sorted(k for k, v in overrides.items() if v is not None and k not in SETTINGS)
    if shaping:
        raise TrainError(f"--from keeps the parent's network and input: leave out "
                         f"{', '.join('--' + k.replace('_', '-') for k in shaping)}")
    base = {**spec_dict, **ck_training}
    base.setdefault("preset", "adapted")
    cfg = TrainConfig.from_dict({**base, "structures": list(spec_dict["structures"])})
    values: dict[str, Any] = {"lr": cfg.lr * LR_SHARE, "val_frac": 0.0, "folds": 1, "fold": 0,
                              "masks": ADAPT_MASKS, "pull": PULL, "parent": sha256, "threads": None,
                              "sources": ()}  # the clinic's films, not the parent's choice of sources
    values.update({k: v for k, v in overrides.items() if v is not None})
    values["masks"] = tuple(values["masks"])
    if "manual" not in values["masks"]:
        raise TrainError(f"--masks {','.join(values['masks'])}: include manual (validation uses it)")
    return dataclasses.replace(cfg, **values)


def teach_missing(ds: Dataset, train_idx: list[int], model: torch.nn.Module, cfg: TrainConfig,
                  device: torch.device) -> dict[str, int]:
    """Fill each training film's undrawn structures with the parent's probabilities (in place,
    marked valid); returns per structure how many films the parent taught it on."""
    taught = {s: 0 for s in cfg.structures}
    todo = [i for i in train_idx if not ds.valid[i].all()]
    for start in range(0, len(todo), 16):
        chunk = todo[start:start + 16]
        x = torch.from_numpy(np.stack([model_input(ds.images[i].astype(np.float32), cfg.norm) for i in chunk]))
        prob = predict(model, x.float().to(device), cfg.roi).cpu().numpy()
        for k, i in enumerate(chunk):
            for j, s in enumerate(cfg.structures):
                if not ds.valid[i, j]:
                    ds.masks[i, j] = prob[k, j]
                    ds.valid[i, j] = True
                    taught[s] += 1
    return {s: n for s, n in taught.items() if n}


def adapt(engine: Engine, parent_ref: str, run_dir: Path, name: str, cache_dir: str | None = None,
          device: str = "auto", resume: bool = True, progress: bool = True,
          **overrides) -> Adaptation:
    """Adapt ``parent_ref`` (``default``, a registered name or a checkpoint) to the database's
    manual (and reviewed) films; registers the result as ``name``."""
    started = time.time()
    path, parent_name, sha = verified(engine, parent_ref)
    dev = pick_device(device)
    parent, ck = load_model(path, dev)
    if overrides.get("review_model") is None:
        overrides["review_model"] = parent_name  # the corrections a clinic made of the parent's masks
    cfg = adaptation_config(ck.training, ck.spec.as_dict(), sha, **overrides)
    if overrides.get("threads"):
        torch.set_num_threads(overrides["threads"])
    ds = load_dataset(engine, cfg, cache_dir, every_structure=False)
    held = splits_for(run_dir, ds.manual, cfg, ds.patients).val[0]
    train_idx = sorted(set(range(len(ds.uids))) - set(ds.indices(held)))
    if not train_idx:
        raise TrainError("no film left to adapt on: annotate or review some of the clinic's films first")
    if overrides.get("epochs") is None:  # ADAPT_STEPS steps whatever the number of films
        steps = max(1, len(train_idx) // cfg.batch)
        cfg = dataclasses.replace(cfg, epochs=max(1, math.ceil(ADAPT_STEPS / steps)))
    taught = teach_missing(ds, train_idx, parent, cfg, dev)
    del parent
    start = Start(ck.state_dict, parent_name, sha,
                  tuple(ck.info.get("trained_uids") or ()))
    result = train(engine, cfg, run_dir, cache_dir, device, resume, progress, dataset=ds, held_out=held,
                   start=start)
    films = len(train_idx)
    register_model(engine, name, run_dir / "best.pt", cfg.preset, cfg.as_dict(), result.dice, ds.hash,
                   {"best_epoch": result.best_epoch, "history": result.history, "seconds": result.seconds,
                    "training_images": ds.counts(), "parent": {"name": parent_name, "sha256": sha},
                    "adapted_on": films, "taught_by_parent": taught})
    return Adaptation(result, name, parent_name, sha, films, taught, time.time() - started)
