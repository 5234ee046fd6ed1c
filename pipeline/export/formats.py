"""The formats (:data:`FORMATS`) and :func:`export`, which checks the destination and hands the
stream of masks to the format's writer."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy.engine import Engine
from tqdm import tqdm

from pipeline.export.destination import ExportError, _terminate_as_interrupt, check_destination
from pipeline.export.png import export_png
from pipeline.export.rle import export_rle
from pipeline.export.seg import export_seg
from pipeline.export.stream import ExportSummary, items
from pipeline.groups import Selection
from pipeline.masks import CARDIOMEDIASTINUM, STRUCTURES, heart_definition

FORMATS = ("rle", "png", "seg", "sr")


def export(engine: Engine, fmt: str, out: str | Path, selection: Selection, model: str = "default",
           reviewed: bool = False, include_rejected: bool = False, progress: bool = True) -> ExportSummary:
    """Export the selection's masks as ``fmt`` (:data:`FORMATS`) to ``out`` (a CSV file for
    ``rle``, a folder otherwise)."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}: one of {', '.join(FORMATS)}")
    remote = isinstance(out, str) and out.startswith(("http://", "https://", "dimse://"))
    if remote:
        from pipeline.pacs.client import check_url
        from pipeline.pacs.dimse import Store
        out = Store(str(out)).base if str(out).startswith("dimse://") else check_url(str(out))
    else:
        out = Path(out)
        check_destination(fmt, out)
    summary = ExportSummary(Path(out) if not remote else out)  # type: ignore[arg-type]  # a URL, for a PACS
    bar = tqdm(items(engine, selection, model, reviewed, include_rejected, summary), total=len(selection.items),
               desc=f"export {fmt}", unit="img", disable=not progress)
    with engine.connect() as conn:
        older = heart_definition(conn, model) != "heart"
    names = {s: (CARDIOMEDIASTINUM if older and s == "heart" else s) for s in STRUCTURES}
    with _terminate_as_interrupt():
        if remote:
            from pipeline.export.sr import store_results
            store_results(engine, fmt, str(out), iter(bar), summary, names, model)
        elif fmt == "sr":
            from pipeline.export.sr import export_sr
            export_sr(engine, iter(bar), Path(out), summary, model)
        else:
            {"rle": export_rle, "png": export_png, "seg": export_seg}[fmt](iter(bar), Path(out), summary, names)
    return summary
