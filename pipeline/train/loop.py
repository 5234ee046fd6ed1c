"""The training loop: one model (one fold), resumable epoch by epoch.

Output channels are independent sigmoids for the structures; an image missing a
structure's mask is left out of that channel's loss and Dice. With ``ema`` > 0 the model
that is validated and saved is an exponential moving average of the trained weights.
Augmentation runs in the worker processes of one DataLoader for the run (on a GPU) while
the model trains, each image with a seed of its own place in training
(:func:`pipeline.train.data.sample_seeds`), so the run is the same with any number of
workers and on resume.
Checkpoints: ``RUN_DIR/last.pt`` every epoch (resume point: weights, optimiser, schedule,
random states; plain data like every checkpoint) and ``RUN_DIR/best.pt`` (best mean
validation Dice, in the inference format of :mod:`pipeline.model`). A fold with held-out
images also leaves ``RUN_DIR/final.pt``, its last epoch in that format: the model a run
without held-out images ships (``--val-frac 0`` keeps the last epoch), so a quality score
fitted on folds can be fitted on models trained as long as the shipped one.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sqlalchemy.engine import Engine
from tqdm import tqdm

from pipeline.db import chunks
from pipeline.masks import overlap_ignored
from pipeline.metrics import dice
from pipeline.model import build_network, logits_of, pick_device, predict, save_checkpoint
from pipeline.train.average import WeightAverage
from pipeline.train.config import TrainConfig, TrainError
from pipeline.train.data import Dataset, RunBatches, load_dataset, make_batch
from pipeline.train.folds import splits_for
from pipeline.train.losses import overlap_weights, seg_loss
from pipeline.train.plots import plot_curve

log = logging.getLogger(__name__)

AUGMENTATION_SEEDS = "per-image-v1"  # how augmentation draws its randomness (see sample_seeds)


@dataclass
class TrainResult:
    run_dir: Path
    best_epoch: int
    dice: dict[str, float]
    history: list[dict]
    seconds: float
    held_out: list[str]


def validate(model: torch.nn.Module, ds: Dataset, idx: list[int], cfg: TrainConfig,
             device: torch.device) -> dict[str, float]:
    """Mean Dice per structure at cache resolution over annotated validation images; a lung
    in its source's own convention (its pixels the source also drew as heart left out)."""
    scores: dict[str, list[float]] = {s: [] for s in cfg.structures}
    for chunk in chunks(idx, 16):
        x, y, valid = make_batch(ds, chunk, None, cfg.norm)
        prob = predict(model, x.to(device), cfg.roi).cpu().numpy()
        for k in range(len(chunk)):
            truth = {s: y[k, j].numpy() > 0.5 for j, s in enumerate(cfg.structures) if valid[k, j]}
            ignored = overlap_ignored(truth)
            for j, s in enumerate(cfg.structures):
                if s in truth:
                    keep = ~ignored[s] if s in ignored else slice(None)
                    scores[s].append(dice(prob[k, j][keep] > 0.5, truth[s][keep]))
    return {s: float(np.mean(v)) if v else float("nan") for s, v in scores.items()}


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(engine: Engine, cfg: TrainConfig, run_dir: Path, cache_dir: str | None = None,
          device: str = "auto", resume: bool = True, progress: bool = True,
          dataset: Dataset | None = None, until_epoch: int | None = None,
          held_out: list[str] | None = None, workers: int | None = None) -> TrainResult:
    """Train one model and resume from ``run_dir/last.pt`` when it exists.

    ``held_out``: the validation uids (default: fold ``cfg.fold`` of ``run_dir/splits.json``,
    made on first use). ``until_epoch`` stops early after that epoch (a time-boxed job); a
    later call resumes. ``workers``: processes that augment batches ahead of the model
    (default: none on a CPU, whose cores the model uses; on a GPU one per torch thread but
    one, up to 8). The result does not depend on it.
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dev = pick_device(device)
    if workers is None:
        workers = 0 if dev.type == "cpu" else max(1, min(8, torch.get_num_threads() - 1))
    torch.use_deterministic_algorithms(dev.type == "cpu", warn_only=True)
    ds = dataset or load_dataset(engine, cfg, cache_dir)
    if held_out is None:
        held_out = splits_for(run_dir, ds.manual, cfg, ds.patients).val[cfg.fold]
    va = ds.indices(held_out)
    tr = sorted(set(range(len(ds.uids))) - set(va))
    trained_on = dict(Counter(ds.source_of[i] for i in tr))  # images per mask source
    # which films: what `cxrlabel quality fit` leaves out of the films it fits the score on
    trained_uids = sorted(ds.uids[i] for i in tr)
    _seed_all(cfg.seed)
    model = build_network(cfg.spec()).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    steps_per_epoch = max(1, len(tr) // cfg.batch)
    # warm up over a tenth of training, but at least two steps (one would divide by zero)
    warmup = max(0.1, 2.0 / (cfg.epochs * steps_per_epoch))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, epochs=cfg.epochs,
                                                steps_per_epoch=steps_per_epoch, pct_start=min(warmup, 0.5))
    avg = WeightAverage(model, cfg.ema) if cfg.ema else None
    scored = avg.module if avg else model  # what is validated and saved
    rng = random.Random(cfg.seed + 1)
    run_dir.mkdir(parents=True, exist_ok=True)
    state = {"epoch": 0, "history": [], "best": -1.0, "best_epoch": 0, "seconds": 0.0}
    last = run_dir / "last.pt"
    if resume and last.exists():
        ck = _read_last(last, cfg)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        if avg:
            avg.load_state_dict(ck["ema"])
        state = ck["state"]
        rng.setstate(_as_tuple(ck["rng"]["python"]))
        torch.set_rng_state(ck["rng"]["torch"])
        log.info("resuming %s at epoch %d", run_dir, state["epoch"])
    first = state["epoch"]
    stop = cfg.epochs if until_epoch is None else max(first, min(cfg.epochs, until_epoch))
    # Every epoch's shuffle is drawn now, in turn (the generator draws nothing else), with the
    # generator's state after each for its resume point: the same orders as drawing each at
    # its epoch's start, and one loader for the run, whose workers start once and augment the
    # next epoch while this one validates and saves (a loader an epoch started them anew).
    orders, rng_after = [], []
    for _ in range(first, stop):
        order = tr[:]
        rng.shuffle(order)
        orders.append(order)
        rng_after.append(rng.getstate())
    batches = iter(torch.utils.data.DataLoader(
        RunBatches(ds, cfg, first, orders, steps_per_epoch), batch_size=None, num_workers=workers,
        pin_memory=dev.type == "cuda", prefetch_factor=4 if workers else None)) if orders else iter(())
    bar = tqdm(total=cfg.epochs, initial=first, desc=f"train {cfg.preset}", unit="epoch", disable=not progress)
    for n, epoch in enumerate(range(first, stop)):
        t0 = time.perf_counter()
        model.train()
        losses = []
        for _ in range(steps_per_epoch):
            x, y, valid = next(batches)
            x, y, valid = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True), valid.to(dev)
            out = model(x)
            loss = seg_loss(logits_of(out), y, valid, cfg.loss, cfg.width_loss,
                            overlap_weights(y, valid, cfg.structures))
            if isinstance(out, tuple):  # SegResNetVAE: add its VAE loss term
                loss = loss + 0.1 * out[1]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if avg:
                avg.update(model)
            losses.append(loss.item())
        scores = validate(scored, ds, va, cfg, dev) if va else {}
        # without held-out images the final epoch is the model (the schedule has annealed)
        mean = float(np.nanmean(list(scores.values()))) if scores else float(epoch)
        state["seconds"] += time.perf_counter() - t0
        state["history"].append({"epoch": epoch + 1, "loss": float(np.mean(losses)), **scores})
        state["epoch"] = epoch + 1
        if mean > state["best"]:
            state["best"], state["best_epoch"] = mean, epoch + 1
            save_checkpoint(run_dir / "best.pt", scored, cfg.spec(),
                            {"dice": scores, "epoch": epoch + 1, "data_hash": ds.hash, "images": trained_on,
                             "trained_uids": trained_uids},
                            training=cfg.as_dict())
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(losses):.3f}", **{k[:5]: f"{v:.3f}" for k, v in scores.items()})
        tmp = last.with_name("last.pt.tmp")
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(), "state": state, "config": cfg.as_dict(),
                    "held_out": sorted(held_out), "ema": avg.state_dict() if avg else None,
                    "rng": {"python": rng_after[n], "torch": torch.get_rng_state()},
                    "augmentation": AUGMENTATION_SEEDS}, tmp)
        tmp.replace(last)
    bar.close()
    if va and state["epoch"] == cfg.epochs and state["history"]:
        save_checkpoint(run_dir / "final.pt", scored, cfg.spec(),
                        {"dice": {s: state["history"][-1].get(s) for s in cfg.structures},
                         "epoch": state["epoch"], "data_hash": ds.hash, "images": trained_on,
                             "trained_uids": trained_uids},
                        training=cfg.as_dict())
    best = state["history"][state["best_epoch"] - 1] if state["history"] else {}
    plot_curve(state["history"], run_dir / "learning_curve.png",
               f"{cfg.preset} ({cfg.network}, {cfg.size}px)", cfg.structures)
    return TrainResult(run_dir, state["best_epoch"],
                       {s: best.get(s, float("nan")) for s in cfg.structures},
                       state["history"], state["seconds"], sorted(held_out))


def same_config(stored: dict, cfg: TrainConfig) -> bool:
    """Whether a stored configuration is ``cfg``; a setting added since it was stored counts
    as its default (so a run from before it resumes when that setting is left alone)."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    return all(stored.get(k, defaults.get(k)) == v for k, v in cfg.as_dict().items())


def _read_last(path: Path, cfg: TrainConfig) -> dict:
    """The resume point, read as data; refused when made with another configuration."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise TrainError(f"{path} is not a resumable checkpoint of this cxrlabel ({type(e).__name__}): "
                         "use --no-resume to start over") from e
    if not same_config(ck.get("config") or {}, cfg):
        raise TrainError(f"{path} was trained with another configuration: use a new run "
                         "folder or --no-resume to start over")
    if ck.get("augmentation") != AUGMENTATION_SEEDS:
        raise TrainError(f"{path} was made by a cxrlabel that drew augmentation another way: resume "
                         "it with that version, or use --no-resume to start over")
    return ck


def _as_tuple(x):
    """``random.setstate`` wants the nested tuples that a checkpoint may return as lists."""
    return tuple(_as_tuple(v) for v in x) if isinstance(x, list | tuple) else x
