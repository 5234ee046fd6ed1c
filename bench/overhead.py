"""CPU time per image of every step of a labelling batch: where `label`'s time goes.

On a clinic archive (bench/clinic.py, 512-3000 px DICOMs), cached at the model's size, each
step of a batch is timed in this one process, single-threaded (NumPy's BLAS, OpenCV and torch
on one thread each, as a labelling worker runs), in CPU milliseconds per image (process time,
so it reads as core-ms), on batches of 16 as `label` runs them; each the best of five runs (the
machine's pace moves minute to minute; the model's pass and the load: one run):

- load: the cache read (`fetch`, checksums verified), the
  film turned upright, its collimator's rim, the thumbnail the input check compares, the
  calibration and header check, then the model's fix-ups and input normalisation;
- the model's forward pass (for scale: one thread here; `label` gives it every core);
- on a GPU, the hand-over of a post-processing task to a worker process (pickling the films,
  their probabilities and the quality score there, and unpickling them);
- post-processing, step by step: clean-up, the compiled pass that keeps the
  probabilities near each cleaned structure and reads its features, the
  runs of the masks at original size, their run-length text, the measurements, the atlas fit,
  the heart's border, the score and the trust, the input check's look and its verdict, and
  the rest (what `postprocess` does between them);
- the database write (SQLite, one transaction a batch) and the progress bar.

Each step is also timed with its neighbours inside `postprocess` (wrapping adds a little:
the sum of the parts reads slightly above the whole, which is timed unwrapped). The table
says where each step runs: on a CPU a stream (a process with its own copy of the model)
loads a batch, runs the model and post-processes it, one after the other on its core, and
the labelling process writes the results beside the streams, so every step costs the run
its CPU time; on a GPU everything but the model runs behind it and limits only when the
CPUs cannot keep up. As a baseline in the same run, post-processing is also timed
the direct way: each cleaned structure mapped back as a full-size array and encoded as a
PNG; the ratio is the gain.

Goal (issue 40): outside the model, post-processing, the score, the input check, the trust,
the encoding and the write together <= 3 CPU ms per image on one core.

Usage: python bench/overhead.py [--n 60] [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import io
import pickle
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch
from threadpoolctl import threadpool_limits
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO))

from clinic import build  # noqa: E402

import pipeline.compiled  # noqa: E402,F401  (loaded before timing, as labelling's fork server loads it)
from pipeline import catalogue as C  # noqa: E402
from pipeline import db as D  # noqa: E402
from pipeline import imaging  # noqa: E402
from pipeline import masks as M  # noqa: E402
from pipeline.collect import Settings, collect  # noqa: E402
from pipeline.groups import select_images  # noqa: E402
from pipeline.label import batch as B  # noqa: E402
from pipeline.label import postprocess, write_batch  # noqa: E402
from pipeline.measure import clean, measure  # noqa: E402
from pipeline.model import infer, inference, model_inputs, resolve_model  # noqa: E402
from pipeline.quality import features as F  # noqa: E402
from pipeline.quality import inputs as I  # noqa: E402

BATCH = 16
GOAL_MS = 3.0

# where each step runs in the local loop: on a CPU (pipeline.label.run._streams), on a GPU
CPU_LOAD, GPU_LOAD = "a stream, before its model pass", "loader threads, behind the model"
CPU_POST, GPU_POST = "a stream, after its model pass", "worker processes, behind the model"
CPU_WRITE, GPU_WRITE = "the labelling process, beside the streams", "writer thread, behind the model"


class Steps:
    """Process time spent in named functions, wrapped in place for the bench's run."""

    def __init__(self) -> None:
        self.ms: Counter[str] = Counter()
        self._undo: list[tuple[object, str, object]] = []

    def wrap(self, owner: object, attr: str, name: str) -> None:
        original = owner.__dict__[attr] if isinstance(owner, type) else getattr(owner, attr)
        fn = original.__func__ if isinstance(original, classmethod | staticmethod) else original

        def timed(*args, **kwargs):
            t = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.ms[name] += (time.process_time() - t) * 1e3

        setattr(owner, attr, classmethod(timed) if isinstance(original, classmethod) else timed)
        self._undo.append((owner, attr, original))

    def restore(self) -> None:
        for owner, attr, original in reversed(self._undo):
            setattr(owner, attr, original)
        self._undo.clear()


