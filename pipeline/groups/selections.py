"""Named samples drawn from groups, and the selections a stage works on: which images, what a
batch needs of each, and a description of the choice."""

from __future__ import annotations

import itertools
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from sqlalchemy import delete, select
from sqlalchemy.engine import Connection, Engine

from pipeline import db as D
from pipeline.groups.rules import GroupsError


@dataclass
class SampleSummary:
    name: str
    per_group: dict[str, int]
    short: dict[str, int]  # groups that had fewer images than asked, taken whole


def sample(engine: Engine, name: str, per_group: int, seed: int = 0,
           groups: Sequence[str] | None = None, source: str | None = None, on_disk: bool = False) -> SampleSummary:
    """Balanced, reproducible sample stored as ``name`` (replacing one of that name), drawn
    from each group's images of ``source`` (when given) whose file is on this machine (with
    ``on_disk``: a pilot drawn from rows without files failed on every one)."""
    if per_group < 1:
        raise GroupsError(f"--per-group must be at least 1, got {per_group}")
    with engine.begin() as conn:
        present = sorted(conn.execute(select(D.groups.c.group_name).distinct()).scalars())
        if not present:
            raise GroupsError("no groups assigned yet: run `cxrlabel groups assign` first")
        wanted = list(groups) if groups else present
        missing = [g for g in wanted if g not in present]
        if missing:
            raise GroupsError(f"no group named {', '.join(map(repr, missing))}: there are {', '.join(present)} "
                              "(`cxrlabel groups list`)")
        taken, short = {}, {}
        conn.execute(delete(D.samples).where(D.samples.c.name == name))
        now = D.utcnow()
        for g in wanted:
            q = (select(D.groups.c.uid, D.images.c.path).join(D.images, D.images.c.uid == D.groups.c.uid)
                 .where(D.groups.c.group_name == g))
            if source:
                q = q.where(D.images.c.source == source)
            uids = sorted(uid for uid, path in conn.execute(q) if not on_disk or on_this_machine(path))
            chosen = uids if len(uids) <= per_group else random.Random(f"{seed}:{g}").sample(uids, per_group)
            if len(uids) < per_group:
                short[g] = len(uids)
            for part in D.chunks(chosen, 5000):
                conn.execute(D.samples.insert(), [{"name": name, "uid": u, "group_name": g,
                                                   "created_at": now} for u in part])
            taken[g] = len(chosen)
    return SampleSummary(name, taken, short)


NO_GROUP = "(no group)"  # what `groups assign` counts images the rules put in no group as: group_name NULL


class Selected(NamedTuple):
    """What a batch needs of one selected image."""

    uid: str
    path: str | None
    spacing: tuple[float | None, float | None]  # mm per pixel (x, y) where known
    view: str | None
    modality: str | None = None  # a DICOM's Modality, BodyPartExamined: the input check reads them
    body_part: str | None = None
    size: tuple[int | None, int | None] = (None, None)  # the catalogue's width and height, of ``spacing``
    spacing_source: str | None = None  # where ``spacing`` came from (measure.calibrate)
    age: int | None = None  # the patient's, in whole years: the widths in mm are checked against it


@dataclass
class Selection:
    items: list[Selected]
    description: str  # e.g. "group=cardiomegaly source=nih limit=100", stored in label_runs

    def pairs(self) -> list[tuple[str, str | None]]:
        """``(uid, source path)`` of every item: what the cache needs."""
        return [(it.uid, it.path) for it in self.items]


def describe(group: str | None = None, sample_name: str | None = None, source: str | None = None,
             limit: int | None = None, on_disk: bool = False) -> str:
    what = f"group={group}" if group else f"sample={sample_name}" if sample_name else "all"
    what += f" source={source}" if source else ""
    what += " on-disk" if on_disk else ""
    return what + (f" limit={limit}" if limit else "")


def on_this_machine(path: str | None) -> bool:
    """Whether a catalogued path is a file here (a PACS or a moved disk's path is not)."""
    return bool(path) and os.path.isfile(str(path))


