"""Where an export may write (:func:`check_destination`: a new path, a CSV with our header, a
folder marked as ours) and writing there safely: ``.partial`` files renamed when whole, owner-only
modes, an interrupt or a write error never leaving half a file.
The headers here are how an export knows its own files again."""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import os
import signal
import stat
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from pipeline import CxrlabelError

CHEXMASK_COLUMNS = {"left_lung": "Left Lung", "right_lung": "Right Lung", "heart": "Heart"}

RLE_HEADER = ["Image ID", "Left Lung", "Right Lung", "Heart", "Height", "Width", "CTR", "Quality", "Model", "Masks"]

# a model whose `heart` is GeneralBlockchain's cardiomediastinum (trained before 2026-12-05):
# its column says so, so that code written for CheXmask's `Heart` never reads it as the heart
RLE_HEADER_OLDER = [("Cardiomediastinum" if c == "Heart" else c) for c in RLE_HEADER]

PNG_INDEX_HEADER = ["uid", "structure", "file", "height", "width", "area", "model", "masks", "ctr", "quality"]

MARKER = ".cxrlabel-export"  # in a folder export: the format it holds; only such folders are written into

WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS, errno.EACCES, errno.EPERM}


class ExportError(CxrlabelError):
    pass


def check_destination(fmt: str, out: Path) -> None:
    """Refuse an ``--out`` that is not, or not yet, this export's own: a device, FIFO or
    socket; for ``rle`` a file that is not an RLE CSV of ours (an empty file is taken); for
    ``png``/``seg`` a file, or a folder with other content and no :data:`MARKER` of the same
    format (earlier exports without one are recognised by their content)."""
    try:
        mode = out.stat().st_mode
    except FileNotFoundError:
        return
    except OSError as e:
        raise ExportError(f"--out {out}: cannot be read ({e.strerror or e}): choose another place") from None
    if fmt == "rle":
        if stat.S_ISDIR(mode):
            raise ExportError(f"{out} is a folder: `export rle` writes one CSV file, e.g. --out {out / 'masks.csv'}")
        if not stat.S_ISREG(mode):
            raise ExportError(f"--out {out} is not a regular file (a device, FIFO or socket): "
                              "`export rle` writes a CSV file; choose a file path")
        if out.stat().st_size and not _is_our_csv(out):
            raise ExportError(f"{out} exists and is not a cxrlabel rle export (its first line is not our header): "
                              "choose another --out; cxrlabel never overwrites a file it did not write")
        return
    if not stat.S_ISDIR(mode):
        raise ExportError(f"--out {out} is a file, not a folder: `export {fmt}` writes a folder of its own; "
                          "choose a new or empty folder")
    if (out / MARKER).is_file():
        found = (out / MARKER).read_text(errors="replace").strip()
        if found != fmt:
            raise ExportError(f"{out} holds a cxrlabel {found or 'unknown'} export, not {fmt}: choose another --out")
        return
    entries = [e for e in os.listdir(out) if not e.startswith(".")]
    if entries and not _earlier_export(fmt, out, entries):
        raise ExportError(f"{out} is a folder with other content ({len(entries)} entries) and no {MARKER}: "
                          "choose a new or empty folder; cxrlabel never writes into a folder it did not make")


def _is_our_csv(path: Path, header: list[str] | None = None) -> bool:
    from pipeline.imaging import DecodeError, open_regular
    try:  # a FIFO in a foreign folder is not ours, and is never waited on
        with open_regular(path) as raw, io.TextIOWrapper(raw, encoding="utf-8", newline="") as f:
            return next(csv.reader(f), None) in ([header] if header else [RLE_HEADER, RLE_HEADER_OLDER])
    except (OSError, UnicodeDecodeError, csv.Error, DecodeError):
        return False


def _earlier_export(fmt: str, out: Path, entries: list[str]) -> bool:
    """An export folder written before :data:`MARKER` existed: png's index.csv with our header;
    seg files of ours only (made by cxrlabel)."""
    if fmt == "png":
        return "index.csv" in entries and _is_our_csv(out / "index.csv", PNG_INDEX_HEADER)
    if not all(e.endswith((".dcm", ".partial")) for e in entries):
        return False
    import pydicom

    from pipeline.imaging import open_regular
    try:
        with open_regular(out / sorted(e for e in entries if e.endswith(".dcm"))[0]) as f:
            first = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["Manufacturer"])
    except Exception:  # unreadable, or not a regular file: not recognisably ours
        return False
    return str(first.get("Manufacturer", "")) == "cxrlabel"


def _prepare_folder(fmt: str, out: Path) -> None:
    """Make the export folder (0700) and mark it as this format's."""
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not (out / MARKER).is_file():
        _atomic_write(out / MARKER, f"{fmt}\n".encode())


@contextlib.contextmanager
def _written(path: Path) -> Iterator[Path]:
    """A ``.partial`` beside ``path`` to write; renamed over ``path`` when the block ends, and
    removed when it does not (an error, Ctrl-C, SIGTERM). A write error names ``path``."""
    tmp = _partial(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError) and e.errno in WRITE_ERRNOS:
            raise ExportError(f"cannot write {path}: {e.strerror or e}: free space there or choose another --out "
                              "(what was exported before is kept)") from None
        raise


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM during an export raises KeyboardInterrupt, so its partial file is removed as
    after Ctrl-C (the default action would end the process where it stands)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(_signum, _frame):
        raise KeyboardInterrupt("terminated")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _partial(path: Path) -> Path:
    """Where ``path`` is written before it replaces the old one: a file of its own for each
    writer, so two exports to one place never write into each other's half-written file."""
    try:
        fd, name = tempfile.mkstemp(prefix=f"{path.name}.", suffix=".partial", dir=path.parent)
    except OSError as e:
        raise ExportError(f"cannot write in {path.parent}: {e.strerror or e}: choose another --out") from None
    os.close(fd)
    return Path(name)


def _atomic_write(path: Path, data: bytes) -> None:
    with _written(path) as tmp:
        tmp.write_bytes(data)