REPEAT = 5  # each timing is the best of this many runs: the machine's pace moves minute to minute


def per_image_ms(fn: Callable[[], object], n: int, repeat: int = REPEAT) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.process_time()
        fn()
        best = min(best, time.process_time() - t)
    return best / n * 1e3


def full_size(item: B.Item, probs: np.ndarray, structures) -> dict:
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cv2.setNumThreads(1)  # else process time counts OpenCV's idle threads spinning
    threadpool_limits(1)  # ... and OpenBLAS's (a labelling worker's setting, pipeline._one_thread)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        build(args.n, tmp / "clinic", args.data)
        engine = D.connect(f"sqlite:///{tmp / 'c.db'}")
        C.load_dicom(engine, tmp / "clinic", workers=2, progress=False)
        with engine.connect() as c:
            chosen = select_images(c, all_images=True)
        lm = resolve_model(engine, "default", "cpu")
        scorer, structures = lm.quality, lm.spec.structures
        settings = Settings(lm.spec.size, lm.spec.mode)
        collect(engine, chosen.pairs(), settings, tmp / "cache", workers=2, progress=False)
        chunks = [chosen.items[i:i + BATCH] for i in range(0, len(chosen.items), BATCH)]
        n = len(chosen.items)

        steps = Steps()
        for owner, attr, name in [(B, "fetch", "cache read (`fetch`, checksums verified)"),
                                  (B, "upright", "film turned upright (`upright`)"),
                                  (B, "collimation_rim", "collimator's rim"),
                                  (B, "thumbnail", "thumbnail for the input check"),
                                  (B, "calibrate", "calibration and header check"),
                                  (B, "header_check", "calibration and header check"),
                                  (inference, "fixed_up", "fix-ups (rim filled, noise smoothed)"),
                                  (inference, "model_input", "input normalisation (CLAHE + z-score)")]:
            steps.wrap(owner, attr, name)
        loaded: list[tuple[list[B.Item], np.ndarray]] = []
        for chunk in chunks:
            items, _ = B.load_batch(engine, chunk, settings, str(tmp / "cache"), None, lm.spec.fixups)
            loaded.append((items, model_inputs([it.image for it in items], lm.spec, [it.rim_box for it in items])))
        steps.restore()
        load = {k: v / n for k, v in steps.ms.items()}
        items = [it for batch, _ in loaded for it in batch]

        infer(lm, [it.image for it in loaded[0][0][:2]], quantise=True)  # warm-up
        batch_probs: list[np.ndarray] = []
        model_ms = per_image_ms(lambda: batch_probs.extend(
            infer(lm, [it.image for it in batch], quantise=True, inputs=x) for batch, x in loaded), n, 1)
        probs = [p for batch in batch_probs for p in batch]

        def hand_over() -> None:
            for (batch, _), p in zip(loaded, batch_probs, strict=True):
                for i in range(0, len(batch), BATCH // 2):  # a task a worker, two workers
                    pickle.loads(pickle.dumps((batch[i:i + BATCH // 2], p[i:i + BATCH // 2], structures, scorer)))
        hand_over_ms = per_image_ms(hand_over, n)

        whole = per_image_ms(lambda: [postprocess(it, p, structures, scorer) for it, p in zip(items, probs,
                                                                                              strict=True)], n)
        for owner, attr, name in [(B, "clean", "clean-up (largest component, holes filled)"),
                                  (pipeline.compiled, "clean_window", "cleaned probabilities and features (compiled)"),
                                  (imaging.Geometry, "runs_above", "mask runs at original size"),
                                  (M.EncodedMask, "from_runs", "run-length text"),
                                  (B, "measure_boxes", "measurements (CTR, widths, boxes)"),
                                  (F.Atlas, "fit", "atlas fit"),
                                  (B.Q, "heart_border", "the heart's border (heart_border)"),
                                  (B.Q, "score_image", "quality score and trust"),
                                  (I.Appearance, "look", "input check: the film's look"),
                                  (B, "check_input", "input check: verdict")]:
            steps.wrap(owner, attr, name)
        post: dict[str, float] = {}
        parts = float("inf")
        for _ in range(REPEAT):  # each step's best run
            steps.ms.clear()
            parts = min(parts, per_image_ms(lambda: [postprocess(it, p, structures, scorer)
                                                     for it, p in zip(items, probs, strict=True)], n, 1))
            post = {k: min(v / n, post.get(k, float("inf"))) for k, v in steps.ms.items()}
        steps.restore()
        post["the rest of post-processing"] = max(parts - sum(post.values()), 0.0)

        results = [postprocess(it, p, structures, scorer) for it, p in zip(items, probs, strict=True)]
        baseline = per_image_ms(lambda: [full_size(it, p, structures) for it, p in zip(items, probs, strict=True)],
                                n)
        with engine.begin() as c:
            run_id = c.execute(D.label_runs.insert().values(
                model="bench", selection="bench", started_at=D.utcnow(), n_labelled=0, n_failed=0,
                status="running")).inserted_primary_key[0]
        write_ms = per_image_ms(lambda: [write_batch(engine, results[i:i + BATCH], "bench", run_id)
                                         for i in range(0, len(results), BATCH)], n)
        bar = tqdm(total=n, file=io.StringIO(), mininterval=0)
        progress_ms = per_image_ms(lambda: [bar.update(len(results[i:i + BATCH]))
                                            for i in range(0, len(results), BATCH)], n)
        bar.close()
        sizes = [it.geom.orig_height * it.geom.orig_width for it in items]
        mask_kb = sum(len(m.data) for r in results for m in r.masks.values()) / len(results) / 1024
        large = [i for i, it in enumerate(items) if min(it.geom.orig_height, it.geom.orig_width) >= 2000]
        large_ms = per_image_ms(lambda: [postprocess(items[i], probs[i], structures, scorer) for i in large],
                                len(large)) if large else None

    print(f"{n} images, originals {min(sizes) ** 0.5:.0f}-{max(sizes) ** 0.5:.0f} px a side (geometric), "
          f"model {lm.name} at {lm.spec.size} px, batches of {BATCH}, one thread each; "
          f"stored masks {mask_kb:.1f} kB per image")
    print("| step | CPU ms per image | on a CPU | on a GPU |")
    print("|---|---|---|---|")
    for name, ms in load.items():
        print(f"| {name} | {ms:.2f} | {CPU_LOAD} | {GPU_LOAD} |")
    print(f"| **load, in all** | **{sum(load.values()):.2f}** | | |")
    print(f"| model forward pass (one thread) | {model_ms:.2f} | a stream, one thread | the GPU |")
    print(f"| hand-over of a task to a worker (pickle + unpickle) | {hand_over_ms:.2f} "
          f"| none: the stream post-processes its own | the model loop, then a worker |")
    for name, ms in post.items():
        print(f"| {name} | {ms:.2f} | {CPU_POST} | {GPU_POST} |")
    print(f"| **post-processing, in all (timed unwrapped)** | **{whole:.2f}** | | |")
    print(f"| database write (SQLite, a transaction a batch) | {write_ms:.2f} | {CPU_WRITE} | {GPU_WRITE} |")
    print(f"| progress bar | {progress_ms:.3f} | {CPU_WRITE} | {GPU_WRITE} |")
    outside = whole + write_ms + hand_over_ms + progress_ms
    verdict = "meets" if outside <= GOAL_MS else "misses"
    print(f"| **outside the model and the load: post-processing, score, check, trust, encoding, hand-over, "
          f"write** | **{outside:.2f}** ({verdict} the goal <= {GOAL_MS:.0f}) | | |")
    print(f"| post-processing the direct way: full-size arrays + PNG (baseline) | {baseline:.2f} "
          f"(labelling's is {whole / baseline:.2f} of it) | | |")
    if large_ms is not None:
        print(f"| post-processing of the {len(large)} images of 2,000 px a side or more | {large_ms:.2f} | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
