"""CPU time per image outside the model: what a GPU box's CPUs must keep up with.

On a clinic archive (bench/clinic.py, 512-3000 px DICOMs), cached at the model's size, each
step of `label` that is not the forward pass is timed in this one process, single-threaded
(OpenCV and torch on one thread), in CPU milliseconds per image (process time, so it reads
as core-ms), on batches as `label` runs them: reading a batch's cache entries (`fetch`,
checksums verified), the input normalisation, post-processing (clean-up, mapping back to
original geometry, measurements, mask encoding) and the database write; apart, what the
model's fitted quality score adds to post-processing (its features, the input check, the
estimates and the worklist's trust: issue 30 asks at most 1 ms). As a baseline in the
same run, post-processing is also timed the direct way: each cleaned structure mapped back
as a full-size array (`Geometry.to_original`, OpenCV's warpAffine) and stored as a 1-bit
PNG; the ratio is the gain.

Usage: python bench/overhead.py [--n 60] [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO))

from clinic import build  # noqa: E402

from pipeline import catalogue as C  # noqa: E402
from pipeline import db as D  # noqa: E402
from pipeline import masks as M  # noqa: E402
from pipeline.collect import Settings, collect, fetch  # noqa: E402
from pipeline.groups import select_images  # noqa: E402
from pipeline.imaging import model_input  # noqa: E402
from pipeline.label import Item, postprocess, write_batch  # noqa: E402
from pipeline.measure import clean, measure  # noqa: E402
from pipeline.model import infer, resolve_model  # noqa: E402

BATCH = 16


def full_size(item: Item, probs: np.ndarray, structures) -> dict:
    """The baseline: each cleaned structure's probabilities mapped back as a full-size array
    and encoded as a PNG, then measured from the arrays."""
    probs = probs.astype(np.float32) / 255
    masks, ring = {}, np.ones((3, 3), np.uint8)
    for i, s in enumerate(structures):
        cleaned, _ = clean(probs[i] > 0.5)
        near = cv2.dilate(cleaned.astype(np.uint8), ring) > 0
        soft = np.where(near, probs[i], 0.0).astype(np.float32)
        soft[cleaned & (soft <= 0.5)] = 0.75
        masks[s] = item.geom.to_original(soft) > 0.5
        M.encode(masks[s])
    return measure(masks, item.spacing)


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
    cv2.setNumThreads(1)  # else process time counts OpenCV's idle threads spinning
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
        pairs = chosen.pairs()
        batches = [pairs[i:i + BATCH] for i in range(0, len(pairs), BATCH)]
        entries = []
        t = time.process_time()
        for batch in batches:
            entries += fetch(engine, batch, settings, tmp / "cache")
        read_ms = (time.process_time() - t) / len(pairs) * 1e3
        items = [Item(e.uid, e.image, e.geom, (0.15, 0.15)) for e in entries]
        probs = {it.uid: infer(lm, [it.image], quantise=True)[0] for it in items}
        structures = lm.spec.structures
        steps = {f"cache read (`fetch`, batches of {BATCH}, checksums verified)": read_ms,
                 "input normalisation (CLAHE + z-score)": per_image_ms(
                     lambda it: model_input(it.image, lm.spec.norm), items)}
        results = []
        after = per_image_ms(lambda it: results.append(postprocess(it, probs[it.uid], structures)), items)
        before = per_image_ms(lambda it: full_size(it, probs[it.uid], structures), items)
        scored = per_image_ms(lambda it: postprocess(it, probs[it.uid], structures, lm.quality), items)
        large = [it for it in items if min(it.geom.orig_height, it.geom.orig_width) >= 2000]
        large_ms = per_image_ms(lambda it: postprocess(it, probs[it.uid], structures), large) if large else None
        with engine.begin() as c:
            run_id = c.execute(D.label_runs.insert().values(
                model="bench", selection="bench", started_at=D.utcnow(), n_labelled=0, n_failed=0,
                status="running")).inserted_primary_key[0]
        t = time.process_time()
        for i in range(0, len(results), BATCH):
            write_batch(engine, results[i:i + BATCH], "bench", run_id)
        steps[f"database write (batches of {BATCH}, SQLite)"] = (time.process_time() - t) / len(results) * 1e3
        steps["post-processing, full-size arrays + PNG (baseline)"] = before
        steps["post-processing, runs + run-length text (labelling)"] = after
        sizes = [r.masks[s].height * r.masks[s].width for r in results for s in structures]
        mask_kb = sum(len(m.data) for r in results for m in r.masks.values()) / len(results) / 1024
    print(f"{len(items)} images, originals {min(sizes) ** 0.5:.0f}-{max(sizes) ** 0.5:.0f} px a side "
          f"(geometric), model {lm.name} at {lm.spec.size} px, one thread; "
          f"stored masks {mask_kb:.1f} kB per image")
    print("| step | CPU ms per image |")
    print("|---|---|")
    for name, ms in steps.items():
        print(f"| {name} | {ms:.2f} |")
    common = sum(v for k, v in steps.items() if not k.startswith("post-processing"))
    print(f"| **outside the model, baseline** | **{common + before:.2f}** |")
    ratio = (common + after) / (common + before)
    print(f"| **outside the model, labelling** | **{common + after:.2f}** (ratio {ratio:.2f}) |")
    print(f"| the shipped quality score, input check and trust (post-processing with the score, minus without) "
          f"| {scored - after:.2f} |")
    if large_ms is not None:
        print(f"| post-processing of the {len(large)} images of 2,000 px a side or more | {large_ms:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
