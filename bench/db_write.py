"""The shared database's write rate: labelled batches per second from several writers at once.

Every labelling worker (a local process, a Ray actor) writes its own batches, each in one
transaction (`label.write_batch`: 3 masks as run-length text in original geometry, 1 measurements
row, the run's counts). This bench writes realistic batches (masks of ellipses at 2,000-3,000
px, encoded as labelling encodes them) from K processes at once and prints images, rows and
mask megabytes per second for each K, with the ratio to one writer: the limit that a
cluster's labelling shares.

Usage: python bench/db_write.py --db postgresql+psycopg://user@host/db [--writers 1 2 4] [--batches 20]
       [--encoding rle|png]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time
from pathlib import Path

import cv2
import numpy as np
from sqlalchemy import text

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline import db as D  # noqa: E402
from pipeline.label import Result, write_batch  # noqa: E402
from pipeline.masks import STRUCTURES, EncodedMask  # noqa: E402

BATCH = 64


def masks_of(rng: np.random.Generator, encoding: str = "rle") -> dict[str, EncodedMask]:
    h, w = int(rng.integers(2000, 3000)), int(rng.integers(2000, 3000))
    out = {}
    for i, s in enumerate(STRUCTURES):
        m = np.zeros((h, w), np.uint8)
        centre = (int(w * (0.5 + 0.25 * (i - 1))), int(h * 0.5))
        cv2.ellipse(m, centre, (w // 7, h // 4), 0, 0, 360, 1, -1)
        out[s] = EncodedMask.of(m > 0, encoding)
    return out


def writer(url: str, k: int, batches: int, run_id: int, encoding: str, ready, start) -> None:
    engine = D.connect(url)
    rng = np.random.default_rng(k)
    templates = [masks_of(rng, encoding) for _ in range(8)]
    ready.release()
    start.wait()
    for b in range(batches):
        results = [Result(f"w{k}_{b}_{i}", templates[i % len(templates)],
                          {"ctr": 0.5, "quality": 0.9, "heart_area_px": 1}) for i in range(BATCH)]
        write_batch(engine, results, "bench", run_id)
    engine.dispose()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", required=True)
    ap.add_argument("--writers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--encoding", choices=["rle", "png"], default="rle",
                    help="rle: as labelling stores predicted masks; png: as imports store manual ones")
    args = ap.parse_args(argv)
    engine = D.connect(args.db)
    mask_bytes = sum(m.data.__len__() for m in masks_of(np.random.default_rng(0), args.encoding).values())
    base = None
    print(f"batches of {BATCH} images, ~{mask_bytes / 1e3:.0f} kB of {args.encoding} masks per image, "
          f"{engine.dialect.name}")
    print("| writers | images/s | rows/s | mask MB/s | ratio to one writer |")
    print("|---|---|---|---|---|")
    for k in args.writers:
        with engine.begin() as c:
            for t in ("masks", "measurements", "images"):
                c.execute(text(f"DELETE FROM {t} WHERE uid LIKE :bench"), {"bench": "w%"})
            c.execute(D.images.insert(), [{"uid": f"w{j}_{b}_{i}", "source": "bench", "loaded_at": D.utcnow()}
                                          for j in range(k) for b in range(args.batches) for i in range(BATCH)])
            run_id = c.execute(D.label_runs.insert().values(
                model="bench", selection="bench", started_at=D.utcnow(), n_labelled=0, n_failed=0,
                status="running")).inserted_primary_key[0]
        ready, start = mp.Semaphore(0), mp.Event()
        procs = [mp.Process(target=writer, args=(args.db, j, args.batches, run_id, args.encoding, ready, start))
                 for j in range(k)]
        for p in procs:
            p.start()
        for _ in procs:  # every writer has built its masks and connected
            ready.acquire()
        t = time.perf_counter()
        start.set()
        for p in procs:
            p.join()
        seconds = time.perf_counter() - t
        images = k * args.batches * BATCH
        rate = images / seconds
        base = base or rate
        print(f"| {k} | {rate:.0f} | {rate * 4:.0f} | {rate * mask_bytes / 1e6:.1f} | {rate / base:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
