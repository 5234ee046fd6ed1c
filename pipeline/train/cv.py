"""Cross-validation: every fold of a preset on stored splits, one call for the CLI and benches."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy.engine import Engine

from pipeline import db as D
from pipeline import process_pool
from pipeline.model import pick_device, register_model
from pipeline.train.config import TrainConfig, TrainError
from pipeline.train.data import Dataset, load_dataset
from pipeline.train.folds import splits_for
from pipeline.train.loop import TrainResult, train

log = logging.getLogger(__name__)


@dataclass
class CrossValidation:
    run_dir: Path
    names: list[str]  # registered model name per fold ('' when not registered)
    results: list[TrainResult]
    summary: dict[str, dict[str, float]]
    seconds: float
    images: dict[str, int] | None = None  # images per mask source (manual, reviewed, accepted)


def fold_dir(run_dir: Path, cfg: TrainConfig, fold: int) -> Path:
    return run_dir / f"fold{fold}" if cfg.folds > 1 else run_dir


def cross_validate(engine: Engine, cfg: TrainConfig, run_dir: Path, cache_dir: str | None = None,
                   device: str = "auto", resume: bool = True, progress: bool = True,
                   register_as: str | None = None, dataset: Dataset | None = None,
                   parallel: int = 1, workers: int | None = None, only: list[int] | None = None,
                   ) -> CrossValidation:
    """Train every fold of ``cfg`` (one run without ``folds``) on the splits stored in
    ``run_dir/splits.json``; folds go to ``run_dir/foldK``. With ``register_as`` each fold's
    best checkpoint is registered (``NAME_foldK``, or ``NAME`` for a single run). Writes
    ``run_dir/summary.json``.

    ``parallel`` > 1 trains that many folds at once in separate processes, each with its
    share of the CPU threads unless ``cfg.threads`` says otherwise: for a CPU of many cores.
    On one GPU the processes take turns (CUDA time-slices between processes), and five folds of
    ``cxr_deep`` at once took 35 s an epoch each on an H200 against about 1 s for one fold
    alone (bench/RESULTS.md), so a CUDA device warns and folds in turn are the way there.
    The result is the same as one after the other.
    ``workers``: each fold's augmenting processes (see :func:`pipeline.train.loop.train`).
    ``only``: train just these folds (a cross-validation spread over sessions or machines; the
    stored splits are the same for each), and write ``summary.json`` only once a call covers
    every fold (finished folds resume at their end, at once).
    """
    started = time.time()
    data = dataset or load_dataset(engine, cfg, cache_dir)
    splits = splits_for(run_dir, data.manual, cfg, data.patients)  # validation: manual masks only
    if only is not None and any(not 0 <= k < cfg.folds for k in only):
        raise TrainError(f"--fold {only}: folds are numbered 0-{cfg.folds - 1}")
    chosen = sorted(set(only)) if only is not None else list(range(cfg.folds))
    folds = [(dataclasses.replace(cfg, fold=k), fold_dir(run_dir, cfg, k), splits.val[k]) for k in chosen]
    if parallel > 1 and cfg.folds > 1 and pick_device(device).type == "cuda":
        log.warning("--parallel-folds %d on one GPU: the folds' processes take turns on it, which was "
                    "measured many times slower than folds one after another (bench/RESULTS.md); "
                    "leave --parallel-folds out on a GPU", parallel)
    if parallel > 1 and cfg.folds > 1:
        url = engine.url.render_as_string(hide_password=False)
        threads = cfg.threads or max(1, (os.cpu_count() or 1) // parallel)
        # workers that exit with this process (a killed run leaves no fold training on), from
        # a fork server: never a fork of a process whose torch threads run
        with process_pool(parallel) as pool:
            trained = list(pool.map(_train_fold, *zip(*[
                (url, c, where, cache_dir, device, resume, held, threads, workers) for c, where, held in folds],
                strict=True)))
    else:
        trained = [train(engine, c, where, cache_dir, device, resume, progress, dataset=data, held_out=held,
                         workers=workers) for c, where, held in folds]
    results = list(trained)
    names = [_register_fold(engine, register_as, cfg.folds, c, where, r, data) if register_as else ""
             for (c, where, _), r in zip(folds, results, strict=True)]
    summary = summarise_folds(results)
    seconds = time.time() - started
    if len(chosen) == cfg.folds:
        (run_dir / "summary.json").write_text(json.dumps(
            {"preset": cfg.preset, "config": cfg.as_dict(), "dice": summary, "seconds": seconds,
             "data_hash": data.hash, "images": data.counts()}, indent=2))
    return CrossValidation(run_dir, names, results, summary, seconds, data.counts())


def _register_fold(engine: Engine, register_as: str, folds: int, fold_cfg: TrainConfig, where: Path,
                   r: TrainResult, data: Dataset) -> str:
    """Register one fold's best checkpoint as ``NAME_foldK`` (``NAME`` for a single run)."""
    name = f"{register_as}_fold{fold_cfg.fold}" if folds > 1 else register_as
    register_model(engine, name, where / "best.pt", fold_cfg.preset, fold_cfg.as_dict(), r.dice,
                   data.hash, {"best_epoch": r.best_epoch, "history": r.history,
                               "seconds": r.seconds, "training_images": data.counts()})
    return name


def _train_fold(url: str, cfg: TrainConfig, where: Path, cache_dir: str | None, device: str, resume: bool,
                held_out: list[str], threads: int, workers: int | None) -> TrainResult:
    """One fold in its own process (see :func:`cross_validate`'s ``parallel``)."""
    import torch
    torch.set_num_threads(threads)  # cfg.threads, when set, overrides it inside train()
    engine = D.connect(url)
    try:
        return train(engine, cfg, where, cache_dir, device, resume, progress=False, held_out=held_out,
                     workers=workers)
    finally:
        engine.dispose()


def summarise_folds(results: list[TrainResult]) -> dict[str, dict[str, Any]]:
    """Mean and sample sd of the best-epoch Dice per structure over folds, and each fold's."""
    out: dict[str, dict[str, Any]] = {}
    for s in results[0].dice:
        v = np.array([r.dice[s] for r in results], dtype=float)
        scored = v[~np.isnan(v)]  # NaN: a run without held-out images
        out[s] = {"mean": float(scored.mean()) if len(scored) else float("nan"),
                  "sd": float(scored.std(ddof=1)) if len(scored) > 1 else 0.0,
                  "folds": [float(x) for x in v]}
    return out
