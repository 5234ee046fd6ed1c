"""cxrlabel: label chest X-ray archives with heart and lung masks in a SQL catalogue.

Stages (one module each): ``catalogue`` and ``groups`` (stage 1), ``collect`` and ``masks``
(stage 2), ``train`` (stage 3), ``label``, ``measure``, ``evaluate`` and ``report`` (stage 4).
``cli`` is a thin click layer over them.
"""

from __future__ import annotations

from collections.abc import Callable

__version__ = "0.1.0"


class CxrlabelError(Exception):
    """Base class of the errors the CLI turns into a one-line message with a next step."""


def one_of(value, options, what: str = "option"):
    """``options[value]`` (a dict) or ``value`` (any other collection of names) when it is
    one; else a ValueError naming it, the closest names ("did you mean 'unet'?") and all of
    them. What MONAI's ``look_up_option`` did here, without importing MONAI (2 s) and torch
    for a dictionary look-up: ``cxrlabel quality show`` and ``models list`` start in a
    fraction of the time."""
    import difflib

    if value in options:
        return options[value] if isinstance(options, dict) else value
    names = [str(k) for k in options]
    close = difflib.get_close_matches(str(value), names, n=3, cutoff=0.6)
    hint = f", did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(f"unknown {what} {value!r}{hint} (known: {', '.join(names)})")


# the modules whose functions the pipeline's process pools run (imported by their fork server)
WORKER_MODULES = ("pipeline.catalogue", "pipeline.collect", "pipeline.label", "pipeline.compiled",
                  "monai.networks.nets")  # MONAI: a labelling stream's copy of the model unpickles its network


def process_pool(workers: int | None = None, setup: tuple[Callable[..., None], tuple] | None = None):
    """A ``ProcessPoolExecutor`` whose workers exit when this process dies, and whose queued
    work is cancelled when its ``with`` block ends in an error; ``setup``: ``(function,
    args)`` that each worker calls once as it starts (a labelling stream's copy of the model).

    Python's pool workers otherwise wait forever on their task queue after the parent is
    killed (``kill -9``, OOM killer), holding memory and the parent's open files; and a
    pool left by an exception would first run every job still queued (a whole archive).

    Workers start from a fork server (a fresh single-threaded process that has imported the
    modules they run once), never as forks of this process: labelling starts workers
    while its loader, writer and torch threads run, and a child forked while one of them
    holds a lock (OpenCV's or torch's thread pool, SQLite's, a logging handler's) can wait on
    it forever. The server is one per process, started by the first pool with
    :data:`WORKER_MODULES` imported, so a later pool's workers (collect's after catalogue's,
    label's after collect's) do not each import torch again.

    Each worker computes on one thread (:func:`_one_thread`): the pool already runs one
    process per core, and a library's own threads beside them only compete for the cores.
    """
    import multiprocessing
    import os
    from concurrent.futures import ProcessPoolExecutor

    class Pool(ProcessPoolExecutor):
        size: int  # its workers

        def __exit__(self, exc_type, exc, tb):
            if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
                # Ctrl-C: the workers (which ignore it) are stopped now, not after their tasks
                for process in list((getattr(self, "_processes", None) or {}).values()):
                    process.terminate()
            self.shutdown(wait=True, cancel_futures=exc_type is not None)
            return False

        def start_all(self) -> None:
            """Start every worker now rather than at the tasks that first need them, so their
            start (a fork and this program's re-import, ~0.25 s) runs beside the caller's
            own first work instead of in front of the first task's answer."""
            for _ in range(self.size):
                self.submit(os.getpid)

    context: multiprocessing.context.BaseContext
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["pipeline", *WORKER_MODULES])
    else:  # Windows: no fork server; spawned workers import what they need
        context = multiprocessing.get_context("spawn")
    pool = Pool(workers, mp_context=context, initializer=_start_worker, initargs=(os.getpid(), setup))
    pool.size = workers or os.cpu_count() or 1  # as many as ProcessPoolExecutor starts by default
    return pool


def _start_worker(owner: int, setup: tuple[Callable[..., None], tuple] | None = None) -> None:
    """A pool worker's start: :func:`_one_thread`, :func:`_exit_with` its owner, Ctrl-C
    left to the owner (which stops its workers): a terminal's SIGINT reaches every process of
    its group, and each worker printed its own KeyboardInterrupt traceback; then the pool's
    ``setup``, if any."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _one_thread()
    _exit_with(owner)
    if setup is not None:
        setup[0](*setup[1])


def _one_thread() -> None:
    """Keep this process's numerical libraries on one thread each: NumPy's BLAS, OpenCV and
    torch. OpenBLAS otherwise starts a thread per core for a matrix product as small as the
    input check's (231 x 576 by 576 x 4) and leaves them spinning after it: on a 2-core
    machine they took half of two labelling workers' time and slowed the model beside
    them (bench/RESULTS.md, "Labelling at the model's pace")."""
    import sys

    from threadpoolctl import threadpool_limits

    threadpool_limits(1)
    if "cv2" in sys.modules:
        sys.modules["cv2"].setNumThreads(1)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


def _exit_with(owner: int) -> None:
    """Exit when the process that owns the pool does. Not when the parent does: a worker's
    parent is the fork server, which itself lives as long as any of its workers."""
    import os
    import select
    import threading
    import time

    try:
        handle = os.pidfd_open(owner)  # this very process, whatever pid is reused later
    except (AttributeError, OSError):  # no pidfd (not Linux), or the owner is already gone
        handle = None

    def watch() -> None:
        if handle is not None:
            select.select([handle], [], [])  # readable once the owner has exited
        else:
            while True:
                try:
                    os.kill(owner, 0)
                except ProcessLookupError:
                    break
                except PermissionError:
                    pass
                time.sleep(1)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-owner", daemon=True).start()
