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
from collections.abc import Iterator
from dataclasses import dataclass, field
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

RESUME_EVERY = 30.0  # seconds between resume points within a call (one is always written at its end)
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


@dataclass
class Progress:
    """Where a run stands: what ``last.pt`` keeps (as a plain dict) to resume from."""

    epoch: int = 0  # epochs done
    history: list[dict] = field(default_factory=list)  # per epoch: loss and validation Dice
    best: float = -1.0  # the best epoch's mean validation Dice (without held-out images: the epoch)
    best_epoch: int = 0
    seconds: float = 0.0  # time spent training and validating


class Trainer:
    """One model (one fold) in small steps, as nnU-Net's trainer hooks are, without its size:
    :meth:`__init__` sets up (data, held-out images, network, optimiser, schedule, weight
    average), :meth:`resume` reads ``last.pt``, :meth:`train_epoch` and :meth:`validate` do one
    epoch, :meth:`save` writes ``best.pt`` and the resume point, :meth:`finish` writes
    ``final.pt`` and the learning curve; :meth:`run` strings them together."""

    def __init__(self, engine: Engine, cfg: TrainConfig, run_dir: Path, cache_dir: str | None = None,
                 device: str = "auto", dataset: Dataset | None = None, held_out: list[str] | None = None,
                 workers: int | None = None, start: Start | None = None) -> None:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.cfg, self.run_dir = cfg, run_dir
        self.dev = dev = pick_device(device)
        self.workers = workers if workers is not None else (
            0 if dev.type == "cpu" else max(1, min(8, torch.get_num_threads() - 1)))
        torch.use_deterministic_algorithms(dev.type == "cpu", warn_only=True)
        self.ds = ds = dataset or load_dataset(engine, cfg, cache_dir)
        self.start = start
        if held_out is None:
            held_out = splits_for(run_dir, ds.manual, cfg, ds.patients).val[cfg.fold]
        self.held_out = held_out
        self.va = ds.indices(self.held_out)
        self.tr = sorted(set(range(len(ds.uids))) - set(self.va))
        self.trained_on = dict(Counter(ds.source_of[i] for i in self.tr))  # images per mask source
        # which films: what `cxrlabel quality fit` leaves out of the films it fits the score on
        self.trained_uids = sorted(ds.uids[i] for i in self.tr)
        _seed_all(cfg.seed)
        self.model = build_network(cfg.spec()).to(dev)
        self.anchor: list[torch.Tensor] = []
        if start is not None:  # an adaptation: the parent's weights, and the pull back toward them
            self.model.load_state_dict({k: v.float() for k, v in start.weights.items()})
            self.anchor = [p.detach().clone() for p in self.model.parameters()]
            self.trained_uids = sorted(set(self.trained_uids) | set(start.trained_uids))
        # decay toward zero for a model from scratch; an adaptation decays toward its parent instead
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=0 if start else 1e-4)
        self.steps_per_epoch = max(1, len(self.tr) // cfg.batch)
        # warm up over a tenth of training, but at least two steps (one would divide by zero); a
        # schedule of at least three steps (a single small batch for one or two epochs is fewer,
        # and OneCycleLR divides by zero there: the steps past the run are never taken)
        total = max(3, cfg.epochs * self.steps_per_epoch)
        self.sched = torch.optim.lr_scheduler.OneCycleLR(self.opt, max_lr=cfg.lr, total_steps=total,
                                                         pct_start=min(max(0.1, 2.0 / total), 0.5))
        self.avg = WeightAverage(self.model, cfg.ema) if cfg.ema else None
        self.scored = self.avg.module if self.avg else self.model  # what is validated and saved
        self.rng = random.Random(cfg.seed + 1)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.progress = Progress()
        self.last = run_dir / "last.pt"
        self.saved_at = time.monotonic()

    def resume(self) -> None:
        """Carry on from ``last.pt``, if there is one (refused when made otherwise)."""
        if not self.last.exists():
            return
        ck = _read_last(self.last, self.cfg)
        self.model.load_state_dict(ck["model"])
        self.opt.load_state_dict(ck["optimizer"])
        self.sched.load_state_dict(ck["scheduler"])
        if self.avg:
            self.avg.load_state_dict(ck["ema"])
        self.progress = Progress(**ck["state"])
        self.rng.setstate(_as_tuple(ck["rng"]["python"]))
        torch.set_rng_state(ck["rng"]["torch"])
        log.info("resuming %s at epoch %d", self.run_dir, self.progress.epoch)

    def batches(self, stop: int) -> tuple[Iterator, list[tuple]]:
        """The run's batches up to epoch ``stop``, from one loader, and the shuffling
        generator's state after each epoch (its resume point). Every epoch's shuffle is drawn
        now, in turn (the generator draws nothing else): the same orders as drawing each at its
        epoch's start, and one loader for the run, whose workers start once and augment the
        next epoch while this one validates and saves."""
        orders: list[list[int]] = []
        rng_after: list[tuple] = []
        for _ in range(self.progress.epoch, stop):
            order = self.tr[:]
            self.rng.shuffle(order)
            orders.append(order)
            rng_after.append(self.rng.getstate())
        if not orders:
            return iter(()), rng_after
        return iter(torch.utils.data.DataLoader(
            RunBatches(self.ds, self.cfg, self.progress.epoch, orders, self.steps_per_epoch), batch_size=None,
            num_workers=self.workers, pin_memory=self.dev.type == "cuda",
            prefetch_factor=4 if self.workers else None)), rng_after

    def train_epoch(self, batches: Iterator) -> float:
        """One epoch's steps; the mean loss."""
        cfg, dev = self.cfg, self.dev
        self.model.train()
        losses: list[float] = []
        for _ in range(self.steps_per_epoch):
            x, y, valid = next(batches)
            x, y, valid = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True), valid.to(dev)
            out = self.model(x)
            loss = seg_loss(logits_of(out), y, valid, cfg.loss, cfg.width_loss,
                            overlap_weights(y, valid, cfg.structures))
            if isinstance(out, tuple):  # SegResNetVAE: add its VAE loss term
                loss = loss + 0.1 * out[1]
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            if self.anchor and self.cfg.pull:
                self._pull()
            self.sched.step()
            if self.avg:
                self.avg.update(self.model)
            losses.append(loss.item())
        return float(np.mean(losses))

    @torch.no_grad()
    def _pull(self) -> None:
        """Move every weight a step back toward the parent's: L2-SP (Li et al. 2018), decoupled
        from the gradient as AdamW decouples its decay, at the schedule's learning rate."""
        rate = float(self.sched.get_last_lr()[0]) * self.cfg.pull
        for p, p0 in zip(self.model.parameters(), self.anchor, strict=True):
            p.sub_(p - p0, alpha=rate)

    def validate(self) -> dict[str, float]:
        return validate(self.scored, self.ds, self.va, self.cfg, self.dev) if self.va else {}

    def record(self, epoch: int, loss: float, scores: dict[str, float], seconds: float) -> bool:
        """Add epoch ``epoch`` (0-based) to the progress; True when it is the best so far.
        Without held-out images the final epoch is the model (the schedule has annealed)."""
        p = self.progress
        mean = float(np.nanmean(list(scores.values()))) if scores else float(epoch)
        p.seconds += seconds
        p.history.append({"epoch": epoch + 1, "loss": loss, **scores})
        p.epoch = epoch + 1
        if mean > p.best:
            p.best, p.best_epoch = mean, epoch + 1
            return True
        return False

    def save(self, best: bool, scores: dict[str, float], rng_state: tuple, last_of_call: bool = True) -> None:
        """``best.pt`` when this epoch is the best on held-out images (without them the model is
        the last epoch: :meth:`finish` writes it once), and the resume point ``last.pt`` (written
        beside and moved, so a crash never leaves half of one) at the last epoch of this call and
        otherwise at most every :data:`RESUME_EVERY` seconds: an adaptation's epochs are single
        steps, and writing 75 MB after each took longer than the step."""
        if best and self.va:
            self._save_model(self.run_dir / "best.pt", scores)
        if not last_of_call and time.monotonic() - self.saved_at < RESUME_EVERY:
            return
        self.saved_at = time.monotonic()
        tmp = self.last.with_name("last.pt.tmp")
        torch.save({"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                    "scheduler": self.sched.state_dict(), "state": dataclasses.asdict(self.progress),
                    "config": self.cfg.as_dict(), "held_out": sorted(self.held_out),
                    "ema": self.avg.state_dict() if self.avg else None,
                    "rng": {"python": rng_state, "torch": torch.get_rng_state()},
                    "augmentation": AUGMENTATION_SEEDS}, tmp)
        tmp.replace(self.last)

    def _save_model(self, path: Path, scores: dict) -> None:
        save_checkpoint(path, self.scored, self.cfg.spec(),
                        {"dice": scores, "epoch": self.progress.epoch, "data_hash": self.ds.hash,
                         "images": self.trained_on, "trained_uids": self.trained_uids,
                         **(self.start.lineage(self.ds.uids[i] for i in self.tr) if self.start else {})},
                        training=self.cfg.as_dict())

    def finish(self) -> TrainResult:
        """``final.pt`` (a fold's last epoch, once trained to the end) and the learning curve."""
        cfg, p = self.cfg, self.progress
        if self.va and p.epoch == cfg.epochs and p.history:
            self._save_model(self.run_dir / "final.pt", {s: p.history[-1].get(s) for s in cfg.structures})
        if not self.va and p.history and p.best_epoch == p.epoch:  # no held-out images: the last epoch is the model
            self._save_model(self.run_dir / "best.pt", {})
        best = p.history[p.best_epoch - 1] if p.history else {}
        plot_curve(p.history, self.run_dir / "learning_curve.png", f"{cfg.preset} ({cfg.network}, {cfg.size}px)",
                   cfg.structures)
        return TrainResult(self.run_dir, p.best_epoch, {s: best.get(s, float("nan")) for s in cfg.structures},
                           p.history, p.seconds, sorted(self.held_out))

    def run(self, until_epoch: int | None = None, progress: bool = True) -> TrainResult:
        """Train from where the progress stands to the last epoch (or ``until_epoch``)."""
        cfg = self.cfg
        first = self.progress.epoch
        stop = cfg.epochs if until_epoch is None else max(first, min(cfg.epochs, until_epoch))
        batches, rng_after = self.batches(stop)
        bar = tqdm(total=cfg.epochs, initial=first, desc=f"train {cfg.preset}", unit="epoch", disable=not progress)
        for n, epoch in enumerate(range(first, stop)):
            t0 = time.perf_counter()
            loss = self.train_epoch(batches)
            scores = self.validate()
            best = self.record(epoch, loss, scores, time.perf_counter() - t0)
            self.save(best, scores, rng_after[n], last_of_call=epoch == stop - 1)
            bar.update(1)
            # a structure no held-out film draws (a clinic's cardiomediastinum) has no score: not shown
            bar.set_postfix(loss=f"{loss:.3f}", **{k[:5]: f"{v:.3f}" for k, v in scores.items() if v == v})
        bar.close()
        return self.finish()


