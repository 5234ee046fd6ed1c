"""Groups in the database: every catalogued image (re)assigned, one image explained, the
phrasings each group and the ungrouped reports hold (phrases, never whole reports), counts."""

from __future__ import annotations

import logging
import re
from typing import Any

from sqlalchemy import bindparam, delete, func, select, update
from sqlalchemy.engine import Engine
from tqdm import tqdm

from pipeline import db as D
from pipeline.groups.reading import Decision, ReportTimeout, budget, clauses, decide
from pipeline.groups.rules import GroupsError, Rules, load_rules
from pipeline.groups.selections import NO_GROUP

log = logging.getLogger(__name__)


def assign(engine: Engine, rules: Rules | None = None, batch_size: int = 5000,
           progress: bool = True) -> dict[str, int]:
    """(Re)assign every catalogued image; returns counts per group (``None``: no group).
    Also stores the CTR each report states (``images.report_ctr``; NULL where none). A report
    whose reading runs past :data:`pipeline.groups.reading.REPORT_TIMEOUT` gets no group and a
    ``failures`` row (stage ``groups``) naming it; the run goes on."""
    rules = rules or load_rules()
    counts: dict[str, int] = {}
    with engine.connect() as conn:
        total = conn.execute(select(func.count()).select_from(D.images)).scalar() or 0
    bar = tqdm(total=total, desc="groups", unit="img", disable=not progress)
    last = ""
    set_ctr = (update(D.images).where(D.images.c.uid == bindparam("b_uid"))
               .values(report_ctr=bindparam("b_ctr")))
    while True:
        with engine.begin() as conn:
            rows = conn.execute(select(D.images.c.uid, D.images.c.text, D.images.c.labels, D.images.c.report_ctr)
                                .where(D.images.c.uid > last).order_by(D.images.c.uid)
                                .limit(batch_size)).all()
            if not rows:
                break
            now = D.utcnow()
            out, ctrs, read, stalled = [], [], [], []
            for uid, text, labels, stored_ctr in rows:
                try:
                    with budget(uid):
                        d = decide(text, labels, rules)
                    read.append(uid)
                except ReportTimeout as timeout:  # one pathological report is a failure row, not a stalled run
                    stalled.append((uid, timeout))
                    d = Decision(None, "report not read: it took too long")
                counts[d.group or NO_GROUP] = counts.get(d.group or NO_GROUP, 0) + 1
                if d.group:
                    out.append({"uid": uid, "group_name": d.group, "rule": d.reason[:500], "assigned_at": now})
                if d.report_ctr != stored_ctr:
                    ctrs.append({"b_uid": uid, "b_ctr": d.report_ctr})
            for part in D.chunks([r.uid for r in rows]):
                conn.execute(delete(D.groups).where(D.groups.c.uid.in_(part)))
            if out:
                conn.execute(D.groups.insert(), out)
            if ctrs:
                conn.execute(set_ctr, ctrs)
            D.clear_failures(conn, "groups", read)
            for uid, why in stalled:
                D.record_failure(conn, "groups", uid, why)
            last = rows[-1].uid
        bar.update(len(rows))
    bar.close()
    return counts


PHRASE_WORDS = 8  # a phrase is a clause's first words: enough to recognise a wording, never a whole report

_NUMBER = re.compile(r"\d+(?:[.,]\d+)?")

_NOT_WORD = re.compile(r"[^\w#?]+")


def phrase(clause: str) -> str:
    """A clause as :func:`coverage` counts it: lower case (from :func:`clauses`), numbers as
    ``#``, punctuation but a question mark dropped, its first :data:`PHRASE_WORDS` words."""
    words = _NOT_WORD.sub(" ", _NUMBER.sub("#", clause)).split()
    if not any(any(ch.isalpha() for ch in w) for w in words):  # numbers and punctuation alone are no phrasing
        return ""
    return " ".join(words[:PHRASE_WORDS])


