"""Stage 2: decode catalogued images into the preprocessed cache, in a process pool.

A cache entry is ``(size, size) uint8`` PNG (see :mod:`pipeline.imaging` for the intensity
convention) under ``CACHE_ROOT/<settings id>/``, with its geometry and checksum in the
``cache`` table. Entries are written to a temporary name and renamed, and recorded only
after the rename, so an interrupted run never leaves a half-written entry that is trusted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from sqlalchemy import select
from sqlalchemy.engine import Connection, Engine
from tqdm import tqdm

from pipeline import CxrlabelError, process_pool
from pipeline import db as D
from pipeline.imaging import DecodeError, Geometry, preprocess

log = logging.getLogger(__name__)

PREPROCESS_VERSION = 1  # bump when decoding or resampling changes what lands in the cache
DEFAULT_CACHE = Path("data/cache")


class CacheError(CxrlabelError):
    pass


@dataclass(frozen=True)
class Settings:
    """What determines a cache entry's pixels; its hash namespaces the cache."""

    size: int = 512
    mode: str = "pad"

    @property
    def id(self) -> str:
        blob = json.dumps({"size": self.size, "mode": self.mode, "v": PREPROCESS_VERSION},
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def cache_root(root: str | Path | None = None) -> Path:
    return Path(root or os.environ.get("CXRLABEL_CACHE") or DEFAULT_CACHE)


def entry_path(root: Path, settings: Settings, uid: str) -> Path:
    h = hashlib.sha1(uid.encode()).hexdigest()
    return root / settings.id / h[:2] / f"{h}.png"


@dataclass
class CollectSummary:
    selected: int = 0
    cached: int = 0
    skipped: int = 0
    failed: int = 0


def collect_one(uid: str, source: str, out: str, size: int, mode: str) -> dict:
    """Decode ``source`` and write its cache entry to ``out``; the cache row, or the error.

    Pure function of its arguments: runs in a worker process (or a distributed worker).
    """
    try:
        if not source:
            raise DecodeError(f"{uid}: no source path in the catalogue")
        img, geom = preprocess(source, size, mode)
        ok, buf = cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, 1])
        if not ok:  # pragma: no cover
            raise DecodeError(f"{uid}: PNG encoding failed")
        data = buf.tobytes()
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{out}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, out)
        row = {"uid": uid, "path": out, "checksum": hashlib.sha256(data).hexdigest()}
        row.update(geom.as_row())
        return row
    except Exception as e:  # a bad file is recorded, never stops the run
        return {"uid": uid, "error": type(e).__name__, "message": str(e)}


def _job(args: tuple[str, str, str, int, str]) -> dict:
    return collect_one(*args)


def cached_uids(conn: Connection, settings: Settings, uids: Sequence[str] | None = None) -> set[str]:
    t = D.cache
    q = select(t.c.uid).where(t.c.settings_id == settings.id)
    if uids is None:
        return set(conn.execute(q).scalars())
    found: set[str] = set()
    for i in range(0, len(uids), 900):
        found.update(conn.execute(q.where(t.c.uid.in_(uids[i:i + 900]))).scalars())
    return found


def collect(engine: Engine, items: Sequence[tuple[str, str]], settings: Settings = Settings(),
            root: str | Path | None = None, workers: int | None = None,
            batch_size: int = 256, progress: bool = True) -> CollectSummary:
    """Cache every ``(uid, source path)`` not cached yet under ``settings``; resumable."""
    root = cache_root(root)
    summary = CollectSummary(selected=len(items))
    with engine.connect() as conn:
        done = cached_uids(conn, settings, [u for u, _ in items])
    todo = sorted((u, p) for u, p in items if u not in done)
    summary.skipped = len(items) - len(todo)
    jobs = [(u, p or "", str(entry_path(root, settings, u)), settings.size, settings.mode)
            for u, p in todo]
    bar = tqdm(total=len(jobs), desc="collect", unit="img", disable=not progress)
    for results in _batched(_run(jobs, workers), batch_size):
        _write(engine, settings, results, summary)
        bar.update(len(results))
    bar.close()
    return summary


def _run(jobs: list[tuple], workers: int | None) -> Iterator[dict]:
    workers = workers if workers is not None else min(4, os.cpu_count() or 1)
    if workers <= 1 or len(jobs) < 4:
        yield from map(_job, jobs)
        return
    with process_pool(workers) as pool:
        yield from pool.map(_job, jobs, chunksize=4)


def _batched(it: Iterator[dict], n: int) -> Iterator[list[dict]]:
    batch: list[dict] = []
    for x in it:
        batch.append(x)
        if len(batch) >= n:
            yield batch
            batch = []
    if batch:
        yield batch


def _write(engine: Engine, settings: Settings, results: list[dict], summary: CollectSummary) -> None:
    now = D.utcnow()
    rows = [{**r, "settings_id": settings.id, "created_at": now} for r in results if "error" not in r]
    with engine.begin() as conn:
        D.upsert(conn, D.cache, [_cache_row(r) for r in rows], ["uid", "settings_id"])
        for r in results:
            if "error" in r:
                log.warning("collect %s: %s", r["uid"], r["message"])
                D.record_failure(conn, "collect", r["uid"], r["message"], r["error"])
    summary.cached += len(rows)
    summary.failed += len(results) - len(rows)


def _cache_row(r: dict) -> dict:
    keys = [c.name for c in D.cache.columns]
    return {k: r[k] for k in keys}


def geometry_of(row) -> Geometry:
    """:class:`Geometry` from a ``cache`` row (mapping or Row)."""
    m = row._mapping if hasattr(row, "_mapping") else row
    return Geometry(m["orig_height"], m["orig_width"], m["size"], m["mode"], m["offset_x"],
                    m["offset_y"], m["scale_x"], m["scale_y"])


def read_entry(path: str, checksum: str | None = None) -> np.ndarray:
    """A cache entry as ``(S, S) uint8``; with ``checksum``, verified against it."""
    data = Path(path).read_bytes()
    if checksum and hashlib.sha256(data).hexdigest() != checksum:
        raise CacheError(f"cache entry {path} does not match its checksum: re-run collect")
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise CacheError(f"cache entry {path} is not readable: re-run collect")
    return img


def load_cached(conn: Connection, settings: Settings, uids: Sequence[str]) -> dict[str, tuple]:
    """``{uid: (image (S,S) uint8, Geometry)}`` for cached uids (verified by checksum)."""
    t = D.cache
    out = {}
    for i in range(0, len(uids), 900):
        rows = conn.execute(select(t).where(t.c.settings_id == settings.id,
                                            t.c.uid.in_(uids[i:i + 900])))
        for row in rows:
            out[row.uid] = (read_entry(row.path, row.checksum), geometry_of(row))
    return out
