"""The labelling run: its options, opening it once (:class:`LabelRun`), one batch's work
(:class:`BatchLabeller`), the local executor (:class:`Local`) and :func:`label`."""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import socket
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Protocol, cast

import numpy as np
import torch
from sqlalchemy import func, select, update
from sqlalchemy.engine import Engine
from tqdm import tqdm

from pipeline import db as D
from pipeline import process_pool
from pipeline.collect import Settings, cache_root, cache_rows, fetch_files, store_entries
from pipeline.groups import Selected, Selection
from pipeline.label.batch import (
    Item,
    LabelError,
    Result,
    forward,
    forward_tta,
    items_of,
    load_batch,
    postprocess_all,
    tta_scorer,
    write_batch,
)
from pipeline.model import LoadedModel, auto_batch_size, model_inputs, resolve_model
from pipeline.pacs.fetch import environment, use_environment

log = logging.getLogger(__name__)


WRITES_IN_FLIGHT = 2  # batches post-processed and written behind the model on a GPU

STREAM_THREADS_FROM = 8  # streams beyond which each stream's model gets several threads (memory: ~0.6 GB a stream)

BATCHES_AHEAD = 2  # batches queued for each stream, so that none waits for this process between two

FILM_WORK = 6e6  # original pixels whose runs cost post-processing as much as its fixed part
# (bench/overhead.py: ~5 ms a film, ~7.8 ms for films of 2,000 px a side and more)


@dataclass
class LabelSummary:
    run_id: int
    model: str
    selected: int
    labelled: int
    skipped: int
    failed: int
    device: str


def retire_other_versions(engine: Engine, lm: LoadedModel) -> dict[str, int]:
    """Keep what another checkpoint stored under ``lm``'s name (an earlier shipped default,
    a model retrained under the same name) under ``NAME@SHA12`` instead: its measurements,
    masks, reviews and label runs, in one transaction. Labelling then does the images again
    with this checkpoint, and the old rows stay queryable side by side. Returns
    ``{kept name: images}``."""
    r, m = D.label_runs, D.measurements
    moved: dict[str, int] = {}
    with engine.begin() as conn:
        runs = conn.execute(select(r.c.id, r.c.model_sha256).where(
            r.c.model == lm.name, r.c.model_sha256.isnot(None), r.c.model_sha256 != lm.sha256)).all()
        by_sha: dict[str, list[int]] = {}
        for run in runs:
            by_sha.setdefault(run.model_sha256, []).append(run.id)
        for sha, ids in sorted(by_sha.items()):
            kept = f"{lm.name}@{sha[:12]}"
            uids = [u for part in D.chunks(ids) for u in conn.execute(
                select(m.c.uid).where(m.c.model == lm.name, m.c.run_id.in_(part))).scalars()]
            for part in D.chunks(uids):
                for table in (D.masks, D.reviews):
                    conn.execute(update(table).where(table.c.model == lm.name, table.c.uid.in_(part))
                                 .values(model=kept))
                conn.execute(update(m).where(m.c.model == lm.name, m.c.uid.in_(part)).values(model=kept))
            for part in D.chunks(ids):
                conn.execute(update(r).where(r.c.id.in_(part)).values(model=kept))
            moved[kept] = len(uids)
    for kept, n in moved.items():
        if n:
            log.warning("%d images labelled by an earlier %s (another checkpoint) are kept as model %r; "
                        "they are labelled again with this one", n, lm.name, kept)
    return moved


def labelled_uids(engine: Engine, model: str, uids: Sequence[str]) -> set[str]:
    t = D.measurements
    with engine.connect() as conn:
        return {row.uid for row in D.rows_in(conn, select(t.c.uid).where(t.c.model == model), t.c.uid, uids)}


@dataclass(frozen=True)
class LabelOptions:
    """Every setting of one labelling run, whichever executor runs it (the CLI's options)."""

    model: str = "default"  # 'default' (shipped), a registered name, or a checkpoint path
    device: str = "auto"  # auto, cpu or cuda (locally also cuda:N)
    batch_size: int | None = None  # None: as many films as the device holds (model.auto_batch_size)
    cache_dir: str | None = None
    workers: int | None = None  # processes that decode and post-process [cores]; on a CPU the streams [stream_shape]
    tta: bool = False  # two test-time-augmented copies per image, for the quality score (3x the model's work)
    progress: bool = True


