"""How long training waits for its batches: a DataLoader an epoch against one for the run.

Training augments its batches in DataLoader worker processes (on a GPU, where the model is
fast and the augmentation is the slow part). With a loader an epoch, the workers start
afresh each epoch, and the epoch's first batches are made while the model waits; with one
loader for the run (what `pipeline.train.loop.train` does), they start once and make the
next epoch's batches while the model validates. This bench runs both ways in the same
process over the annotated images and a preset's augmentation (the shipped `cxr_deep` by
default), the model side being `--net`'s real training steps on `--device` plus a
validation pass at each epoch's end, and reports the time spent waiting for batches.

Usage: python bench/train_loader.py --db URL [--cache DIR] [--workers 2] [--epochs 6]
       [--preset cxr_deep] [--net tiny] [--device auto]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from pipeline import db as D
from pipeline.model import build_network, logits_of, pick_device
from pipeline.train import TrainConfig
from pipeline.train.data import RunBatches, load_dataset
from pipeline.train.loop import validate
from pipeline.train.losses import seg_loss


def run(loader, orders: list[list[int]], per_epoch: bool, steps: int, net, opt, ds, held_out, cfg,
        dev) -> tuple[float, float]:
    """Train over ``orders``' epochs, their batches from ``loader(first, orders)``: a new one
    each epoch (``per_epoch``), or one for them all. ``(seconds waiting for batches, seconds
    in all)``."""
    waited, t_all = 0.0, time.perf_counter()
    for epoch in range(len(orders)):
        if per_epoch:
            batches = loader(epoch, [orders[epoch]])
        elif epoch == 0:
            batches = loader(0, orders)
        net.train()
        for _ in range(steps):
            t = time.perf_counter()
            x, y, valid = next(batches)
            waited += time.perf_counter() - t
            loss = seg_loss(logits_of(net(x.to(dev))), y.to(dev), valid.to(dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        validate(net, ds, held_out, cfg, dev)
    return waited, time.perf_counter() - t_all


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", required=True)
    ap.add_argument("--cache")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--preset", default="cxr_deep")
    ap.add_argument("--net", default="tiny", help="the preset whose network takes the steps")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    dev = pick_device(args.device)
    cfg = TrainConfig.from_preset(args.preset, folds=5)
    ds = load_dataset(D.connect(args.db), cfg, args.cache)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(ds.uids))
    held_out, train_idx = [int(i) for i in order[:20]], [int(i) for i in order[20:]]
    steps = len(train_idx) // cfg.batch
    orders = [[int(i) for i in rng.permutation(train_idx)] for _ in range(args.epochs)]

    def loader(first: int, epochs: list[list[int]]):
        return iter(torch.utils.data.DataLoader(
            RunBatches(ds, cfg, first, epochs, steps), batch_size=None, num_workers=args.workers,
            pin_memory=dev.type == "cuda", prefetch_factor=4 if args.workers else None))

    results = {}
    for name, per_epoch in (("a loader an epoch (before)", True), ("one loader for the run (now)", False)):
        torch.manual_seed(0)
        net = build_network(TrainConfig.from_preset(args.net, size=cfg.size).spec()).to(dev)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
        results[name] = run(loader, orders, per_epoch, steps, net, opt, ds, held_out, cfg, dev)
    print(f"{dev}, {args.workers} loader workers, {args.preset} augmentation at {cfg.size} px, batch {cfg.batch}, "
          f"{steps} steps an epoch of {args.net}'s network, {args.epochs} epochs")
    print("| loader | waiting for batches, s an epoch | an epoch in all, s |")
    print("|---|---|---|")
    for name, (waited, total) in results.items():
        print(f"| {name} | {waited / args.epochs:.3f} | {total / args.epochs:.3f} |")
    (w0, t0), (w1, t1) = results.values()
    print(f"ratio now / before: waiting {w1 / w0:.2f}, in all {t1 / t0:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
