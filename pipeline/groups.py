"""Stage 1b: groups of interest from report text, named samples, and selections.

Rules are data (``pipeline/rules/default.toml``, or ``--rules FILE`` in the same form): see
that file's header for how they are read. :func:`classify` is a pure function of the text
and structured labels, so the same rules run anywhere.
"""

from __future__ import annotations

import logging
import random
import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from sqlalchemy import delete, func, select
from sqlalchemy.engine import Connection, Engine
from tqdm import tqdm

from pipeline import CxrlabelError
from pipeline import db as D
from pipeline.resources import resource

log = logging.getLogger(__name__)



class GroupsError(CxrlabelError):
    pass


@dataclass
class GroupRule:
    name: str
    labels: list[str]
    match: list[re.Pattern]
    unless: list[re.Pattern] = field(default_factory=list)
    negatable: bool = True  # false where the phrases carry their own negation ("no acute ...")


@dataclass
class Rules:
    groups: list[GroupRule]
    negation: re.Pattern
    uncertain: re.Pattern
    split: re.Pattern
    window: int = 6
    source: str = "default"

    @property
    def names(self) -> list[str]:
        return [g.name for g in self.groups]


def _compile(patterns: list[str], where: str) -> list[re.Pattern]:
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p, re.IGNORECASE))
        except re.error as e:
            raise GroupsError(f"{where}: bad pattern {p!r}: {e}") from e
    return out


def load_rules(path: str | Path | None = None) -> Rules:
    """Parse and compile a rules file (default: the shipped English/Russian rules)."""
    path = Path(path) if path else resource("rules", "default.toml")
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise GroupsError(f"rules file {path} not found") from None
    except tomllib.TOMLDecodeError as e:
        raise GroupsError(f"rules file {path} is not valid TOML: {e}") from e
    _validate(raw, path)
    groups = []
    for g in raw["group"]:
        groups.append(GroupRule(g["name"], list(g.get("labels", [])),
                                _compile(g["match"], f"{path} {g['name']}.match"),
                                _compile(g.get("unless", []), f"{path} {g['name']}.unless"),
                                bool(g.get("negatable", True))))

    def alternation(key: str) -> re.Pattern:
        pats = raw.get(key, []) or [r"(?!x)x"]
        _compile(pats, f"{path} {key}")
        return re.compile("|".join(f"(?:{p})" for p in pats), re.IGNORECASE)

    split = _compile([raw.get("sentence_split", r"[.;!?\n]+")], f"{path} sentence_split")[0]
    return Rules(groups, alternation("negation"), alternation("uncertain"), split, int(raw.get("window", 6)),
                 str(path))


_TOP_KEYS = {"group": list, "negation": list, "uncertain": list, "sentence_split": str, "window": int}
_GROUP_KEYS = {"name": str, "labels": list, "match": list, "unless": list, "negatable": bool}
_LISTS_OF_STRINGS = {"negation", "uncertain", "labels", "match", "unless"}


def _validate(raw: dict, path: Path) -> None:
    """Types and known keys of a rules file, with the group and key named in the error."""
    def check(table: dict, schema: dict, where: str) -> None:
        for key, value in table.items():
            if key not in schema:
                raise GroupsError(f"{path}: {where}unknown key {key!r}; known: {', '.join(schema)}")
            want = schema[key]
            if not isinstance(value, want) or (want is int and isinstance(value, bool)):
                raise GroupsError(f"{path}: {where}{key} must be a {_KIND[want]}, not {value!r}")
            if key in _LISTS_OF_STRINGS and not all(isinstance(v, str) for v in value):
                raise GroupsError(f"{path}: {where}{key} must be a list of strings (patterns)")

    check(raw, _TOP_KEYS, "")
    if not raw.get("group"):
        raise GroupsError(f"rules file {path} defines no [[group]] tables")
    if raw.get("window", 1) < 1:
        raise GroupsError(f"{path}: window must be a positive number of words, not {raw['window']!r}")
    for i, g in enumerate(raw["group"]):
        if not isinstance(g, dict):
            raise GroupsError(f"{path}: group #{i + 1} must be a [[group]] table")
        where = f"group {g.get('name', f'#{i + 1}')!r}: "
        check(g, _GROUP_KEYS, where)
        if "name" not in g or "match" not in g:
            raise GroupsError(f"{path}: {where}needs `name` and `match`")