@dataclass
class BatchDone:
    """What one written batch adds to its run (what a progress hook sees)."""

    labelled: int
    failed: int
    pid: int
    host: str


class BatchLabeller:
    """The work of one batch, the same under every executor: :meth:`load` (the cache's
    entries, collecting what is missing, and the model's inputs), :meth:`infer` (the model,
    and its test-time-augmented copies), :meth:`post` (masks, measurements, quality) and
    :meth:`write` (one transaction). Calling it does all four in this process (a Ray actor);
    the local loop runs the same steps, in its streams (a CPU) or overlapped (a GPU). A
    stream's has no database (``engine`` None): it gets the cache's rows and hands back its
    results (:meth:`results`)."""

    def __init__(self, engine: Engine | None, lm: LoadedModel, options: LabelOptions, run_id: int) -> None:
        self._engine, self.lm, self.options, self.run_id = engine, lm, options, run_id
        self.scorer = tta_scorer(lm) if options.tta else lm.quality
        self.settings = Settings(lm.spec.size, lm.spec.mode)

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise LabelError("this batch labeller has no database (a labelling stream's): it loads from cache rows")
        return self._engine

    def load(self, chunk: Sequence[Selected], pool: Executor | None = None
             ) -> tuple[list[Item], list[Result], np.ndarray | None]:
        items, errors = load_batch(self.engine, chunk, self.settings, self.options.cache_dir, pool,
                                   self.lm.spec.fixups)
        return items, errors, self.inputs(items)

    def inputs(self, items: Sequence[Item]) -> np.ndarray | None:
        """The model's inputs of the batch's loaded ``items`` (None for none)."""
        return model_inputs([it.image for it in items], self.lm.spec, [it.rim_box for it in items]) if items else None

    def infer(self, items: Sequence[Item], inputs: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        """The batch's probabilities, and those of its tta copies (None without ``tta``)."""
        return forward(self.lm, items, inputs), forward_tta(self.lm, items) if self.options.tta else None

    def post(self, items: Sequence[Item], probs: np.ndarray, copies: np.ndarray | None) -> list[Result]:
        return postprocess_all(items, probs, self.lm.spec.structures, self.scorer, copies)

    def write(self, results: Sequence[Result]) -> BatchDone:
        write_batch(self.engine, results, self.lm.name, self.run_id)
        failed = sum(r.error is not None for r in results)
        return BatchDone(len(results) - failed, failed, os.getpid(), socket.gethostname())

    def results(self, items: Sequence[Item], errors: list[Result], inputs: np.ndarray | None) -> list[Result]:
        """The loaded batch's results: the model's and post-processing's, then its failures to load."""
        return (self.post(items, *self.infer(items, inputs)) if items else []) + errors

    def __call__(self, chunk: Sequence[Selected]) -> BatchDone:
        return self.write(self.results(*self.load(chunk)))


class LabelRun:
    """One labelling run, opened the same way whichever executor labels it: the model (its
    name, file and hash), the selection's images it has not labelled yet (sorted by uid),
    and, once an executor starts it (:meth:`start`), its ``label_runs`` row; :meth:`settle`
    records how it ended."""

    def __init__(self, engine: Engine, selection: Selection, options: LabelOptions, model_device: str) -> None:
        self.engine, self.selection, self.options = engine, selection, options
        self.lm = resolve_model(engine, options.model, model_device)
        if options.tta:
            tta_scorer(self.lm)  # a model without a tta score fails here, before any work
        retire_other_versions(engine, self.lm)
        self.done = labelled_uids(engine, self.lm.name, [it.uid for it in selection.items])
        self.todo = sorted((it for it in selection.items if it.uid not in self.done), key=lambda it: it.uid)
        self.run_id: int | None = None
        self.failed = 0  # as the executor received them (a batch retried after its write counts once)

    def start(self, device: str) -> BatchLabeller:
        """Insert the run's row (``device``: where it runs, as the row records it) and return
        the batch work bound to it; runs left ``running`` by a dead process are marked first."""
        mark_abandoned_runs(self.engine)
        with self.engine.begin() as conn:
            inserted = conn.execute(D.label_runs.insert().values(
                model=self.lm.name, model_sha256=self.lm.sha256, selection=self.selection.description,
                device=device, host=socket.gethostname(), pid=os.getpid(), started_at=D.utcnow(),
                n_selected=len(self.selection.items), n_labelled=0, n_skipped=len(self.done), n_failed=0,
                status="running", heart_definition=self.lm.spec.heart_definition))
            self.run_id = cast(int, cast(Any, inserted.inserted_primary_key)[0])
        return BatchLabeller(self.engine, self.lm, self.options, self.run_id)

    @contextlib.contextmanager
    def started(self, device: str) -> Iterator[BatchLabeller]:
        """:meth:`start` the run, and :meth:`settle` it however the block ends: ``done``,
        ``interrupted`` (Ctrl-C, re-raised) or ``failed`` (any other error, re-raised)."""
        work = self.start(device)
        status = "failed"
        try:
            yield work
            status = "done"
        except KeyboardInterrupt:
            status = "interrupted"
            raise
        finally:
            self.settle(status)

    def count(self, batch: BatchDone) -> None:
        self.failed += batch.failed

    def settle(self, status: str) -> None:
        """The run's end and counts: images labelled from what is stored (a batch that ran
        twice, killed after its write and retried, is not counted twice), failures as the
        executor received them."""
        m, runs = D.measurements, D.label_runs
        with self.engine.begin() as conn:
            labelled = conn.execute(select(func.count()).select_from(m).where(m.c.run_id == self.run_id)).scalar()
            conn.execute(update(runs).where(runs.c.id == self.run_id).values(
                ended_at=D.utcnow(), status=status, n_labelled=labelled, n_failed=self.failed))

    def summary(self) -> LabelSummary:
        run_id = self.run_id
        if run_id is None:
            raise LabelError("a labelling run has no summary before an executor starts it")
        with self.engine.connect() as conn:
            row = conn.execute(select(D.label_runs).where(D.label_runs.c.id == run_id)).one()
        return LabelSummary(run_id, self.lm.name, len(self.selection.items), row.n_labelled, len(self.done),
                            row.n_failed, row.device)


class LabelExecutor(Protocol):
    """Who labels a :class:`LabelRun`'s batches: :class:`Local` (this machine) or
    :class:`pipeline.distributed.Ray` (a cluster). Both run :class:`BatchLabeller`."""

    def refuse(self, options: LabelOptions) -> None:
        """Raise :class:`LabelError` (one line, naming the option) for a setting it cannot honour."""

    def model_device(self, options: LabelOptions) -> str:
        """Where the run's own copy of the model loads (the one that names and hashes it)."""

    def execute(self, run: LabelRun) -> None:
        """Start ``run``, label its images, and settle it however it ends (:meth:`LabelRun.started`)."""


def label(engine: Engine, selection: Selection, options: LabelOptions | None = None,
          executor: LabelExecutor | None = None) -> LabelSummary:
    """Label the images of ``selection`` not yet labelled by ``options.model``, with
    ``executor`` (default: :class:`Local`). A re-run skips what is done.

    Torch's CPU thread count is the caller's to set (the CLI's ``--threads``, or a Ray
    worker's setup): this function changes no process-wide state.
    """
    options = options or LabelOptions()
    executor = executor or Local()
    executor.refuse(options)
    run = LabelRun(engine, selection, options, executor.model_device(options))
    executor.execute(run)
    return run.summary()


@dataclass
class Local:
    """The local loop.

    On a CPU it labels in streams (:func:`_streams`): processes that each hold a copy of the
    model on one thread (several on a machine of many cores: :func:`stream_shape`) and take
    whole batches in turn: load them (decoding what the cache lacks), run the model,
    post-process. This process reads the cache's rows for the batches it queues and writes
    each batch as it comes back. Two one-thread models beside each other run the model
    faster than one model on two threads, whose threads wait for each other at the end of
    every step; and no stream's loading or post-processing takes a core from a model thread
    in the middle of its step (bench/RESULTS.md, "Labelling in streams").

    On a GPU, while a batch is in the model, the batches before it are post-processed (in
    processes) and written (in a writer thread), and the next two load (in threads); the
    loop waits only when more than :data:`WRITES_IN_FLIGHT` batches are behind it."""

    def refuse(self, options: LabelOptions) -> None:
        return None  # every option is the local loop's own

    def model_device(self, options: LabelOptions) -> str:
        return options.device

    def execute(self, run: LabelRun) -> None:
        if run.lm.device.type == "cpu":
            _streams(run)
            return
        lm, options = run.lm, run.options
        with run.started(str(lm.device)) as work:
            bs = options.batch_size or auto_batch_size(lm)
            processes = options.workers or os.cpu_count() or 2  # a GPU box needs many CPU hands to feed the GPU
            bar = _bar(run)

            def finish(n: int, futures: list[Future], errors: list[Result]) -> None:
                done = work.write([r for f in futures for r in f.result()] + errors)
                run.count(done)
                bar.update(done.labelled + done.failed)
                log.info("run %d: batch %d written (%d images)", run.run_id, n, done.labelled)

            with ThreadPoolExecutor(2) as loaders, ThreadPoolExecutor(1) as writer, \
                    process_pool(processes) as procs:
                procs.start_all()  # beside the first batch's load and model pass
                written: deque[Future] = deque()
                for n, (items, errors, inputs) in enumerate(_prefetch(work, run.todo, bs, loaders, procs), start=1):
                    futures: list[Future] = []
                    if items:
                        probs, copies = work.infer(items, inputs)
                        # a task per worker, with the films' cached pixels (the score's heart_border
                        # reads them, 64 kB a film at 256 px), shared out by the films' sizes
                        futures = [procs.submit(postprocess_all, [items[i] for i in part], probs[part],
                                                lm.spec.structures, work.scorer,
                                                copies[part] if copies is not None else None)
                                   for part in _shares(items, processes)]
                    written.append(writer.submit(finish, n, futures, errors))
                    while len(written) > WRITES_IN_FLIGHT:
                        written.popleft().result()  # a failed write stops the run here
                while written:
                    written.popleft().result()
            bar.close()


def stream_shape(threads: int, streams: int | None = None) -> tuple[int, int]:
    """``(streams, threads each)`` for a CPU run given ``threads`` (torch's thread count: the
    CLI's ``--threads``, every core by default) and the ``streams`` asked for (``--workers``),
    if any, which share the threads. Otherwise a stream per thread, one model thread each, up
    to :data:`STREAM_THREADS_FROM` streams; beyond, as many threads to each as keep the
    streams at or under it (each stream holds a model and its batch's activations, ~0.6 GB)."""
    if streams:
        return streams, max(1, threads // streams)
    each = -(-threads // STREAM_THREADS_FROM)
    return max(1, threads // each), each


def _bar(run: LabelRun) -> tqdm:
    return tqdm(total=len(run.todo), desc=f"label {run.lm.name}", unit="img", disable=not run.options.progress)


def _streams(run: LabelRun) -> None:
    """Label ``run`` on a CPU in streams (:class:`Local`): each batch queued with its cache
    rows to whichever stream is free, :data:`BATCHES_AHEAD` per stream; written here, with the
    entries the stream cached, as it comes back. A stream's error stops the run (a batch's
    own bad films are results, not errors)."""
    lm, options = run.lm, run.options
    streams, each = stream_shape(torch.get_num_threads(), options.workers)
    with run.started(str(lm.device)) as work:
        bs = options.batch_size or auto_batch_size(lm)
        bar = _bar(run)
        chunks = iter(_tapering(run.todo, bs, streams))
        root = str(cache_root(options.cache_dir))
        setup = (_stream_start, (lm, options, cast(int, run.run_id), each, environment()))
        with process_pool(streams, setup) as procs:

            def queue(chunk: Sequence[Selected]) -> Future:
                with run.engine.connect() as conn:
                    rows = cache_rows(conn, work.settings, [s.uid for s in chunk])
                return procs.submit(_stream_batch, chunk, rows, root)

            pending = {queue(c) for c in itertools.islice(chunks, BATCHES_AHEAD * streams)}
            n = 0
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in done:
                    results, cached = f.result()
                    store_entries(run.engine, work.settings, cached, None)  # a cache that cannot be written stops here
                    batch = work.write(results)
                    run.count(batch)
                    bar.update(batch.labelled + batch.failed)
                    n += 1
                    log.info("run %d: batch %d written (%d images)", run.run_id, n, batch.labelled)
                    if (chunk := next(chunks, None)) is not None:
                        pending.add(queue(chunk))
        bar.close()


def _tapering(todo: Sequence[Selected], bs: int, streams: int, least: int = 4) -> Iterator[Sequence[Selected]]:
    """``todo`` in batches of ``bs`` that shrink towards the end (a share of what is left,
    down to ``least``), so that the streams finish together: with equal batches the last
    one's stream could work on alone for up to a batch's time (16 films: ~0.6 s on a CPU
    core, an eighth of a 200-film run on two)."""
    i = 0
    while i < len(todo):
        size = min(bs, max(least, -(-(len(todo) - i) // (2 * streams))))
        yield todo[i:i + size]
        i += size


_STREAM: BatchLabeller | None = None  # a stream's batch work, in its process (_stream_start)


def _stream_start(lm: LoadedModel, options: LabelOptions, run_id: int, threads: int, pacs: dict[str, str]) -> None:
    """A stream's start, in its process: the run's model on ``threads`` threads, and the
    PACS settings of the process that runs it (a film not yet cached may come from the PACS)."""
    global _STREAM
    torch.set_num_threads(threads)
    use_environment(pacs)
    _STREAM = BatchLabeller(None, lm, options, run_id)


def _stream_batch(chunk: Sequence[Selected], rows: dict[str, dict], root: str) -> tuple[list[Result], list[dict]]:
    """One batch in a stream: its results, and the cache rows of what it had to collect."""
    work = cast(BatchLabeller, _STREAM)
    entries, cached = fetch_files([(s.uid, s.path) for s in chunk], rows, work.settings, root)
    items, errors = items_of(chunk, entries, work.lm.spec.fixups)
    return work.results(items, errors, work.inputs(items)), cached


def mark_abandoned_runs(engine: Engine) -> list[int]:
    """Mark ``running`` runs of this host whose process is gone as ``interrupted``."""
    runs = D.label_runs
    with engine.begin() as conn:
        rows = conn.execute(select(runs.c.id, runs.c.pid).where(
            runs.c.status == "running", runs.c.host == socket.gethostname(), runs.c.pid.is_not(None))).all()
        gone = [r.id for r in rows if not _alive(r.pid)]
        for part in D.chunks(gone):
            conn.execute(update(runs).where(runs.c.id.in_(part), runs.c.status == "running")
                         .values(status="interrupted"))
    for run_id in gone:
        log.warning("label run %d was left running by a process that is gone: marked interrupted", run_id)
    return gone


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _shares(items: Sequence[Item], parts: int) -> list[list[int]]:
    """The batch's indices in at most ``parts`` tasks of about equal work: post-processing
    costs a film a fixed part and a part that grows with its original size (its runs,
    :data:`FILM_WORK`), so the largest go first, each to the lightest task so far; each
    task's indices in batch order."""
    tasks: list[list[int]] = [[] for _ in range(min(parts, len(items)))]
    load = [0.0] * len(tasks)
    work = [1 + it.geom.orig_height * it.geom.orig_width / FILM_WORK for it in items]
    for i in sorted(range(len(items)), key=lambda i: -work[i]):
        lightest = load.index(min(load))
        tasks[lightest].append(i)
        load[lightest] += work[i]
    return [sorted(t) for t in tasks if t]


def _prefetch(work: BatchLabeller, todo: Sequence[Selected], bs: int, threads: Executor, procs: Executor
              ) -> Iterator[tuple[list[Item], list[Result], np.ndarray | None]]:
    """Batches whose images load (decoding what is missing) and are normalised for the model
    while the previous batch runs in it: the model's loop only runs the model."""
    chunks = list(D.chunks(todo, bs))
    ahead: list[Future] = [threads.submit(work.load, c, procs) for c in chunks[:2]]
    for i in range(len(chunks)):
        current = ahead.pop(0)
        if i + 2 < len(chunks):
            ahead.append(threads.submit(work.load, chunks[i + 2], procs))
        yield current.result()