@dataclass(frozen=True)
class Start:
    """Where an adaptation starts (``train --from``): the parent model's weights, name, file
    hash and the films it trained on (the adapted model's trained films include them)."""

    weights: dict[str, torch.Tensor]
    name: str
    sha256: str
    trained_uids: tuple[str, ...]

    def lineage(self, adapted: Iterator[str] | list[str]) -> dict:
        """What the adapted checkpoint records of its parent and the films it adapted on."""
        return {"parent": {"name": self.name, "sha256": self.sha256}, "adapted_uids": sorted(adapted)}


def train(engine: Engine, cfg: TrainConfig, run_dir: Path, cache_dir: str | None = None,
          device: str = "auto", resume: bool = True, progress: bool = True,
          dataset: Dataset | None = None, until_epoch: int | None = None,
          held_out: list[str] | None = None, workers: int | None = None,
          start: Start | None = None) -> TrainResult:
    """Train one model and resume from ``run_dir/last.pt`` when it exists.

    ``held_out``: the validation uids (default: fold ``cfg.fold`` of ``run_dir/splits.json``,
    made on first use). ``until_epoch`` stops early after that epoch (a time-boxed job); a
    later call resumes. ``workers``: processes that augment batches ahead of the model
    (default: none on a CPU, whose cores the model uses; on a GPU one per torch thread but
    one, up to 8). The result does not depend on it.
    """
    trainer = Trainer(engine, cfg, run_dir, cache_dir, device, dataset, held_out, workers, start)
    if resume:
        trainer.resume()
    return trainer.run(until_epoch, progress)


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
