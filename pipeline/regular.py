"""Files a user names (a rules file, a CSV, a ``.sql`` file, an image), opened only when they
are regular files: a FIFO, a socket or a device in a file's place is refused with a line that
says what it is, never waited on (:func:`open_regular`)."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

from pipeline import CxrlabelError

_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder"))


def kind_of(mode: int) -> str:
    """What a file of ``st_mode`` is, in words, for a message."""
    return next((words for test, words in _KINDS if test(mode)), "not a regular file")


def open_regular(path: str | Path, error: type[Exception] = CxrlabelError,
                 not_regular: type[Exception] | None = None, only: str = "only regular files are read") -> BinaryIO:
    """``path`` opened for binary reading when it is a regular file (links followed). Else
    ``error`` (not found, not readable) or ``not_regular`` (default ``error``) naming the path
    and what it is, with ``only`` as the way out. Opened without blocking and checked on the
    open descriptor, so a FIFO put in a file's place never makes it wait."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError as e:
        raise error(f"{path}: file not found") from e
    except IsADirectoryError as e:
        raise (not_regular or error)(f"{path}: a folder, not a regular file: {only}") from e
    except OSError as e:  # ENXIO: a FIFO or socket nobody writes to; EACCES...
        raise error(f"{path}: cannot be opened ({e.strerror or e})") from e
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise (not_regular or error)(f"{path}: {kind_of(mode)}, not a regular file: {only}")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_text(path: str | Path, error: type[Exception] = CxrlabelError, what: str = "file") -> str:
    """The UTF-8 text of the regular file ``path`` (:func:`open_regular`); ``error`` naming it,
    and the way out, when it is none or is not UTF-8."""
    with open_regular(path, error, only=f"give the {what} itself") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{path}: the {what} is not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r}); "
                    "save it as UTF-8") from e


def check_output_file(path: str | Path, ours, error: type[Exception] = CxrlabelError, what: str = "file") -> Path:
    """``path`` as a file cxrlabel may write (a score, a figure, a checkpoint), the guard an
    export has: a new file in a folder that exists, or a file ``ours(path)`` recognises as one
    it wrote before; never a link (written through, it lands outside), a folder, a FIFO or a
    device, nor a file of someone else's. ``error`` names the path and the way out."""
    p = Path(path)
    if p.is_symlink():
        raise error(f"{path}: a symbolic link (writing through it lands at {os.path.realpath(p)}): name the "
                    f"{what} by a path of its own")
    if not p.parent.is_dir():
        raise error(f"{path}: the folder {p.parent} does not exist: create it (mkdir -p {p.parent}) or choose another")
    if p.exists():
        mode = p.stat().st_mode
        if not stat.S_ISREG(mode):
            raise error(f"{path}: {kind_of(mode)}, not a file: name a {what} to write")
        try:
            mine = bool(ours(p))
        except Exception:  # unreadable, or not what it says: not recognisably ours
            mine = False
        if not mine:
            raise error(f"{path}: a file cxrlabel did not write: choose another path for the {what}, or move that "
                        "file away first")
    return p
