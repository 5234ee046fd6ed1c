"""Stage 2: the preprocessed image cache, and its only owner.

A cache entry is a ``(size, size) uint8`` array in NumPy's ``.npy`` format (see
:mod:`pipeline.imaging` for the intensity convention) under ``CACHE_ROOT/<settings id>/``,
with its geometry and checksum in the ``cache`` table. Entries are uncompressed, as nnU-Net
unpacks its preprocessed data: a GPU box reads them in a tenth of the CPU time a PNG takes
to decode (0.6 ms for 256 px), for under twice the bytes. PNG entries written by earlier
versions are still read. Entries are written to a temporary name and renamed, and recorded only
after the rename, so an interrupted run never leaves a half-written entry that is trusted.

* :func:`collect` fills the cache for a selection (the ``collect`` command).
* :func:`fetch` gives one batch's entries, images and geometry, or each image's failure,
  collecting missing or damaged entries on the fly: what labelling and training read.
* :func:`read_cached` reads entries that exist (reports).

Nothing else writes ``cache`` rows or entry files.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from sqlalchemy import select
from sqlalchemy.engine import Connection, Engine
from tqdm import tqdm

from pipeline import CxrlabelError, process_pool
from pipeline import db as D
from pipeline.imaging import DECODE_TIMEOUT, DecodeError, Geometry, deadline, preprocess
from pipeline.pacs.client import PacsUnreachable
from pipeline.pacs.fetch import environment, fetch_to, is_remote, use_environment

log = logging.getLogger(__name__)

# errors of the cache folder itself (full, read-only, forbidden): every entry would fail the
# same way, so the run stops at the first one instead of recording one failure per image
CACHE_FOLDER_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}
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


@dataclass
class Entry:
    """One image as the model sees it: ``(S, S) uint8`` and its map to the original."""

    uid: str
    image: np.ndarray
    geom: Geometry


@dataclass
class Failure:
    """An image that could not be cached, and why (``error_class``: e.g. DecodeError)."""

    uid: str
    error_class: str
    message: str


@dataclass
class CollectSummary:
    selected: int = 0
    cached: int = 0
    skipped: int = 0
    failed: int = 0
    rebuilt: int = 0  # entries found broken (missing, truncated, or not matching the checksum)


def cache_root(root: str | Path | None = None) -> Path:
    return Path(root or os.environ.get("CXRLABEL_CACHE") or DEFAULT_CACHE)


def entry_path(root: Path, settings: Settings, uid: str) -> Path:
    h = hashlib.sha1(uid.encode()).hexdigest()
    return root / settings.id / h[:2] / f"{h}.npy"


# ---------------------------------------------------------------- one image (any process)


def collect_one(uid: str, source: str, out: str, size: int, mode: str, keep_image: bool = False) -> dict:
    """Decode ``source`` and write its cache entry to ``out``: the cache row (with the
    ``image`` itself when ``keep_image``), or ``{"uid", "error", "message"}`` (plus
    ``"fatal": True`` when the cache folder itself cannot be written).

    Pure function of its arguments: runs in a worker process (or a distributed worker).
    """
    staged = None
    try:
        if not source:
            raise DecodeError(f"{uid}: no source path in the catalogue")
        if is_remote(source):  # a PACS instance: fetched as stored beside its entry, decoded as a file
            staged = fetch_to(source, f"{out}.dcm")
            source = str(staged)
        with deadline(DECODE_TIMEOUT, source):
            img, geom = preprocess(source, size, mode)
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(img, np.uint8), allow_pickle=False)
    except PacsUnreachable as e:  # every other instance would wait out the same retries: stop the run
        return {"uid": uid, "error": "PacsUnreachable", "fatal": True, "message": str(e)}
    except Exception as e:  # a bad file is recorded, never stops the run
        return {"uid": uid, "error": type(e).__name__, "message": str(e)}
    finally:
        if staged is not None:
            with contextlib.suppress(OSError):
                os.remove(staged)
    data = buf.getvalue()
    tmp = f"{out}.tmp{os.getpid()}"
    try:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, out)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        fatal = e.errno in CACHE_FOLDER_ERRORS
        return {"uid": uid, "error": "CacheWriteError", "fatal": fatal,
                "message": f"cannot write the cache entry {out}: {e.strerror or e}"}
    row: dict[str, Any] = {"uid": uid, "path": out, "checksum": hashlib.sha256(data).hexdigest(),
                           "bytes": len(data), **geom.as_row()}
    if keep_image:
        row["image"] = img
    return row


def _job(args: tuple) -> dict:
    """One decode in a worker; a PACS instance's job carries the caller's PACS settings last."""
    if len(args) > 6:
        use_environment(args[6])
        args = args[:6]
    return collect_one(*args)


def decoder_pool(workers: int | None, jobs: int) -> contextlib.AbstractContextManager[Executor | None]:
    """A process pool of ``workers`` (default: every core) for ``jobs`` decodes, or none
    where it would not pay (one worker, or fewer than 4 jobs)."""
    workers = workers if workers is not None else os.cpu_count() or 1
    if workers <= 1 or jobs < 4:
        return contextlib.nullcontext()
    return process_pool(workers)


def _decode_many(items: Sequence[tuple[str, str | None]], settings: Settings, root: Path,
                 pool: Executor | None, keep_images: bool) -> Iterator[dict]:
    remote = environment()
    jobs = [(u, p or "", str(entry_path(root, settings, u)), settings.size, settings.mode, keep_images)
            + ((remote,) if is_remote(p) else ()) for u, p in items]
    if pool is None:
        yield from map(_job, jobs)
    else:
        yield from pool.map(_job, jobs, chunksize=4)


def store_entries(engine: Engine, settings: Settings, results: Sequence[dict], failure_stage: str | None) -> None:
    """Cache rows of new entries (and failures under ``failure_stage``): one transaction.
    Raises :class:`CacheError` after storing them when the cache folder cannot be written."""
    now = D.utcnow()
    fatal = next((r for r in results if r.get("fatal")), None)
    results = [r for r in results if not r.get("fatal")]
    keys = [c.name for c in D.cache.columns if c.name not in ("settings_id", "created_at")]
    rows = [{**{k: r[k] for k in keys}, "settings_id": settings.id, "created_at": now}
            for r in results if "error" not in r]
    failed = [r for r in results if "error" in r] if failure_stage else []
    if rows or failed:
        with engine.begin() as conn:
            D.upsert(conn, D.cache, rows, ["uid", "settings_id"])
            D.clear_failures(conn, "collect", [r["uid"] for r in rows])
            for r in failed:  # only with a failure_stage; the run's end groups them by reason (failures.summary)
                log.debug("%s %s: %s", failure_stage, r["uid"], r["message"])
                D.record_failure(conn, str(failure_stage), r["uid"], r["message"], r["error"])
    if fatal and fatal["error"] == "PacsUnreachable":
        raise CacheError(f"{fatal['message']}; the run stopped there (what was cached is kept)")
    if fatal:
        raise CacheError(f"{fatal['message']}: free space or fix the permissions of that folder, "
                         "or choose another with --cache / CXRLABEL_CACHE; the run stopped there")


# ---------------------------------------------------------------- a selection, a batch


def collect(engine: Engine, items: Sequence[tuple[str, str | None]], settings: Settings = Settings(),
            root: str | Path | None = None, workers: int | None = None,
            batch_size: int = 256, progress: bool = True, verify: bool = False) -> CollectSummary:
    """Cache every ``(uid, source path)`` not cached yet under ``settings``; resumable.

    An entry counts as cached when its file exists with the size recorded (and, with
    ``verify``, its checksum); a broken one is collected again (``summary.rebuilt``).
    """
    root = cache_root(root)
    summary = CollectSummary(selected=len(items))
    with engine.connect() as conn:
        recorded = cache_rows(conn, settings, [u for u, _ in items])
    done = {u for u, row in recorded.items() if _intact(row, verify)}
    summary.rebuilt = len(recorded) - len(done)
    todo = sorted((u, p) for u, p in items if u not in done)
    summary.skipped = len(items) - len(todo)
    bar = tqdm(total=len(todo), desc="collect", unit="img", disable=not progress)
    with decoder_pool(workers, len(todo)) as pool:
        batch: list[dict] = []
        for result in _decode_many(todo, settings, root, pool, keep_images=False):
            batch.append(result)
            if len(batch) >= batch_size:
                _count(summary, batch)
                store_entries(engine, settings, batch, "collect")
                bar.update(len(batch))
                batch = []
        _count(summary, batch)
        store_entries(engine, settings, batch, "collect")
        bar.update(len(batch))
    bar.close()
    return summary


def _count(summary: CollectSummary, results: list[dict]) -> None:
    failed = sum("error" in r for r in results)
    summary.cached += len(results) - failed
    summary.failed += failed


def fetch(engine: Engine, items: Sequence[tuple[str, str | None]], settings: Settings,
          root: str | Path | None = None, pool: Executor | None = None,
          failure_stage: str | None = None) -> list[Entry | Failure]:
    """Entries of ``(uid, source path)`` items, in order: read from the cache (checksum
    verified) or, where missing or damaged, decoded now (in ``pool`` when given) and cached.

    Failures are returned; with ``failure_stage`` they are also recorded in ``failures``.
    """
    with engine.connect() as conn:
        rows = cache_rows(conn, settings, [u for u, _ in items])
    got, new = fetch_files(items, rows, settings, root, pool)
    store_entries(engine, settings, new, failure_stage)
    return got


def cache_rows(conn: Connection, settings: Settings, uids: Sequence[str]) -> dict[str, dict]:
    """The ``cache`` rows of ``uids`` under ``settings``, whole, as plain dicts (what another
    process needs to read the entries: :func:`fetch_files`)."""
    t = D.cache
    q = select(t).where(t.c.settings_id == settings.id)
    return {row.uid: dict(row._mapping) for row in D.rows_in(conn, q, t.c.uid, uids)}


def fetch_files(items: Sequence[tuple[str, str | None]], rows: dict[str, dict], settings: Settings,
                root: str | Path | None = None, pool: Executor | None = None
                ) -> tuple[list[Entry | Failure], list[dict]]:
    """:func:`fetch` without the database, for a process that has none (a labelling stream):
    the entries of ``items`` whose cache ``rows`` (:func:`cache_rows`) lead to intact files,
    the rest decoded now and written to the cache; and the new entries' rows (their images
    left out), which the caller stores (:func:`store_entries`)."""
    got: dict[str, Entry | Failure] = dict(_read_entries(rows.values()))  # a damaged one: collected again below
    missing = [(u, p) for u, p in items if u not in got]
    new = list(_decode_many(missing, settings, cache_root(root), pool, keep_images=True)) if missing else []
    for r in new:
        got[r["uid"]] = (Failure(r["uid"], r["error"], r["message"]) if "error" in r
                         else Entry(r["uid"], r.pop("image"), geometry_of(r)))
    return [got[u] for u, _ in items], new


# ---------------------------------------------------------------- reading


def _intact(row: dict, verify: bool) -> bool:
    """Whether an entry's file (its :func:`cache_rows` row) is whole: it exists with the
    recorded size (a cheap stat); with ``verify`` its content also matches the checksum."""
    try:
        size = os.stat(row["path"]).st_size
    except OSError:
        return False
    if row["bytes"] is not None and size != row["bytes"]:
        return False
    if verify:
        try:
            read_entry(row["path"], row["checksum"])
        except (OSError, CacheError):
            return False
    return True


def read_cached(conn: Connection, uids: Sequence[str], settings: Settings | None = None) -> dict[str, Entry]:
    """``{uid: Entry}`` of the cached ``uids`` (under ``settings``, or any) whose files
    match their checksums; a damaged entry is left out (and logged), to be collected again."""
    t = D.cache
    q = select(t) if settings is None else select(t).where(t.c.settings_id == settings.id)
    return _read_entries(row._mapping for row in D.rows_in(conn, q, t.c.uid, uids))


def _read_entries(rows: Iterable[Mapping[Any, Any]]) -> dict[str, Entry]:
    """``{uid: Entry}`` of the ``cache`` rows whose files match their checksums (the first
    row of a uid that has several); a damaged entry is left out and logged."""
    out: dict[str, Entry] = {}
    for row in rows:
        if row["uid"] in out:
            continue
        try:
            out[row["uid"]] = Entry(row["uid"], read_entry(row["path"], row["checksum"]), geometry_of(row))
        except (OSError, CacheError) as e:
            log.warning("%s: %s", row["uid"], e)
    return out


def geometry_of(row) -> Geometry:
    """:class:`Geometry` from a ``cache`` row (mapping or Row)."""
    m = row._mapping if hasattr(row, "_mapping") else row
    return Geometry(m["orig_height"], m["orig_width"], m["size"], m["mode"], m["offset_x"],
                    m["offset_y"], m["scale_x"], m["scale_y"])


def read_entry(path: str, checksum: str | None = None) -> np.ndarray:
    """A cache entry (``.npy``, or ``.png`` from earlier versions) as ``(S, S) uint8``; with
    ``checksum``, verified against it."""
    data = Path(path).read_bytes()
    if checksum and hashlib.sha256(data).hexdigest() != checksum:
        raise CacheError(f"cache entry {path} does not match its checksum: re-run collect")
    if data.startswith(b"\x93NUMPY"):
        try:
            img = np.load(io.BytesIO(data), allow_pickle=False)
        except ValueError:
            img = None
    else:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
    if img is None or img.ndim != 2 or img.dtype != np.uint8:
        raise CacheError(f"cache entry {path} is not readable: re-run collect")
    return img
