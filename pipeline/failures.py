"""What went wrong, said so a user can act on it: failures listed, and grouped by reason.

A failure's reason is its error class and the last part of its message, the part that is
the same for every image it hits ("DecodeError: file not found"); the rest (uid, path) is
the example. :func:`summary` is what a run prints at its end.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.engine import Engine

from pipeline import db as D

MISSING = "file not found"  # the reason of an image whose file is not on disk


@dataclass
class Reason:
    reason: str
    count: int
    example_uid: str | None
    example: str


def reason_of(error_class: str, message: str) -> str:
    """``"DecodeError", "/x/a.png: file not found"`` -> ``"DecodeError: file not found"``."""
    tail = message.rsplit(": ", 1)[-1].strip()
    return f"{error_class}: {tail}" if tail else error_class


def list_failures(engine: Engine, stage: str | None = None, since: datetime.datetime | None = None,
                  limit: int | None = None) -> list[dict]:
    """Failures newest first, one row per problem (stage and image), optionally of one stage
    and last seen at or after ``since``."""
    f = D.failures
    q = select(f.c.stage, f.c.uid, f.c.error_class, f.c.message, f.c.created_at, f.c.last_seen_at)
    if stage:
        q = q.where(f.c.stage == stage)
    if since is not None:
        q = q.where(f.c.last_seen_at >= since)
    q = q.order_by(f.c.last_seen_at.desc(), f.c.id.desc())
    if limit:
        q = q.limit(limit)
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(q)]


def run_started(engine: Engine, run_id: int) -> datetime.datetime:
    """When label run ``run_id`` started (for ``--since RUN``)."""
    with engine.connect() as conn:
        started = conn.execute(select(D.label_runs.c.started_at).where(D.label_runs.c.id == run_id)).scalar()
    if started is None:
        raise D.DatabaseError(f"no label run {run_id}: see `cxrlabel query \"SELECT id, started_at FROM "
                              "label_runs ORDER BY id DESC\"`")
    return started


def by_reason(rows: list[dict]) -> list[Reason]:
    """Failures grouped by reason, the most frequent first, each with its first example."""
    groups: dict[str, Reason] = {}
    for r in rows:
        key = reason_of(r["error_class"], r["message"])
        if key not in groups:
            groups[key] = Reason(key, 0, r["uid"], r["message"])
        groups[key].count += 1
    return sorted(groups.values(), key=lambda g: -g.count)


def summary(engine: Engine, stage: str, since: datetime.datetime, selected: int, run_id: int | None = None,
            ) -> list[str]:
    """The lines a run prints about its failures: the reasons with counts and an example, a
    hint when most of the selection has no file on disk, and how to see them all."""
    reasons = by_reason(list_failures(engine, stage, since))
    if not reasons:
        return []
    lines = []
    missing = sum(g.count for g in reasons if g.reason.endswith(MISSING))
    if selected and missing > selected / 2:
        lines.append(f"most of the selection ({missing} of {selected}) has no file on disk: the catalogue's "
                     "paths do not lead to the images here; if the archive moved, `cxrlabel catalogue reroot "
                     "OLD_PREFIX NEW_PREFIX`, else load the catalogue again with --image-root")
    for g in reasons:
        lines.append(f"  {g.count} x {g.reason}   e.g. {g.example_uid}: {g.example}")
    see = f"cxrlabel failures --stage {stage}" + (f" --since {run_id}" if run_id is not None else "")
    lines.append(f"see them all: {see}")
    return lines
