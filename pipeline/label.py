"""Stage 4: batch labelling into the database, resumably.

Flow per batch: load cached images (collecting missing ones on the fly) -> one forward
pass -> post-processing and measurements per image -> one transaction that writes masks,
measurements and the run's counts. A re-run skips images the same model already
measured, so after a crash (even ``kill -9``) every image ends labelled exactly once.

:func:`forward` is a pure function of (model, batch), :func:`postprocess` of (image,
probabilities) and :func:`write_batch` of (engine, results): no global state, so a
distributed engine's workers can run them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
from sqlalchemy import select, update
from sqlalchemy.engine import Engine
from tqdm import tqdm

from pipeline import CxrlabelError, process_pool
from pipeline import db as D
from pipeline import masks as M
from pipeline.collect import Settings, cache_root, collect_one, entry_path, geometry_of, read_entry
from pipeline.imaging import Geometry, model_input
from pipeline.measure import bbox, clean, measure_boxes, quality
from pipeline.train import TrainConfig, load_checkpoint, predict

log = logging.getLogger(__name__)

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "models" / "default" / "model.pt"


class LabelError(CxrlabelError):
    pass


@dataclass
class LoadedModel:
    name: str
    path: Path
    sha256: str
    model: torch.nn.Module
    cfg: TrainConfig
    device: torch.device


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise LabelError("--device cuda: no CUDA GPU visible; use --device auto or cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise LabelError(f"--device {device!r}: use auto, cpu or cuda")
    return torch.device(device)


def resolve_model(engine: Engine, ref: str = "default", device: str = "auto") -> LoadedModel:
    """``default`` (the shipped model), a name in the ``models`` table, or a checkpoint path."""
    if ref == "default":
        path, name = DEFAULT_MODEL, "default"
    elif Path(ref).suffix == ".pt" or Path(ref).exists():
        path, name = Path(ref), Path(ref).stem if Path(ref).stem not in ("best", "model") \
            else Path(ref).parent.name
    else:
        with engine.connect() as conn:
            row = conn.execute(select(D.models.c.path).where(D.models.c.name == ref)).first()
        if row is None:
            raise LabelError(f"model {ref!r} is neither 'default', a registered model nor a "
                             "checkpoint file: see `cxrlabel models list`")
        path, name = Path(row.path), ref
    if not path.exists():
        raise LabelError(f"checkpoint {path} not found" + (
            " (the shipped default lives in models/default/; reinstall or run `make train`)"
            if ref == "default" else ""))
    dev = pick_device(device)
    model, cfg, _ = load_checkpoint(path, dev)
    if dev.type == "cpu":
        model = model.to(memory_format=torch.channels_last)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    return LoadedModel(name, path, sha, model, cfg, dev)


# ---------------------------------------------------------------- pure per-batch work


@dataclass
class Item:
    uid: str
    image: np.ndarray  # (S, S) uint8 cache entry
    geom: Geometry
    spacing: tuple[float | None, float | None] = (None, None)
    cache_row: dict | None = None  # set when collected on the fly: written with the batch


@dataclass
class Result:
    uid: str
    masks: dict[str, M.EncodedMask] = field(default_factory=dict)  # original geometry
    measurements: dict = field(default_factory=dict)
    cache_row: dict | None = None
    error: str | None = None


def postprocess(item: Item, probs: np.ndarray, structures: Sequence[str]) -> Result:
    """``(C, S, S)`` probabilities of one image -> masks in original geometry + measurements.

    Each structure is mapped back only inside its box: the full-size masks (up to 3000 x
    3000 pixels each) are never built, only encoded from the crops.
    """
    cleaned, kept, boxes, encoded = {}, {}, {}, {}
    ring = np.ones((3, 3), np.uint8)
    shape = (item.geom.orig_height, item.geom.orig_width)
    heart_area = None
    for i, s in enumerate(structures):
        cleaned[s], kept[s] = clean(probs[i] > 0.5)
        # map the probabilities (not the binary mask) back, so the boundary keeps its
        # sub-pixel position; limited to the kept component and with its holes filled
        near = cv2.dilate(cleaned[s].astype(np.uint8), ring) > 0
        soft = np.where(near, probs[i], 0.0).astype(np.float32)
        soft[cleaned[s] & (soft <= 0.5)] = 0.75
        (rows, cols), crop = item.geom.to_original_crop(soft, bbox(near) or (0, 0, -1, -1))
        crop = crop > 0.5
        box = bbox(crop)
        boxes[s] = box and (box[0] + cols.start, box[1] + rows.start, box[2] + cols.start, box[3] + rows.start)
        # encoded here, in the worker thread, so the writer only talks to the database
        encoded[s] = M.EncodedMask.of(crop, (rows.start, cols.start), shape)
        if s == "heart":
            heart_area = encoded[s].area
    values = measure_boxes(boxes, heart_area, item.spacing)
    values["quality"] = quality(probs, cleaned, kept, values["ctr"], tuple(structures))
    return Result(item.uid, encoded, values, item.cache_row)


def forward(lm: LoadedModel, items: Sequence[Item]) -> np.ndarray:
    """``(B, C, S, S)`` probabilities of one batch (CPU numpy)."""
    x = torch.from_numpy(np.stack([model_input(it.image, lm.cfg.norm) for it in items]))
    if lm.device.type == "cuda":
        x = x.pin_memory()  # lets the copy overlap with the previous batch's kernels
    x = x.to(lm.device, non_blocking=True)
    if lm.device.type == "cpu":
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", enabled=lm.device.type == "cuda"):
        return predict(lm.model, x, lm.cfg.roi).float().cpu().numpy()


def write_batch(engine: Engine, results: Sequence[Result], model: str, run_id: int,
                settings_id: str) -> None:
    """Masks, measurements, on-the-fly cache rows and run counts: one transaction."""
    now = D.utcnow()
    mask_rows, meas_rows, cache_rows = [], [], []
    for r in results:
        if r.error:
            continue
        for s, m in r.masks.items():
            mask_rows.append(M.mask_row(r.uid, s, m, "predicted", model, run_id))
        meas_rows.append({"uid": r.uid, "model": model, "run_id": run_id, "labelled_at": now,
                          **r.measurements})
        if r.cache_row:
            cache_rows.append({**r.cache_row, "settings_id": settings_id, "created_at": now})
    failed = [r for r in results if r.error]
    with engine.begin() as conn:
        if cache_rows:
            D.upsert(conn, D.cache, cache_rows, ["uid", "settings_id"])
        D.upsert(conn, D.masks, mask_rows, M.MASK_KEYS)
        D.upsert(conn, D.measurements, meas_rows, ["uid", "model"])
        for r in failed:
            D.record_failure(conn, "label", r.uid, r.error or "", "LabelError")
        runs = D.label_runs
        conn.execute(update(runs).where(runs.c.id == run_id).values(
            n_labelled=runs.c.n_labelled + len(meas_rows), n_failed=runs.c.n_failed + len(failed)))


# ---------------------------------------------------------------- the loop


@dataclass
class LabelSummary:
    run_id: int
    model: str
    selected: int
    labelled: int
    skipped: int
    failed: int
    device: str


def _done(engine: Engine, model: str, uids: Sequence[str]) -> set[str]:
    t = D.measurements
    found: set[str] = set()
    with engine.connect() as conn:
        for i in range(0, len(uids), 900):
            found.update(conn.execute(select(t.c.uid).where(
                t.c.model == model, t.c.uid.in_(uids[i:i + 900]))).scalars())
    return found


def _image_facts(engine: Engine, uids: Sequence[str], settings: Settings) -> tuple[dict, dict]:
    """Cache rows and pixel spacing of one batch's uids."""
    with engine.connect() as conn:
        cached = {row.uid: dict(row._mapping) for row in conn.execute(select(D.cache).where(
            D.cache.c.settings_id == settings.id, D.cache.c.uid.in_(list(uids))))}
        spacing = {uid: (sx, sy) for uid, sx, sy in conn.execute(select(
            D.images.c.uid, D.images.c.spacing_x, D.images.c.spacing_y).where(
            D.images.c.uid.in_(list(uids))))}
    return cached, spacing


