"""One CSV in the layout of CheXmask's published files, plus our columns; merged in uid order into
a new file that replaces the old one only when complete."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

from pipeline.export.destination import RLE_HEADER, RLE_HEADER_OLDER, _written
from pipeline.export.stream import ExportSummary, Item, cell, uncell


def _rle_row(it: Item) -> list[str]:
    return [cell(it.uid), *(it.rle(s) if s in it.masks else "" for s in ("left_lung", "right_lung", "heart")),
            str(it.height), str(it.width), "" if it.ctr is None else f"{it.ctr:.4f}",
            "" if it.quality is None else f"{it.quality:.4f}", cell(it.model),
            "reviewed" if it.reviewers else "model"]


def export_rle(stream: Iterator[Item], out: Path, summary: ExportSummary, names: dict[str, str]) -> None:
    """Merge the new rows into ``out`` in uid order: equal rows kept, others written. The
    heart's column is ``Cardiomediastinum`` for a model whose heart is one (``names``)."""
    out.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    header = RLE_HEADER if names["heart"] == "heart" else RLE_HEADER_OLDER
    old = _old_rows(out, header)
    pending = next(old, None)
    with _written(out) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        for it in stream:
            row = _rle_row(it)
            while pending is not None and uncell(pending[0]) < it.uid:  # no longer exported
                pending = next(old, None)
            if pending is not None and pending == row:
                summary.kept += 1
            else:
                summary.written += 1
            if pending is not None and uncell(pending[0]) == it.uid:
                pending = next(old, None)
            w.writerow(row)


def _old_rows(path: Path, header: list[str]) -> Iterator[list[str]]:
    if not path.exists():
        return
    with open(path, newline="", encoding="utf-8") as f:
        r = csv.reader(f)
        if next(r, None) != header:
            return  # not one of ours: rewritten whole
        yield from r
