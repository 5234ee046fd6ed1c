"""The structures labelled, measured, reviewed and exported, in the standard definitions of
JSRT/SCR and CheXmask (the heart alone; lungs with no pixel behind the heart, mediastinum or
diaphragm), the cardiomediastinum a source may draw instead, and what each source defines."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sqlalchemy import select
from sqlalchemy.engine import Connection

from pipeline import CxrlabelError
from pipeline import db as D


class MaskImportError(CxrlabelError):
    pass


# The structures labelled, measured, reviewed and exported, in the standard definitions of
# JSRT/SCR and CheXmask: the heart alone, and lungs with no pixel behind the heart,
# mediastinum or diaphragm (left/right: the patient's).
STRUCTURES = ("heart", "left_lung", "right_lung")

CARDIOMEDIASTINUM = "cardiomediastinum"  # heart plus upper mediastinum: GeneralBlockchain's only heart class

# What a model may also learn from a source that draws it (an auxiliary output, never labelled)
TRAINED = (*STRUCTURES, CARDIOMEDIASTINUM)

LUNGS = ("left_lung", "right_lung")

HEARTS = ("heart", CARDIOMEDIASTINUM)  # a lung pixel over one of these teaches nothing (a source's convention)

DEFINITIONS = {
    "heart": "the heart alone (JSRT/SCR, CheXmask)",
    CARDIOMEDIASTINUM: "heart and upper mediastinum (the cardiomediastinal silhouette)",
    "left_lung": "the patient's left lung",
    "right_lung": "the patient's right lung",
}


LUNG_CONVENTIONS = {
    "scr": "no pixel behind the heart, mediastinum or diaphragm (SCR)",
    "behind-heart": "drawn on behind the heart",
}


def source_definitions(structures: Sequence[str], lungs: str) -> dict[str, str]:
    """What each structure of an annotated source means, as ``mask_sources`` records it."""
    if lungs not in LUNG_CONVENTIONS:
        raise MaskImportError(f"--lungs {lungs!r}: one of {', '.join(LUNG_CONVENTIONS)}")
    return {s: DEFINITIONS[s] + (f"; {LUNG_CONVENTIONS[lungs]}" if s in LUNGS else "") for s in structures}


def record_source(conn: Connection, source: str, definitions: dict[str, str]) -> None:
    """The definitions of ``source``'s manual masks (one row a source, the latest import's)."""
    import json
    D.upsert(conn, D.mask_sources, [{"source": source, "definitions": json.dumps(definitions, sort_keys=True),
                                     "imported_at": D.utcnow()}], ["source"])


def overlap_ignored(masks: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per lung, the pixels its own source also drew as heart or cardiomediastinum: a lung
    drawn on behind the heart (GeneralBlockchain's left lung, 7 Wingspan films). Such pixels
    teach nothing and count in no Dice: the lungs are compared in their own convention."""
    cover = None
    for h in HEARTS:
        if h in masks:
            cover = masks[h] if cover is None else cover | masks[h]
    return {s: masks[s] & cover for s in LUNGS if s in masks and cover is not None}


def heart_definition(conn: Connection, model: str) -> str:
    """What ``model``'s stored `heart` masks are, from its label runs: ``heart`` (the heart
    alone), ``cardiomediastinum`` (models trained before 2026-12-05), or ``mixed``."""
    r = D.label_runs
    found = set(conn.execute(select(r.c.heart_definition).where(r.c.model == model).distinct()).scalars())
    found = {d or CARDIOMEDIASTINUM for d in found} or {"heart"}
    return found.pop() if len(found) == 1 else "mixed"