def auto_batch_size(lm: LoadedModel) -> int:
    """CPU: 16 (batching buys little there). CUDA: the largest power of two, up to 256,
    whose forward pass fits in half of the free memory."""
    if lm.device.type != "cuda":
        return 16
    free, _ = torch.cuda.mem_get_info(lm.device)
    size = lm.cfg.size
    batch = 256
    while batch > 1:
        try:
            torch.cuda.reset_peak_memory_stats(lm.device)
            with torch.inference_mode(), torch.autocast("cuda"):
                lm.model(torch.zeros(batch, 1, size, size, device=lm.device))
            if torch.cuda.max_memory_allocated(lm.device) < free * 0.5:
                return batch
        except torch.cuda.OutOfMemoryError:
            pass
        torch.cuda.empty_cache()
        batch //= 2
    return 1


def label(engine: Engine, items: Sequence[tuple[str, str | None]], model: str = "default",
          device: str = "auto", batch_size: int | None = None, selection: str = "",
          cache_dir: str | None = None, workers: int | None = None,
          progress: bool = True) -> LabelSummary:
    """Label ``(uid, source path)`` items not yet labelled by ``model``.

    Torch's CPU thread count is the caller's to set (the CLI's ``--threads``, or a Ray
    worker's setup): this function changes no process-wide state.
    """
    lm = resolve_model(engine, model, device)
    settings = Settings(lm.cfg.size, lm.cfg.mode)
    uids = [u for u, _ in items]
    done = _done(engine, lm.name, uids)
    todo = sorted((u, p) for u, p in items if u not in done)
    bs = batch_size or auto_batch_size(lm)
    with engine.begin() as conn:
        run_id = conn.execute(D.label_runs.insert().values(
            model=lm.name, model_sha256=lm.sha256, selection=selection, device=str(lm.device),
            host=socket.gethostname(), started_at=D.utcnow(), n_selected=len(items),
            n_labelled=0, n_skipped=len(done), n_failed=0, status="running")).inserted_primary_key[0]
    status = "failed"
    try:
        root = cache_root(cache_dir)
        bar = tqdm(total=len(todo), desc=f"label {lm.name}", unit="img", disable=not progress)
        structures = lm.cfg.structures

        def finish(n: int, futures: list[Future], errors: list[Result]) -> None:
            results = [f.result() for f in futures]
            write_batch(engine, results + errors, lm.name, run_id, settings.id)
            bar.update(len(results) + len(errors))
            log.info("run %d: batch %d written (%d images)", run_id, n, len(results))

        cores = os.cpu_count() or 2  # a GPU box needs many CPU hands to keep the GPU fed
        with ThreadPoolExecutor(2) as loaders, ThreadPoolExecutor(cores) as post, \
                process_pool(workers or cores) as procs:
            # On a GPU, batch n's post-processing runs on the CPU while batch n + 1 is in the
            # model. On a CPU the model already takes every core: overlapping only makes the
            # two compete (measured: 0.50 vs 0.58 of model-only throughput on 2 cores).
            overlap = lm.device.type == "cuda"
            pending: tuple[int, list[Future], list[Result]] | None = None
            batches = _prefetch(engine, todo, bs, settings, root, loaders, procs)
            for n, (items_, errors) in enumerate(batches, start=1):
                probs = forward(lm, items_) if items_ else None
                futures = [post.submit(postprocess, it, probs[i], structures) for i, it in enumerate(items_)]
                if pending:
                    finish(*pending)
                pending = (n, futures, errors)
                if not overlap:
                    finish(*pending)
                    pending = None
            if pending:
                finish(*pending)
        bar.close()
        status = "done"
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        with engine.begin() as conn:
            conn.execute(update(D.label_runs).where(D.label_runs.c.id == run_id).values(
                ended_at=D.utcnow(), status=status))
    with engine.connect() as conn:
        row = conn.execute(select(D.label_runs).where(D.label_runs.c.id == run_id)).one()
    return LabelSummary(run_id, lm.name, len(items), row.n_labelled, len(done), row.n_failed,
                        str(lm.device))


