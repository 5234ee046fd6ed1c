"""One 1-bit PNG per structure per image in original geometry, and ``index.csv``."""

from __future__ import annotations

import csv
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from pipeline.export.destination import PNG_INDEX_HEADER, _atomic_write, _prepare_folder, _written
from pipeline.export.stream import ExportSummary, Item, cell, safe_name
from pipeline.masks import STRUCTURES, encode


def _own_folder(folder: Path) -> bool:
    """``folder`` itself is a directory (not a symbolic link to one)."""
    return stat.S_ISDIR(os.lstat(folder).st_mode)


def export_png(stream: Iterator[Item], out: Path, summary: ExportSummary, names: dict[str, str]) -> None:
    """``out/<uid>/<structure>.png`` (1-bit, original geometry) and ``out/index.csv``; a heart
    that is a cardiomediastinum (``names``) is ``cardiomediastinum.png``."""
    _prepare_folder("png", out)
    with _written(out / "index.csv") as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(PNG_INDEX_HEADER)
        for it in stream:
            folder = out / safe_name(it.uid)
            try:
                folder.mkdir(exist_ok=True, mode=0o700)
                if not _own_folder(folder):  # a link put in our folder: never followed out of it
                    raise OSError(f"{folder} is a link or not a folder")
            except OSError as e:  # one image's folder that cannot be ours is that image's failure
                reason = f"its folder cannot be written ({e.strerror or e})"
                summary.skipped[reason] = summary.skipped.get(reason, 0) + 1
                continue
            for s in STRUCTURES:
                if s not in it.masks:
                    continue
                mask = it.mask(s)
                data = encode(mask)
                path = folder / f"{names[s]}.png"
                if path.exists() and path.read_bytes() == data:
                    summary.kept += 1
                else:
                    _atomic_write(path, data)
                    summary.written += 1
                w.writerow([cell(it.uid), names[s], cell(f"{folder.name}/{names[s]}.png"), it.height, it.width,
                            int(mask.sum()), cell(it.model), "reviewed" if it.reviewers else "model",
                            "" if it.ctr is None else f"{it.ctr:.4f}",
                            "" if it.quality is None else f"{it.quality:.4f}"])
