"""Labelling and collecting beyond one machine, on Ray (an optional extra: ``pip install 'cxrlabel[ray]'``).

The same per-batch functions as the local loop run inside Ray. Uncached images are first
decoded into the cache by CPU tasks across the cluster (:func:`collect_on_ray`); then each
model actor (one per GPU, or a chosen number on CPUs) reads its batch through the cache
(:func:`pipeline.label.load_batch`, collecting anything still missing), runs :func:`pipeline.label.forward`
and :func:`pipeline.label.postprocess_all`, and writes the batch itself in one transaction
(:func:`pipeline.label.write_batch`) to the shared database: PostgreSQL on a cluster; SQLite
only on one machine (``local``).

Exactly once: a batch's rows are upserted by their keys, so a batch that runs twice (an actor
killed after writing, then restarted and retried by Ray; a driver killed and re-run) leaves
one row per image; a re-run skips what is done. Actors restart and retry their batch when
their process dies (``max_restarts``, ``max_task_retries``).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, select, update
from sqlalchemy.engine import Engine
from tqdm import tqdm

from pipeline import CxrlabelError
from pipeline import db as D
from pipeline.groups import Selected, Selection

log = logging.getLogger(__name__)

RESTARTS = 3  # times a dead actor is started again, and its batch retried


class RayError(CxrlabelError):
    pass


def _ray():
    try:
        import ray
    except ImportError:
        raise RayError("--ray needs Ray: pip install 'cxrlabel[ray]' (or pip install ray)") from None
    return ray


REACH_TIMEOUT = 3.0  # seconds to open a TCP connection to a cluster's head before giving up


def _check_reachable(address: str) -> None:
    """Refuse at once a ``host:port`` (or ``ray://host:port``) where nothing listens: Ray's own
    client retries such an address for a minute or more."""
    import socket
    hostport = address.removeprefix("ray://").rsplit("/", 1)[0]
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        return  # 'auto' and other forms: Ray resolves them
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=REACH_TIMEOUT):
            pass
    except OSError as e:
        raise RayError(f"--ray {address}: nothing answers there within {REACH_TIMEOUT:g} s "
                       f"({e.strerror or e}); start the cluster's head with `ray start --head` "
                       "or use --ray local") from None


def _connect(address: str, num_cpus: int | None):
    """Join the cluster at ``address``, or start a local one (``local``); True when started here."""
    ray = _ray()
    if ray.is_initialized():
        return False
    if address == "local":
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    else:
        _check_reachable(address)
        try:
            ray.init(address=address, log_to_driver=False)
        except Exception as e:  # ConnectionError, ValueError: the address is wrong or down
            raise RayError(f"--ray {address}: cannot join a Ray cluster there ({e}); start one with "
                           "`ray start --head` or use --ray local") from e
    return True


def _url(engine: Engine) -> str:
    url = engine.url.render_as_string(hide_password=False)
    if engine.dialect.name == "sqlite":
        path = D.sqlite_path(url)
        if path is None:
            raise RayError("--ray needs a database the workers can open: an in-memory SQLite cannot be shared")
        return f"sqlite:///{path.resolve()}"
    return url


@dataclass
class BatchDone:
    """What a worker reports of one batch (what a progress hook sees)."""

    labelled: int
    failed: int
    pid: int
    host: str


class _LabellerImpl:
    """One model in one worker process, labelling whole batches and writing them."""

    def __init__(self, url: str, model: str, device: str, cache_dir: str | None, run_id: int,
                 threads: int | None, tta: bool = False) -> None:
        import torch

        from pipeline.collect import Settings
        from pipeline.model import resolve_model
        if threads:
            torch.set_num_threads(threads)
        self.engine = D.connect(url)
        self.lm = resolve_model(self.engine, model, device)
        self.settings = Settings(self.lm.spec.size, self.lm.spec.mode)
        self.cache_dir, self.run_id, self.tta = cache_dir, run_id, tta

    def sha256(self) -> str:
        return self.lm.sha256

    def label(self, chunk: Sequence[Selected]) -> BatchDone:
        from pipeline.label import forward, forward_tta, load_batch, postprocess_all, tta_scorer, write_batch
        items, errors = load_batch(self.engine, chunk, self.settings, self.cache_dir, None, self.lm.spec.fixups)
        results = []
        if items:
            copies = forward_tta(self.lm, items) if self.tta else None
            results = postprocess_all(items, forward(self.lm, items), self.lm.spec.structures,
                                      tta_scorer(self.lm) if self.tta else self.lm.quality, copies)
        write_batch(self.engine, results + errors, self.lm.name, self.run_id)
        return BatchDone(sum(r.error is None for r in results), len(errors) + sum(r.error is not None for r in results),
                         os.getpid(), socket.gethostname())


def label_on_ray(engine: Engine, selection: Selection, model: str = "default", address: str = "local",
                 device: str = "auto", batch_size: int = 64, cache_dir: str | None = None,
                 actors: int | None = None, cpus_per_actor: int = 1, progress: bool = True,
                 on_batch: Callable[[BatchDone], None] | None = None, tta: bool = False):
    """Label ``selection`` with ``actors`` model actors on the Ray cluster at ``address``.

    Returns the same :class:`pipeline.label.LabelSummary` as the local loop. ``on_batch`` is
    called on the driver after each batch is written (a progress hook; tests kill workers there).
    """
    from pipeline.label import LabelSummary, labelled_uids, mark_abandoned_runs, retire_other_versions, tta_scorer
    from pipeline.model import resolve_model
    ray = _ray()
    url = _url(engine)
    lm = resolve_model(engine, model, "cpu")  # the name, file and hash the workers must match
    if tta:
        tta_scorer(lm)  # a model without a tta score fails here, not in every worker
    items = selection.items
    retire_other_versions(engine, lm)
    done = labelled_uids(engine, lm.name, [it.uid for it in items])
    todo = sorted((it for it in items if it.uid not in done), key=lambda it: it.uid)
    started = _connect(address, None)
    try:
        # decoding first, as CPU tasks over the whole cluster: the model actors then read a
        # warm cache (and still collect any entry that went missing since)
        from pipeline.collect import Settings
        collect_on_ray(engine, [(it.uid, it.path) for it in todo], Settings(lm.spec.size, lm.spec.mode), cache_dir,
                       address, batch_size, progress)
        gpus = int(ray.cluster_resources().get("GPU", 0))
        use_gpu = gpus > 0 and device in ("auto", "cuda")
        n = actors or (gpus if use_gpu else max(1, int(ray.cluster_resources().get("CPU", 1)) // cpus_per_actor))
        mark_abandoned_runs(engine)
        with engine.begin() as conn:
            run_id = conn.execute(D.label_runs.insert().values(
                model=lm.name, model_sha256=lm.sha256, selection=selection.description,
                device=f"ray:{n}x{'cuda' if use_gpu else 'cpu'}", host=socket.gethostname(), pid=os.getpid(),
                started_at=D.utcnow(), n_selected=len(items), n_labelled=0, n_skipped=len(done), n_failed=0,
                status="running", heart_definition=lm.spec.heart_definition)).inserted_primary_key[0]
        status, failed = "failed", [0]

        def count(batch: BatchDone) -> None:
            failed[0] += batch.failed
            if on_batch:
                on_batch(batch)

        try:
            _run(ray, url, model, "cuda" if use_gpu else "cpu", cache_dir, run_id, lm.sha256, todo, batch_size, n,
                 cpus_per_actor, use_gpu, progress, count, tta)
            status = "done"
        except KeyboardInterrupt:
            status = "interrupted"
            raise
        finally:
            _close_run(engine, run_id, status, failed[0])
    finally:
        if started:
            ray.shutdown()
    with engine.connect() as conn:
        row = conn.execute(select(D.label_runs).where(D.label_runs.c.id == run_id)).one()
    return LabelSummary(run_id, lm.name, len(items), row.n_labelled, len(done), row.n_failed, row.device)


def _run(ray, url, model, device, cache_dir, run_id, sha, todo, batch_size, n, cpus, use_gpu, progress,
         on_batch, tta) -> None:
    remote = ray.remote(num_gpus=1 if use_gpu else 0, num_cpus=cpus, max_restarts=RESTARTS,
                        max_task_retries=RESTARTS)(_LabellerImpl)
    pool = [remote.remote(url, model, device, cache_dir, run_id, cpus, tta) for _ in range(n)]
    shas = set(ray.get([a.sha256.remote() for a in pool]))
    if shas != {sha}:
        raise RayError(f"the workers load model {model!r} with sha256 {sorted(shas)}, the driver {sha}: "
                       "give every node the same checkpoint file")
    chunks = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
    bar = tqdm(total=len(todo), desc="label (ray)", unit="img", disable=not progress)
    in_flight: dict = {}
    next_chunk = 0
    idle = list(pool)
    while next_chunk < len(chunks) or in_flight:
        while idle and next_chunk < len(chunks):  # one batch per actor at a time; Ray retries it
            actor = idle.pop()
            in_flight[actor.label.remote(chunks[next_chunk])] = (actor, len(chunks[next_chunk]))
            next_chunk += 1
        ready, _ = ray.wait(list(in_flight), num_returns=1)
        actor, size = in_flight.pop(ready[0])
        done: BatchDone = ray.get(ready[0])
        idle.append(actor)
        bar.update(size)
        on_batch(done)
    bar.close()
    for a in pool:
        ray.kill(a)


def _close_run(engine: Engine, run_id: int, status: str, failed: int) -> None:
    """The run's counts: images labelled from what is stored (a batch that ran twice, killed
    after its write and retried, is not counted twice), failures as the driver received them."""
    m, runs = D.measurements, D.label_runs
    with engine.begin() as conn:
        labelled = conn.execute(select(func.count()).select_from(m).where(m.c.run_id == run_id)).scalar()
        conn.execute(update(runs).where(runs.c.id == run_id).values(
            ended_at=D.utcnow(), status=status, n_labelled=labelled, n_failed=failed))


def collect_on_ray(engine: Engine, items: Sequence[tuple[str, str | None]], settings, root: str | Path | None = None,
                   address: str = "local", batch_size: int = 64, progress: bool = True):
    """:func:`pipeline.collect.collect` run by Ray tasks, one batch of ``items`` each: the same
    skipping of whole entries, rebuilding of broken ones and recording of failures."""
    from pipeline.collect import CollectSummary, cache_root
    ray = _ray()
    url = _url(engine)
    root = str(cache_root(root).resolve())
    summary = CollectSummary(selected=len(items))
    started = _connect(address, None)
    try:
        task = ray.remote(max_retries=RESTARTS)(_collect_batch)
        refs = [task.remote(url, list(chunk), settings, root) for chunk in D.chunks(list(items), batch_size)]
        bar = tqdm(total=len(items), desc="collect (ray)", unit="img", disable=not progress)
        while refs:
            ready, refs = ray.wait(refs, num_returns=1)
            part = ray.get(ready[0])
            for field in ("cached", "skipped", "failed", "rebuilt"):
                setattr(summary, field, getattr(summary, field) + getattr(part, field))
            bar.update(part.selected)
        bar.close()
    finally:
        if started:
            ray.shutdown()
    return summary


def _collect_batch(url: str, chunk: list[tuple[str, str | None]], settings, root: str):
    from pipeline.collect import collect
    engine = D.connect(url)
    try:
        return collect(engine, chunk, settings, root, workers=1, progress=False)
    finally:
        engine.dispose()
