"""Labelling and collecting beyond one machine, on Ray (an optional extra: ``pip install 'cxrlabel[ray]'``).

:class:`Ray` is the second executor of a :class:`pipeline.label.LabelRun` (the first is the
local loop, :class:`pipeline.label.Local`): ``label(engine, selection, options, Ray(address))``.
Uncached images are first decoded into the cache by CPU tasks across the cluster
(:func:`collect_on_ray`); then each model actor (one per GPU, or a chosen number on CPUs) runs
the run's :class:`pipeline.label.BatchLabeller` on whole batches: it reads them through the
cache (collecting anything still missing), runs the model, post-processes, and writes each
batch in one transaction to the shared database: PostgreSQL on a cluster; SQLite only on one
machine (``local``).

Exactly once: a batch's rows are upserted by their keys, so a batch that runs twice (an actor
killed after writing, then restarted and retried by Ray; a driver killed and re-run) leaves
one row per image; a re-run skips what is done. Actors restart and retry their batch when
their process dies (``max_restarts``, ``max_task_retries``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import Engine
from tqdm import tqdm

from pipeline import CxrlabelError
from pipeline import db as D
from pipeline.groups import Selected
from pipeline.label import BatchDone, LabelError, LabelOptions, LabelRun

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


class _LabellerImpl:
    """One model in one worker process, labelling whole batches with the run's
    :class:`pipeline.label.BatchLabeller` and writing them."""

    def __init__(self, url: str, options: LabelOptions, device: str, run_id: int, threads: int | None) -> None:
        import torch

        from pipeline.label import BatchLabeller
        from pipeline.model import resolve_model
        if threads:
            torch.set_num_threads(threads)
        engine = D.connect(url)
        self.work = BatchLabeller(engine, resolve_model(engine, options.model, device), options, run_id)

    def sha256(self) -> str:
        return self.work.lm.sha256

    def batch_size(self) -> int:
        from pipeline.model import auto_batch_size
        return auto_batch_size(self.work.lm)

    def label(self, chunk: Sequence[Selected]) -> BatchDone:
        return self.work(chunk)


@dataclass
class Ray:
    """Labelling on a Ray cluster (``address``, or ``local`` for one started here): the run's
    uncached images are decoded first by CPU tasks across the cluster, then ``actors`` model
    actors (one per GPU, or one per ``cpus_per_actor`` CPUs) each label and write whole
    batches. ``on_batch`` is called on the driver after each batch is written (a progress
    hook; tests kill workers there)."""

    address: str = "local"
    actors: int | None = None
    cpus_per_actor: int = 1  # each actor's CPUs, and its torch threads
    on_batch: Callable[[BatchDone], None] | None = None

    def refuse(self, options: LabelOptions) -> None:
        if options.workers is not None:
            raise LabelError("--workers sets the local loop's processes; on Ray each actor decodes and "
                             "post-processes its own batches: set --actors (and --threads per actor) instead")
        if options.device not in ("auto", "cpu", "cuda"):
            raise LabelError(f"--device {options.device}: on Ray each actor gets its GPU from Ray; "
                             "use --device auto, cpu or cuda")

    def model_device(self, options: LabelOptions) -> str:
        return "cpu"  # the driver's copy only names and hashes the model; the actors run it

    def execute(self, run: LabelRun) -> None:
        ray = _ray()
        url = _url(run.engine)
        options = run.options
        started = _connect(self.address, None)
        try:
            # decoding first, as CPU tasks over the whole cluster: the model actors then read a
            # warm cache (and still collect any entry that went missing since)
            from pipeline.collect import Settings
            collect_on_ray(run.engine, [(it.uid, it.path) for it in run.todo],
                           Settings(run.lm.spec.size, run.lm.spec.mode), options.cache_dir, self.address,
                           options.batch_size or 64, options.progress)
            gpus = int(ray.cluster_resources().get("GPU", 0))
            if options.device == "cuda" and not gpus:
                raise LabelError("--device cuda: the Ray cluster has no GPU; use --device auto or cpu")
            use_gpu = gpus > 0 and options.device in ("auto", "cuda")
            n = self.actors or (gpus if use_gpu else
                                max(1, int(ray.cluster_resources().get("CPU", 1)) // self.cpus_per_actor))
            with run.started(f"ray:{n}x{'cuda' if use_gpu else 'cpu'}") as work:
                self._run(ray, url, run, work.run_id, "cuda" if use_gpu else "cpu", n, use_gpu)
        finally:
            if started:
                ray.shutdown()

    def _run(self, ray, url: str, run: LabelRun, run_id: int, device: str, n: int, use_gpu: bool) -> None:
        remote = ray.remote(num_gpus=1 if use_gpu else 0, num_cpus=self.cpus_per_actor, max_restarts=RESTARTS,
                            max_task_retries=RESTARTS)(_LabellerImpl)
        pool = [remote.remote(url, run.options, device, run_id, self.cpus_per_actor) for _ in range(n)]
        shas = set(ray.get([a.sha256.remote() for a in pool]))
        if shas != {run.lm.sha256}:
            raise RayError(f"the workers load model {run.options.model!r} with sha256 {sorted(shas)}, the driver "
                           f"{run.lm.sha256}: give every node the same checkpoint file")
        # auto: what the smallest actor's device holds (model.auto_batch_size there)
        size = run.options.batch_size or min(ray.get([a.batch_size.remote() for a in pool]))
        chunks = [run.todo[i:i + size] for i in range(0, len(run.todo), size)]
        bar = tqdm(total=len(run.todo), desc="label (ray)", unit="img", disable=not run.options.progress)
        in_flight: dict = {}
        next_chunk = 0
        idle = list(pool)
        while next_chunk < len(chunks) or in_flight:
            while idle and next_chunk < len(chunks):  # one batch per actor at a time; Ray retries it
                actor = idle.pop()
                in_flight[actor.label.remote(chunks[next_chunk])] = (actor, len(chunks[next_chunk]))
                next_chunk += 1
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            actor, batch = in_flight.pop(ready[0])
            done: BatchDone = ray.get(ready[0])
            idle.append(actor)
            bar.update(batch)
            run.count(done)
            if self.on_batch:
                self.on_batch(done)
        bar.close()
        for a in pool:
            ray.kill(a)


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