def select_images(conn: Connection, group: str | None = None, sample_name: str | None = None,
                  all_images: bool = False, limit: int | None = None,
                  source: str | None = None, labelled_by: str | None = None, on_disk: bool = False) -> Selection:
    """The images of one selection, sorted by uid: a group, a sample, or everything;
    ``source`` narrows any of them to one dataset (``images.source``), ``labelled_by`` to the
    images that model labelled, ``on_disk`` to those whose file is on this machine (``limit``
    counts those)."""
    chosen = sum(bool(x) for x in (group, sample_name, all_images))
    if chosen != 1 and not (chosen == 0 and source):
        raise GroupsError("choose exactly one of --group, --sample or --all (or --source alone)")
    i = D.images
    q = select(i.c.uid, i.c.path, i.c.spacing_x, i.c.spacing_y, i.c.view, i.c.modality, i.c.body_part,
               i.c.width, i.c.height, i.c.spacing_source, i.c.age)
    if group:
        q = q.join(D.groups, D.groups.c.uid == i.c.uid).where(D.groups.c.group_name == group)
    elif sample_name:
        q = q.join(D.samples, D.samples.c.uid == i.c.uid).where(D.samples.c.name == sample_name)
    if source:
        q = q.where(i.c.source == source)
    if labelled_by:
        m = D.measurements
        q = q.join(m, (m.c.uid == i.c.uid) & (m.c.model == labelled_by))
    q = q.order_by(i.c.uid)
    if limit and not on_disk:
        q = q.limit(limit)
    seen = 0

    def counted(rows):
        nonlocal seen
        for r in rows:
            seen += 1
            yield r

    rows = (r for r in counted(conn.execute(q)) if not on_disk or on_this_machine(r.path))
    items = [Selected(uid, path, (sx, sy), view, modality, part, (w, h), spacing_from, age)
             for uid, path, sx, sy, view, modality, part, w, h, spacing_from, age in itertools.islice(rows, limit)]
    if not items:
        if seen:  # there were images: none is on this machine
            raise GroupsError(f"none of the {seen} images of this selection has its file on this machine "
                              "(--on-disk): `cxrlabel catalogue reroot` if the archive moved")
        raise GroupsError(why_empty(conn, group, sample_name, source, labelled_by))
    return Selection(items, describe(group, sample_name, source, limit, on_disk))


def missing_name(conn: Connection, group: str | None = None, sample_name: str | None = None,
                 source: str | None = None, labelled_by: str | None = None) -> str | None:
    """The message for the first of the given group, sample, source or model (one with labels)
    that does not exist, naming those that do; None when every given name exists."""
    for given, column, kind, hint in (
            (group, D.groups.c.group_name, "group", "`cxrlabel groups list`"),
            (sample_name, D.samples.c.name, "sample", "`cxrlabel groups sample` makes one"),
            (source, D.images.c.source, "source", "`cxrlabel status`"),
            (labelled_by, D.measurements.c.model, "model with labels", "`cxrlabel label --model NAME` labels")):
        if given and conn.execute(select(column).where(column == given).limit(1)).first() is None:
            known = [str(v) for v in conn.execute(select(column).distinct().order_by(column).limit(20)).scalars()]
            return (f"no {kind} named {given!r}: " + (f"there are {', '.join(known)}" if known else "there is none yet")
                    + f" ({hint})")
    return None


def why_empty(conn: Connection, group: str | None, sample_name: str | None, source: str | None,
              labelled_by: str | None) -> str:
    """Why a selection holds no image, most basic reason first: a group, sample, source or
    model that does not exist (:func:`missing_name`), else nothing labelled there yet."""
    if missing := missing_name(conn, group, sample_name, source, labelled_by):
        return missing
    what = f"group {group!r}" if group else f"sample {sample_name!r}" if sample_name else "catalogue"
    what += f" (source {source!r})" if source else ""
    if labelled_by:
        return f"{what} has no images labelled by model {labelled_by!r}: run `cxrlabel label` first"
    if what == "catalogue":
        return "the catalogue has no images yet: load them with `cxrlabel catalogue load FORMAT SOURCE`"
    return f"{what} has no images: see `cxrlabel groups list`"