def coverage(engine: Engine, rules: Rules | None = None, top: int = 20, group: str | None = None,
             batch_size: int = 5000, progress: bool = True) -> dict[str, list[dict]]:
    """The most frequent phrasings (:func:`phrase` of each report clause) per stored group,
    ``(no group)`` among them, each with its count of reports and an example uid: what a clinic
    reads to see which of its own wordings the rules leave ungrouped (``group``: that group
    only, or ``(no group)``). Reports are read as ``groups assign`` left them."""
    rules = rules or load_rules()
    counted: dict[str, dict[str, list]] = {}
    i, g = D.images, D.groups
    q = select(i.c.uid, i.c.text, g.c.group_name).join(g, g.c.uid == i.c.uid, isouter=True)
    if group == NO_GROUP:
        q = q.where(g.c.group_name.is_(None))
    elif group:
        q = q.where(g.c.group_name == group)
    with engine.connect() as conn:
        total = conn.execute(select(func.count()).select_from(q.subquery())).scalar() or 0
        bar = tqdm(total=total, desc="coverage", unit="report", disable=not progress)
        last = ""
        while True:
            rows = conn.execute(q.where(i.c.uid > last).order_by(i.c.uid).limit(batch_size)).all()
            if not rows:
                break
            for uid, text, name in rows:
                seen = set()
                try:
                    with budget(uid):
                        read = clauses(text or "", rules)
                except ReportTimeout as e:
                    log.warning("%s; left out of the phrasings", e)
                    continue
                for c in read:
                    ph = phrase(c)
                    if ph and ph not in seen:  # a report counts once per phrasing
                        seen.add(ph)
                        entry = counted.setdefault(name or NO_GROUP, {}).setdefault(ph, [0, uid])
                        entry[0] += 1
            last = rows[-1].uid
            bar.update(len(rows))
        bar.close()
    return {name: [{"phrase": ph, "reports": n, "example_uid": uid}
                   for ph, (n, uid) in sorted(found.items(), key=lambda kv: (-kv[1][0], kv[0]))[:top]]
            for name, found in sorted(counted.items())}


def explain(engine: Engine, uid: str, rules: Rules | None = None) -> dict:
    """Why ``uid`` is in its group: the stored group and rule, and the steps of deciding it
    again with ``rules`` (which may differ from the rules it was assigned by)."""
    rules = rules or load_rules()
    with engine.connect() as conn:
        uid = _catalogued_uid(conn, uid)
        row = conn.execute(select(D.images.c.text, D.images.c.labels).where(D.images.c.uid == uid)).one()
        stored = conn.execute(select(D.groups.c.group_name, D.groups.c.rule, D.groups.c.assigned_at)
                              .where(D.groups.c.uid == uid)).first()
    with budget(uid):
        d = decide(row.text, row.labels, rules, trace=True)
    return {"uid": uid, "text": row.text, "labels": row.labels, "rules": rules.source,
            "stored_group": stored.group_name if stored else None, "stored_rule": stored.rule if stored else None,
            "group": d.group, "reason": d.reason, "report_ctr": d.report_ctr, "steps": d.steps}


def _catalogued_uid(conn, given: str) -> str:
    """The catalogue's uid for what a user typed: the uid itself, or a file's name or path
    whose stem is a uid (``00000013_005.png`` is ``00000013_005``); else a GroupsError that
    suggests uids starting alike."""
    from pathlib import PurePath
    i = D.images
    for candidate in dict.fromkeys((given, PurePath(given).name, PurePath(given).stem)):
        if candidate and conn.execute(select(i.c.uid).where(i.c.uid == candidate)).first() is not None:
            return candidate
    stem = PurePath(given).stem or given
    start = stem[:max(len(stem) // 2, 1)]
    like = start.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    close = conn.execute(select(i.c.uid).where(i.c.uid.like(f"{like}%", escape="\\"))
                         .order_by(i.c.uid).limit(3)).scalars().all()
    raise GroupsError(f"image {given!r} is not in the catalogue" + (f": did you mean {', '.join(close)}?" if close else
                      ": see `cxrlabel query \"SELECT uid FROM catalogue LIMIT 5\"` for its uids"))


def counts(engine: Engine) -> dict[str, Any]:
    """``{'groups': [(group, n)], 'samples': [(sample/group, n)]}`` for listings."""
    with engine.connect() as conn:
        g = conn.execute(select(D.groups.c.group_name, func.count()).group_by(D.groups.c.group_name)
                         .order_by(D.groups.c.group_name)).all()
        s = conn.execute(select(D.samples.c.name, D.samples.c.group_name, func.count())
                         .group_by(D.samples.c.name, D.samples.c.group_name)
                         .order_by(D.samples.c.name, D.samples.c.group_name)).all()
        total = conn.execute(select(func.count()).select_from(D.images)).scalar() or 0
    return {"groups": [(a, int(b)) for a, b in g],
            "samples": [(f"{a}/{b}", int(c)) for a, b, c in s], "total": total}
