"""The loaders by format (:data:`LOADERS`; the CLI's choices follow it) and :func:`load`;
images re-rooted after a move; the catalogue and its load errors listed."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import bindparam, column, func, or_, select, table, update
from sqlalchemy.engine import Engine
from tqdm import tqdm

from pipeline import db as D
from pipeline.catalogue.dicom import load_dicom
from pipeline.catalogue.openi import load_openi
from pipeline.catalogue.records import CatalogueError, LoadSummary
from pipeline.catalogue.tables import load_csv, load_nih, parse_mapping


@dataclass
class LoadOptions:
    """Every loader's options (the ``catalogue load`` command's); each loader reads its own."""

    image_root: Path | None = None
    mapping: tuple[str, ...] = ()  # csv: FIELD=COLUMN pairs
    encoding: str = "utf-8"
    delimiter: str = ","
    source_name: str = "csv"
    workers: int | None = None
    uid_from: str = "path"
    text_csv: Path | None = None
    text_key: str = "sop_uid"
    text_key_column: str | None = None
    text_column: str = "text"
    # dicomweb: what to ask the PACS for (pipeline.catalogue.dicomweb)
    modalities: tuple[str, ...] = ("CR", "DX")
    study_date: str | None = None
    body_part: str | None = None
    page_size: int = 500
    fields: str = "metadata"  # metadata (every header field, a request a series) | qido (its answer only)
    allow_http: bool = False
    aet: str = "CXRLABEL"  # dimse: our AE title
    called_aet: str | None = None  # dimse: the PACS's
    move_port: int | None = None  # dimse: retrieve by C-MOVE to our storage SCP on this port (None: C-GET)


LOADERS: dict[str, Callable[[Engine, Any, LoadOptions], LoadSummary]] = {  # a Path, or dicomweb's URL
    "nih": lambda engine, source, o: load_nih(engine, source, o.image_root),
    "openi": lambda engine, source, o: load_openi(engine, source, o.image_root),
    "dicom": lambda engine, source, o: load_dicom(engine, source, o.workers, o.uid_from, o.text_csv,
                                                  o.text_key, o.text_column, o.text_key_column),
    "dicomweb": lambda engine, source, o: _load_dicomweb(engine, str(source), o),
    "dimse": lambda engine, source, o: _load_dimse(engine, str(source), o),
    "csv": lambda engine, source, o: load_csv(engine, source, parse_mapping(o.mapping), o.image_root,
                                              o.encoding, o.delimiter, o.source_name),
}


def load(engine: Engine, fmt: str, source: Path | str, options: LoadOptions | None = None) -> LoadSummary:
    """Load ``source`` as ``fmt`` (one of :data:`LOADERS`)."""
    if fmt not in LOADERS:  # (MONAI's look_up_option would import torch for one dict look-up)
        raise CatalogueError(f"unknown catalogue format {fmt!r}: use one of {', '.join(LOADERS)}")
    return LOADERS[fmt](engine, source if fmt in REMOTE else Path(source), options or LoadOptions())


REMOTE = ("dicomweb", "dimse")  # formats whose source is a PACS's address, not a file


def _load_dimse(engine: Engine, address: str, o: LoadOptions) -> LoadSummary:
    from pipeline.catalogue.dicom import _text_lookup
    from pipeline.catalogue.dicomweb import PacsQuery, load_dimse
    if not o.called_aet:
        raise CatalogueError("dimse: give the PACS's AE title with --called-aet (and ours with --aet)")
    texts = _text_lookup(o.text_csv, o.text_key_column or o.text_key, o.text_column) if o.text_csv else None
    return load_dimse(engine, address, o.called_aet, o.aet, PacsQuery(tuple(o.modalities), o.study_date,
                                                                        o.body_part), o.source_name, texts, o.text_key,
                      move_port=o.move_port)


def _load_dicomweb(engine: Engine, url: str, o: LoadOptions) -> LoadSummary:
    from pipeline.catalogue.dicom import _text_lookup
    from pipeline.catalogue.dicomweb import PacsQuery, load_dicomweb
    texts = _text_lookup(o.text_csv, o.text_key_column or o.text_key, o.text_column) if o.text_csv else None
    query = PacsQuery(tuple(o.modalities), o.study_date, o.body_part, o.page_size, o.fields == "metadata")
    return load_dicomweb(engine, url, query, o.source_name, texts, o.text_key, o.allow_http or None)


@dataclass
class RerootSummary:
    changed: int
    existing: int  # of the changed rows, how many new paths lead to a file


REROOT_PROBE = 100  # new paths checked before a reroot is committed


def reroot(engine: Engine, old: str, new: str, progress: bool = True, force: bool = False) -> RerootSummary:
    """Move an archive in the catalogue: every image path under the folder ``old`` now lies
    under ``new`` instead (whole path components only), in one transaction. Refused, with
    nothing changed, when none of up to :data:`REROOT_PROBE` of the new paths leads to a file
    (a mistyped ``new``), unless ``force``."""
    if not str(old):
        raise CatalogueError("reroot: OLD_PREFIX is empty: give the folder the paths start with")
    base, new = str(old).rstrip("/"), str(Path(new).resolve())  # base "" is the root folder
    t = D.images
    with engine.begin() as conn:
        # only the rows under it come back (a prefix the database can compare), then exactly
        under = func.substr(t.c.path, 1, len(base) + 1) == base + "/"
        rows = conn.execute(select(t.c.uid, t.c.path).where(or_(t.c.path == base, under))).all()
        moved = {uid: new + path[len(base):] for uid, path in rows}
        paths = list(moved.values())
        probe = paths[::max(1, len(paths) // REROOT_PROBE)][:REROOT_PROBE]
        if probe and not force and not any(os.path.isfile(p) for p in probe):
            raise CatalogueError(f"reroot: none of {len(probe)} of the {len(paths)} new paths under {new} leads to "
                                 f"a file (e.g. {probe[0]}): nothing changed; check NEW_PREFIX, or give --force "
                                 "to move them anyway")
        for part in D.chunks(list(moved.items())):
            conn.execute(update(t).where(t.c.uid == bindparam("u")).values(path=bindparam("p")),
                         [{"u": uid, "p": path} for uid, path in part])
    existing = sum(os.path.exists(p) for p in tqdm(moved.values(), desc="check paths", unit="path",
                                                   disable=not progress or not moved))
    return RerootSummary(len(moved), existing)


def list_errors(engine: Engine, limit: int = 50) -> list[dict]:
    """Malformed rows recorded by loads (``load_errors``), newest first."""
    t = D.load_errors
    with engine.connect() as conn:
        rows = conn.execute(select(t.c.source_file, t.c.line, t.c.uid, t.c.reason, t.c.last_seen_at)
                            .order_by(t.c.id.desc()).limit(limit))
        return [{**r._mapping, "line": r.line or None, "uid": r.uid or None} for r in rows]


CATALOGUE_VIEW = table("catalogue", *(column(c) for c in (
    "uid", "patient_id", "age", "sex", "view", "study_date", "group_name", "source", "text")))


def list_rows(engine: Engine, uids: list[str]) -> list[dict]:
    """Rows of the ``catalogue`` view for ``uids``, by uid."""
    v = CATALOGUE_VIEW
    with engine.connect() as conn:
        rows = [dict(r._mapping) for r in D.rows_in(conn, select(*v.c), v.c.uid, uids)]
    return sorted(rows, key=lambda r: r["uid"])
