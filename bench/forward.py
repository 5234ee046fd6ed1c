"""Forward-pass speed of models on the CPU, the first model being the baseline.

Each model runs on random input of its own size, channels-last, with ``--threads`` torch
threads, for ``--seconds`` per batch size, in ``--rounds`` alternating rounds (the machine is
noisy: compare ratios within a run). Also times the input normalisations of
:func:`pipeline.imaging.model_input` on a cached-size image.

Usage: python bench/forward.py [MODEL ...] [--threads 2] [--seconds 8] [--rounds 2]
MODEL: ``default``, a registered name, or a checkpoint path (as `cxrlabel label --model`).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import numpy as np
import torch

from pipeline import db as D
from pipeline.imaging import NORMS, model_input
from pipeline.model import resolve_model


def images_per_second(model: torch.nn.Module, size: int, batch: int, seconds: float) -> float:
    x = torch.randn(batch, 1, size, size).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        model(x)
        t, n = time.perf_counter(), 0
        while time.perf_counter() - t < seconds:
            torch.sigmoid(model(x))
            n += batch
    return n / (time.perf_counter() - t)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*", default=["default"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        engine = D.connect(f"sqlite:///{tmp}/models.db")
        loaded = [resolve_model(engine, ref, "cpu") for ref in args.models]
    base: dict[int, float] = {}
    for r in range(args.rounds):
        for ref, lm in zip(args.models, loaded, strict=True):
            for batch in (16, 1):
                v = images_per_second(lm.module, lm.spec.size, batch, args.seconds)
                base.setdefault(batch, v)  # the first model's first round
                print(f"round {r + 1}: {ref} ({lm.spec.size} px, norm {lm.spec.norm}) batch {batch}: "
                      f"{v:.1f} img/s, ratio {v / base[batch]:.2f} to {args.models[0]}", flush=True)
    img = np.random.default_rng(0).integers(0, 256, (loaded[0].spec.size,) * 2, dtype=np.uint8)
    for norm in NORMS:
        t = time.perf_counter()
        for _ in range(500):
            model_input(img, norm)
        print(f"model_input {norm}: {(time.perf_counter() - t) / 500 * 1e3:.3f} ms per image")
    return 0


if __name__ == "__main__":
    sys.exit(main())
