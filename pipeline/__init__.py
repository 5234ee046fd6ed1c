"""cxrlabel: label chest X-ray archives with heart and lung masks in a SQL catalogue.

Stages (one module each): ``catalogue`` and ``groups`` (stage 1), ``collect`` and ``masks``
(stage 2), ``train`` (stage 3), ``label``, ``measure``, ``evaluate`` and ``report`` (stage 4).
``cli`` is a thin click layer over them.
"""

__version__ = "0.1.0"


class CxrlabelError(Exception):
    """Base class of the errors the CLI turns into a one-line message with a next step."""


def process_pool(workers: int | None = None):
    """A ``ProcessPoolExecutor`` whose workers exit when this process dies, and whose queued
    work is cancelled when its ``with`` block ends in an error.

    Python's pool workers otherwise wait forever on their task queue after the parent is
    killed (``kill -9``, OOM killer), holding memory and the parent's open files; and a
    pool left by an exception would first run every job still queued (a whole archive).
    """
    import os
    from concurrent.futures import ProcessPoolExecutor

    class Pool(ProcessPoolExecutor):
        def __exit__(self, exc_type, exc, tb):
            self.shutdown(wait=True, cancel_futures=exc_type is not None)
            return False

    return Pool(workers, initializer=_exit_with_parent, initargs=(os.getpid(),))


def _exit_with_parent(parent: int) -> None:
    import os
    import threading
    import time

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
