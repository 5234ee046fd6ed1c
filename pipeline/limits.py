"""Time budgets: a block of work that must end within its seconds, or raise the caller's error.

:func:`time_limit` arms a one-shot timer (SIGALRM) in a process's main thread: pure Python is
stopped at once, and so is a regular expression caught backtracking (``re`` checks for
signals as it searches); a C library's own loop is stopped when it returns. Elsewhere (a
thread, a platform without ``setitimer``) the block runs unbounded. Labelling's decoders
(:func:`pipeline.imaging.files.deadline`) and report reading (:mod:`pipeline.groups`) use it.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def time_limit(seconds: float, expired: Callable[[], BaseException]) -> Iterator[None]:
    """Raise ``expired()`` in the block once it has run ``seconds`` (0 or less: no limit)."""
    if (seconds <= 0 or not hasattr(signal, "setitimer")
            or threading.current_thread() is not threading.main_thread()):
        yield
        return

    def on_alarm(_signum, _frame):
        raise expired()

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