_KIND = {list: "list", str: "string", int: "whole number", bool: "true or false"}


def _cue_before(sentence: str, start: int, end: int, cue: re.Pattern, window: int) -> bool:
    """A cue in the ``window`` words before ``start``, or inside the match itself."""
    before = sentence[:start].split()[-window:]
    return bool(cue.search(" ".join(before) + " " + sentence[start:end]))


def _find(sentences: list[str], patterns: list[re.Pattern], rules: Rules,
          negatable: bool = True) -> tuple[str, str | None]:
    """``('yes'|'uncertain'|'no', matched text)`` over sentences, negated matches ignored."""
    uncertain = None
    for s in sentences:
        for p in patterns:
            for m in p.finditer(s):
                if negatable and _cue_before(s, m.start(), m.end(), rules.negation, rules.window):
                    continue
                if _cue_before(s, m.start(), m.end(), rules.uncertain, rules.window):
                    uncertain = uncertain or m.group(0)
                    continue
                return "yes", m.group(0)
    return ("uncertain", uncertain) if uncertain else ("no", None)


def classify(text: str | None, labels: str | None, rules: Rules) -> tuple[str | None, str]:
    """The group of one image and the reason: ``('cardiomegaly', "text: 'enlarged heart'")``.

    Returns ``(None, reason)`` when no group applies or the text is ambiguous.
    """
    label_set = {x.strip().lower() for x in (labels or "").split("|") if x.strip()}
    for g in rules.groups:
        for lab in g.labels:
            low = lab.lower()
            if low in label_set and (low != "no finding" or len(label_set) == 1):
                return g.name, f"label: {lab}"
    if not text or not text.strip():
        return None, "no text"
    sentences = [s.strip() for s in rules.split.split(text.lower()) if s.strip()]
    for g in rules.groups:
        verdict, hit = _find(sentences, g.match, rules, g.negatable)
        if verdict == "uncertain":
            return None, f"uncertain {g.name}: {hit!r}"
        if verdict == "no":
            continue
        if g.unless:
            veto, what = _find(sentences, g.unless, rules)
            if veto == "yes":
                continue
        return g.name, f"text: {hit!r}"
    return None, "no rule matched"


# ---------------------------------------------------------------- in the database


def assign(engine: Engine, rules: Rules | None = None, batch_size: int = 5000,
           progress: bool = True) -> dict[str, int]:
    """(Re)assign every catalogued image; returns counts per group (``None``: no group)."""
    rules = rules or load_rules()
    counts: dict[str, int] = {}
    with engine.connect() as conn:
        total = conn.execute(select(func.count()).select_from(D.images)).scalar() or 0
    bar = tqdm(total=total, desc="groups", unit="img", disable=not progress)
    last = ""
    while True:
        with engine.begin() as conn:
            rows = conn.execute(select(D.images.c.uid, D.images.c.text, D.images.c.labels)
                                .where(D.images.c.uid > last).order_by(D.images.c.uid)
                                .limit(batch_size)).all()
            if not rows:
                break
            now = D.utcnow()
            out = []
            for uid, text, labels in rows:
                name, why = classify(text, labels, rules)
                counts[name or "none"] = counts.get(name or "none", 0) + 1
                if name:
                    out.append({"uid": uid, "group_name": name, "rule": why[:500], "assigned_at": now})
            for part in D.chunks([r.uid for r in rows]):
                conn.execute(delete(D.groups).where(D.groups.c.uid.in_(part)))
            if out:
                conn.execute(D.groups.insert(), out)
            last = rows[-1].uid
        bar.update(len(rows))
    bar.close()
    return counts


