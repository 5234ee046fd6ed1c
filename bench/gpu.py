"""The GPU table: where a GPU labelling box spends its time, in one run of a few minutes.

Builds a clinic archive of N DICOM files (bench/clinic.py) and a catalogue of ROWS images
pointing at them round-robin, then measures, on the device given (CUDA by default):

* model only: the shipped model over cached images, batch size from `auto_batch_size`,
  mixed precision, copies in and out included;
* a process pool's fixed cost (start and shut down), as `label` pays it once a run;
* `collect` in process, on every core (the decode floor) and on 4 workers;
* `label`, warm cache, warm with `--tta`, and cold from DICOM (a fresh database and cache);
* post-processing: one thread (ms per image), a thread pool and a process pool of every core;
* CPU-vs-device agreement of the labelling output (Dice per structure, CTR);
* training: one optimiser step of `cxr_deep` at 256 px and `unet7_res` at 512 px (batch 8)
  in fp32 and under bf16 autocast, the MONAI augmentation of a batch of 8 on one CPU core,
  and a 2-epoch `train()` of `cxr_deep` on the device with masks written from the shipped
  model's output (the whole loop, validation included), augmenting in the loop and then in
  DataLoader workers.

Needs only the project's own dependencies and a data folder with the shared layout (a small
subset will do: a few GeneralBlockchain images, nih-samples, the two CR DICOMs).

Usage: python bench/gpu.py [--n 240] [--rows 2400] [--data ../shared/data] [--device auto] [--label-only]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO))

from clinic import build  # noqa: E402

import pipeline.compiled  # noqa: E402,F401  (loaded before timing, as labelling's fork server loads it)
from pipeline import catalogue as C  # noqa: E402
from pipeline import db as D  # noqa: E402
from pipeline import masks as M  # noqa: E402
from pipeline import process_pool  # noqa: E402
from pipeline.collect import Settings, collect, read_cached  # noqa: E402
from pipeline.groups import select_images  # noqa: E402
from pipeline.label import Item, LabelOptions, label, postprocess  # noqa: E402
from pipeline.metrics import dice  # noqa: E402
from pipeline.model import auto_batch_size, build_network, infer, resolve_model  # noqa: E402

CORES = os.cpu_count() or 1


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def catalogue(db: Path, archive: Path, rows: int):
    """A catalogue of ``rows`` images over the archive's files, round-robin."""
    engine = D.connect(f"sqlite:///{db}")
    C.load_dicom(engine, archive, workers=CORES, progress=False)
    with engine.connect() as c:
        files = select_images(c, all_images=True).items
    extra = [{"uid": f"r{i:07d}", "source": "bench", "path": files[i % len(files)].path,
              "loaded_at": D.utcnow()} for i in range(max(0, rows - len(files)))]
    for part in D.chunks(extra, 5000):
        with engine.begin() as c:
            c.execute(D.images.insert(), list(part))
    with engine.connect() as c:
        return engine, select_images(c, all_images=True)


def fresh_copy(db: Path, to: Path, keep_cache: bool):
    """A copy of the labelled catalogue ``db`` with its labelling output removed (and its
    cache entries too unless ``keep_cache``), so labelling it again starts afresh."""
    shutil.copy(db, to)
    engine = D.connect(f"sqlite:///{to}")
    with engine.begin() as c:
        for table in ("masks", "measurements", "failures", "label_runs") + (() if keep_cache else ("cache",)):
            c.exec_driver_sql(f"DELETE FROM {table}")
    return engine


def rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=240)
    ap.add_argument("--rows", type=int, default=2400)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--label-only", action="store_true",
                    help="stop after labelling, post-processing and the CPU-vs-device agreement: no training "
                         "sections (a lent device's minutes go to the labelling figures)")
    args = ap.parse_args(argv)
    torch.set_num_threads(CORES)
    lines: list[str] = []

    def row(what: str, value: str) -> None:
        lines.append(f"| {what} | {value} |")
        print(lines[-1], flush=True)

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        t = time.perf_counter()
        build(args.n, tmp / "clinic", args.data)
        engine, chosen = catalogue(tmp / "warm.db", tmp / "clinic", args.rows)
        engine.dispose()  # closes the connections: SQLite folds its WAL into the file we copy
        for copy in ("four.db", "one.db"):  # the same catalogue, nothing cached yet
            shutil.copy(tmp / "warm.db", tmp / copy)
        lm = resolve_model(engine, "default", args.device)
        dev = lm.device
        name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
        print(f"# {name}, {CORES} cores, torch {torch.__version__}; {args.n} files, {len(chosen.items)} rows; "
              f"setup {time.perf_counter() - t:.0f} s", flush=True)
        lines += ["| what | result |", "|---|---|"]
        bs = auto_batch_size(lm)
        settings = Settings(lm.spec.size, lm.spec.mode)
        pairs = chosen.pairs()

        # a process pool's fixed cost (the fork server runs already: `catalogue` started it)
        t = time.perf_counter()
        with process_pool(CORES) as pool:
            list(pool.map(exec, ["import pipeline.label"] * CORES))
            started = time.perf_counter() - t
        row(f"a process pool of {CORES} workers importing `pipeline.label` (as `label`'s do): the fixed cost",
            f"first results after {started:.1f} s, closed after {time.perf_counter() - t:.1f} s")

        # collect: in process (one core), every core (the decode floor), then 4 workers on a quarter
        one_core = D.connect(f"sqlite:///{tmp / 'one.db'}")
        few = pairs[:48]
        t = time.perf_counter()
        collect(one_core, few, settings, tmp / "cache1", workers=1, progress=False)
        row("`collect`, in process (one core)", f"{rate(len(few), time.perf_counter() - t):.1f} img/s")
        t = time.perf_counter()
        collect(engine, pairs, settings, tmp / "cache", workers=CORES, progress=False)
        floor = rate(len(pairs), time.perf_counter() - t)
        row(f"`collect`, {CORES} workers (decode + cache write): the decode floor", f"{floor:.1f} img/s")
        quarter = pairs[: max(8, len(pairs) // 4)]
        four = D.connect(f"sqlite:///{tmp / 'four.db'}")
        t = time.perf_counter()
        collect(four, quarter, settings, tmp / "cache4", workers=4, progress=False)
        row("`collect`, 4 workers", f"{rate(len(quarter), time.perf_counter() - t):.1f} img/s")

        # model only, on cached images
        with engine.connect() as c:
            entries = read_cached(c, [u for u, _ in pairs], settings)
        images = [entries[u].image for u, _ in pairs if u in entries]
        infer(lm, images[:bs], quantise=True)
        sync(dev)
        t = time.perf_counter()
        for i in range(0, len(images), bs):
            infer(lm, images[i:i + bs], quantise=True)
        sync(dev)
        model_only = rate(len(images), time.perf_counter() - t)
        row(f"model only (batch {bs}, mixed precision on CUDA, copies in and out)", f"{model_only:.1f} img/s")

        # label, warm and cold
        t = time.perf_counter()
        s = label(engine, chosen, LabelOptions(model="default", device=args.device, batch_size=bs,
                                               cache_dir=str(tmp / "cache"), workers=CORES,
                                               progress=False))
        warm = rate(s.labelled, time.perf_counter() - t)
        row("`label`, warm cache", f"**{warm:.1f} img/s** ({warm / model_only:.2f} of model only)")
        engine.dispose()
        tta_engine = fresh_copy(tmp / "warm.db", tmp / "tta.db", keep_cache=True)
        t = time.perf_counter()
        s = label(tta_engine, chosen, LabelOptions(model="default", device=args.device, batch_size=bs,
                                                   cache_dir=str(tmp / "cache"), workers=CORES,
                                                   progress=False, tta=True))
        tta = rate(s.labelled, time.perf_counter() - t)
        row("`label --tta`, warm cache (two more passes of the model, for the quality score)",
            f"{tta:.1f} img/s ({tta / warm:.2f} of `label`)")
        cold_db = tmp / "cold.db"
        cold_engine = fresh_copy(tmp / "warm.db", cold_db, keep_cache=False)
        t = time.perf_counter()
        s = label(cold_engine, chosen, LabelOptions(model="default", device=args.device, batch_size=bs,
                                                    cache_dir=str(tmp / "cache_cold"), workers=CORES,
                                                    progress=False))
        cold = rate(s.labelled, time.perf_counter() - t)
        row("`label`, cold from DICOM", f"**{cold:.1f} img/s** ({cold / floor:.2f} of the decode floor); "
            f"70,000 images in {70_000 / cold / 60:.1f} min")

        # post-processing alone
        uids = [u for u, _ in pairs if u in entries][: min(len(entries), 4 * CORES * 8)]
        items = [Item(u, entries[u].image, entries[u].geom) for u in uids]
        probs = [infer(lm, [entries[u].image for u in uids[i:i + bs]], quantise=True)
                 for i in range(0, len(uids), bs)]
        probs = [p for batch in probs for p in batch]
        st = lm.spec.structures
        t = time.process_time()
        for it, p in zip(items[:32], probs[:32], strict=False):
            postprocess(it, p, st)
        one = (time.process_time() - t) / min(32, len(items)) * 1e3
        row("post-processing, one thread", f"{one:.1f} CPU ms per image")
        with ThreadPoolExecutor(CORES) as pool:
            t = time.perf_counter()
            list(pool.map(postprocess, items, probs, [st] * len(items)))
            row(f"post-processing, {CORES} threads", f"{rate(len(items), time.perf_counter() - t):.1f} img/s")
        with process_pool(CORES) as pool:
            list(pool.map(postprocess, items[:CORES], probs[:CORES], [st] * CORES))  # start the workers
            t = time.perf_counter()
            list(pool.map(postprocess, items, probs, [st] * len(items), chunksize=4))
            row(f"post-processing, {CORES} processes", f"{rate(len(items), time.perf_counter() - t):.1f} img/s")

        # agreement: CPU against the device, through the whole labelling output
        if dev.type == "cuda":
            cpu = resolve_model(None, "default", "cpu")
            agree: dict[str, list[float]] = {s: [] for s in st}
            ctr_diff = []
            for u in uids[:48]:
                a = postprocess(Item(u, entries[u].image, entries[u].geom), infer(lm, [entries[u].image])[0], st)
                b = postprocess(Item(u, entries[u].image, entries[u].geom), infer(cpu, [entries[u].image])[0], st)
                for s in st:
                    agree[s].append(dice(a.masks[s].decode(), b.masks[s].decode()))
                if a.measurements["ctr"] is not None and b.measurements["ctr"] is not None:
                    ctr_diff.append(abs(a.measurements["ctr"] - b.measurements["ctr"]))
            row("CPU vs CUDA labelling output, 48 images", ", ".join(
                f"{s} Dice min {min(v):.4f}" for s, v in agree.items()) + f"; CTR max diff {max(ctr_diff):.4f}")

        if args.label_only:
            if args.out:
                args.out.write_text("\n".join(lines) + "\n")
            return 0

        # training: step times, augmentation, and the whole loop on the device
        from pipeline.train import TrainConfig, train
        from pipeline.train.data import augmentation
        from pipeline.train.losses import seg_loss
        for preset, size in (("cxr_deep", 256), ("unet7_res", 512)):
            cfg = TrainConfig.from_preset(preset, size=size)
            net = build_network(cfg.spec()).to(dev)
            opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
            x = torch.randn(8, 1, size, size, device=dev)
            y = (torch.rand(8, 3, size, size, device=dev) > 0.5).float()
            valid = torch.ones(8, 3, dtype=torch.bool, device=dev)
            step_ms = {}
            for amp in (False, True):  # fp32, then bf16 autocast: does mixed precision pay here?
                for step in range(13):
                    if step == 3:
                        sync(dev)
                        t = time.perf_counter()
                    with torch.autocast(dev.type, torch.bfloat16, enabled=amp):
                        loss = seg_loss(net(x), y, valid)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                sync(dev)
                step_ms[amp] = (time.perf_counter() - t) / 10 * 1e3
            aug = augmentation(cfg)
            img = np.random.default_rng(0).random((1, size, size), dtype=np.float32)
            mask = np.zeros((3, size, size), np.float32)
            torch.set_num_threads(1)
            t = time.perf_counter()
            for _ in range(8):
                aug({"image": img, "mask": mask})
            aug_ms = (time.perf_counter() - t) * 1e3
            torch.set_num_threads(CORES)
            row(f"training step, {preset} at {size} px, batch 8", f"fp32 {step_ms[False]:.1f} ms, bf16 autocast "
                f"{step_ms[True]:.1f} ms on the device; augmenting the batch on one CPU core {aug_ms:.0f} ms")
        masks_engine = D.connect(f"sqlite:///{cold_db}")
        with masks_engine.connect() as c:
            labelled = c.exec_driver_sql(
                "SELECT uid, structure, data, encoding, height, width FROM masks WHERE kind = 'predicted' "
                "AND uid IN (SELECT uid FROM images WHERE source = 'dicom') ORDER BY uid LIMIT 96").all()
        with masks_engine.begin() as c:
            D.upsert(c, D.masks, [M.mask_row(u, s, M.decode(d, e, (h, w)), "manual") for u, s, d, e, h, w in labelled],
                     M.MASK_KEYS)
        cfg = TrainConfig.from_preset("cxr_deep", epochs=2, size=lm.spec.size)
        took = {}
        for workers in (0, None):  # augmenting in the loop, then in DataLoader workers (the default)
            t = time.perf_counter()
            r = train(masks_engine, cfg, tmp / f"run{workers}", str(tmp / "cache_cold"), args.device,
                      progress=False, workers=workers)
            took[workers] = time.perf_counter() - t
        row(f"`train()` on {dev.type}: cxr_deep, {lm.spec.size} px, 2 epochs, {len(labelled) // 3} images "
            "(masks from the shipped model)", f"augmenting in the loop {took[0]:.1f} s, in loader workers "
            f"{took[None]:.1f} s ({took[0] / took[None]:.1f}x); validation Dice heart {r.dice['heart']:.3f}")
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