def _load_one(uid: str, path: str | None, cached: dict, spacing: dict, settings: Settings,
              root: Path, procs: ProcessPoolExecutor) -> Future:
    """A future of Item (cached entry) or Result with error (decoding failed)."""
    row = cached.get(uid)
    sp = spacing.get(uid, (None, None))
    if row is not None:
        fut: Future = Future()
        try:
            fut.set_result(Item(uid, read_entry(row["path"], row["checksum"]), geometry_of(row), sp))
        except Exception as e:  # corrupted entry: re-collect below
            log.warning("%s: %s", uid, e)
            row = None
        else:
            return fut
    out = str(entry_path(root, settings, uid))
    return procs.submit(_collect_item, uid, path or "", out, settings.size, settings.mode, sp)


def _collect_item(uid: str, path: str, out: str, size: int, mode: str, sp) -> Item | Result:
    row = collect_one(uid, path, out, size, mode)
    if "error" in row:
        return Result(uid, error=f"{row['error']}: {row['message']}")
    image = read_entry(out, row["checksum"])
    return Item(uid, image, geometry_of(row), sp, row)


def _prefetch(engine, todo, bs, settings, root, threads, procs
              ) -> Iterator[tuple[list[Item], list[Result]]]:
    """Batches whose images load (and decode) while the previous batch runs the model.

    Each batch looks up its own cache rows, so memory does not grow with the selection.
    """
    def gather(chunk):
        cached, spacing = _image_facts(engine, [u for u, _ in chunk], settings)
        futs = [_load_one(u, p, cached, spacing, settings, root, procs) for u, p in chunk]
        out = [f.result() for f in futs]
        return [x for x in out if isinstance(x, Item)], [x for x in out if isinstance(x, Result)]

    chunks = [todo[i:i + bs] for i in range(0, len(todo), bs)]
    ahead: list[Future] = [threads.submit(gather, c) for c in chunks[:2]]
    for i in range(len(chunks)):
        current = ahead.pop(0)
        if i + 2 < len(chunks):
            ahead.append(threads.submit(gather, chunks[i + 2]))
        yield current.result()

