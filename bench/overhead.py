"""CPU time per image outside the model: what a GPU box's CPUs must keep up with.

On a clinic archive (bench/clinic.py, 512-3000 px DICOMs), cached at the model's size, each
step of `label` that is not the forward pass is timed in this one process, single-threaded,
in CPU milliseconds per image (process time, so it reads as core-ms): reading the cache
entry, the input normalisation, post-processing (clean-up, mapping back to original
geometry, measurements, mask encoding) and the database write. Post-processing is timed
twice in the same run, as labelling ran before (float32 probabilities, masks' zlib at level
6) and as it runs now (uint8 probabilities, zlib level 1): the ratio is the gain.

Usage: python bench/overhead.py [--n 60] [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO))

from clinic import build  # noqa: E402

from pipeline import catalogue as C  # noqa: E402
from pipeline import db as D  # noqa: E402
from pipeline import masks as M  # noqa: E402
from pipeline.collect import Settings, collect, read_cached  # noqa: E402
from pipeline.groups import select_images  # noqa: E402
from pipeline.imaging import model_input  # noqa: E402
from pipeline.label import Item, postprocess, write_batch  # noqa: E402
from pipeline.model import infer, resolve_model  # noqa: E402


def per_image_ms(fn, items) -> float:
    t = time.process_time()
    for it in items:
        fn(it)
    return (time.process_time() - t) / len(items) * 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        build(args.n, tmp / "clinic", args.data)
        engine = D.connect(f"sqlite:///{tmp / 'c.db'}")
        C.load_dicom(engine, tmp / "clinic", workers=2, progress=False)
        with engine.connect() as c:
            chosen = select_images(c, all_images=True)
        lm = resolve_model(engine, "default", "cpu")
        settings = Settings(lm.spec.size, lm.spec.mode)
        collect(engine, chosen.pairs(), settings, tmp / "cache", workers=2, progress=False)
        uids = [it.uid for it in chosen.items]
        with engine.connect() as c:
            entries = read_cached(c, uids, settings)
        items = [Item(u, entries[u].image, entries[u].geom, (0.15, 0.15)) for u in uids]
        probs = {it.uid: infer(lm, [it.image])[0] for it in items}
        quantised = {u: np.round(p * 255).astype(np.uint8) for u, p in probs.items()}
        structures = lm.spec.structures

        def read(_it):
            with engine.connect() as c:
                read_cached(c, [_it.uid], settings)

        steps = {"cache read (one entry, checksum verified)": per_image_ms(read, items),
                 "input normalisation (CLAHE + z-score)": per_image_ms(
                     lambda it: model_input(it.image, lm.spec.norm), items)}
        M.ZLIB_LEVEL = 6
        before = per_image_ms(lambda it: postprocess(it, probs[it.uid], structures), items)
        M.ZLIB_LEVEL = 1
        results = []
        after = per_image_ms(lambda it: results.append(postprocess(it, quantised[it.uid], structures)), items)
        with engine.begin() as c:
            run_id = c.execute(D.label_runs.insert().values(
                model="bench", selection="bench", started_at=D.utcnow(), n_labelled=0, n_failed=0,
                status="running")).inserted_primary_key[0]
        t = time.process_time()
        for i in range(0, len(results), 16):
            write_batch(engine, results[i:i + 16], "bench", run_id)
        steps["database write (batches of 16, SQLite)"] = (time.process_time() - t) / len(results) * 1e3
        steps["post-processing before (float32, zlib 6)"] = before
        steps["post-processing now (uint8, zlib 1)"] = after
        sizes = [r.masks[s].height * r.masks[s].width for r in results for s in structures]
    print(f"{len(items)} images, originals {min(sizes) ** 0.5:.0f}-{max(sizes) ** 0.5:.0f} px a side "
          f"(geometric), model {lm.name} at {lm.spec.size} px, one thread")
    print("| step | CPU ms per image |")
    print("|---|---|")
    for name, ms in steps.items():
        print(f"| {name} | {ms:.2f} |")
    common = sum(v for k, v in steps.items() if not k.startswith("post-processing"))
    print(f"| **outside the model, before** | **{common + before:.2f}** |")
    ratio = (common + after) / (common + before)
    print(f"| **outside the model, now** | **{common + after:.2f}** (ratio {ratio:.2f}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