@dataclass
class SampleSummary:
    name: str
    per_group: dict[str, int]
    short: dict[str, int]  # groups that had fewer images than asked, taken whole


def sample(engine: Engine, name: str, per_group: int, seed: int = 0,
           groups: Sequence[str] | None = None) -> SampleSummary:
    """Balanced, reproducible sample stored as ``name`` (replacing one of that name)."""
    if per_group < 1:
        raise GroupsError(f"--per-group must be at least 1, got {per_group}")
    with engine.begin() as conn:
        present = sorted(conn.execute(select(D.groups.c.group_name).distinct()).scalars())
        if not present:
            raise GroupsError("no groups assigned yet: run `cxrlabel groups assign` first")
        wanted = list(groups) if groups else present
        missing = [g for g in wanted if g not in present]
        if missing:
            raise GroupsError(f"group(s) {missing} have no images; present: {present}")
        taken, short = {}, {}
        conn.execute(delete(D.samples).where(D.samples.c.name == name))
        now = D.utcnow()
        for g in wanted:
            uids = sorted(conn.execute(select(D.groups.c.uid)
                                       .where(D.groups.c.group_name == g)).scalars())
            chosen = uids if len(uids) <= per_group else random.Random(f"{seed}:{g}").sample(uids, per_group)
            if len(uids) < per_group:
                short[g] = len(uids)
            for part in D.chunks(chosen, 5000):
                conn.execute(D.samples.insert(), [{"name": name, "uid": u, "group_name": g,
                                                   "created_at": now} for u in part])
            taken[g] = len(chosen)
    return SampleSummary(name, taken, short)


def counts(engine: Engine) -> dict[str, list[tuple[str, int]]]:
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


class Selected(NamedTuple):
    """What a batch needs of one selected image."""

    uid: str
    path: str | None
    spacing: tuple[float | None, float | None]  # mm per pixel (x, y) where known
    view: str | None


@dataclass
class Selection:
    items: list[Selected]
    description: str  # e.g. "group=cardiomegaly source=nih limit=100", stored in label_runs

    def pairs(self) -> list[tuple[str, str | None]]:
        """``(uid, source path)`` of every item: what the cache needs."""
        return [(it.uid, it.path) for it in self.items]


def describe(group: str | None = None, sample_name: str | None = None, source: str | None = None,
             limit: int | None = None) -> str:
    what = f"group={group}" if group else f"sample={sample_name}" if sample_name else "all"
    what += f" source={source}" if source else ""
    return what + (f" limit={limit}" if limit else "")


def select_images(conn: Connection, group: str | None = None, sample_name: str | None = None,
                  all_images: bool = False, limit: int | None = None,
                  source: str | None = None) -> Selection:
    """The images of one selection, sorted by uid: a group, a sample, or everything;
    ``source`` narrows any of them to one dataset (``images.source``)."""
    chosen = sum(bool(x) for x in (group, sample_name, all_images))
    if chosen != 1 and not (chosen == 0 and source):
        raise GroupsError("choose exactly one of --group, --sample or --all (or --source alone)")
    i = D.images
    q = select(i.c.uid, i.c.path, i.c.spacing_x, i.c.spacing_y, i.c.view)
    if group:
        q = q.join(D.groups, D.groups.c.uid == i.c.uid).where(D.groups.c.group_name == group)
    elif sample_name:
        q = q.join(D.samples, D.samples.c.uid == i.c.uid).where(D.samples.c.name == sample_name)
    if source:
        q = q.where(i.c.source == source)
    q = q.order_by(i.c.uid)
    if limit:
        q = q.limit(limit)
    items = [Selected(uid, path, (sx, sy), view) for uid, path, sx, sy, view in conn.execute(q)]
    if not items:
        what = f"group {group!r}" if group else f"sample {sample_name!r}" if sample_name else "catalogue"
        what += f" (source {source!r})" if source else ""
        raise GroupsError(f"{what} has no images: see `cxrlabel groups list`")
    return Selection(items, describe(group, sample_name, source, limit))
