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
from typing import Any, NamedTuple

from sqlalchemy import bindparam, delete, func, select, update
from sqlalchemy.engine import Connection, Engine
from tqdm import tqdm

from pipeline import CxrlabelError
from pipeline import db as D
from pipeline.resources import resource

log = logging.getLogger(__name__)



class GroupsError(CxrlabelError):
    pass


NEVER = r"(?!x)x"  # a pattern that matches nothing: an empty cue list


@dataclass
class GroupRule:
    name: str
    labels: list[str]
    match: list[re.Pattern]
    unless: list[re.Pattern] = field(default_factory=list)
    negatable: bool = True  # false where the phrases carry their own negation ("no acute ...")
    report_ctr: str | None = None  # "above" / "below": a CTR written in the report above / below 0.5 counts
    lines: dict[str, int] = field(default_factory=dict)  # compiled pattern -> its line in the rules file


@dataclass
class Rules:
    groups: list[GroupRule]
    negation: re.Pattern
    uncertain: re.Pattern
    split: re.Pattern
    window: int = 6
    source: str = "default"
    post_negation: re.Pattern = re.compile(NEVER)
    post_uncertain: re.Pattern = re.compile(NEVER)
    post_window: int = 3
    clause_split: re.Pattern = re.compile(NEVER)
    ctr: re.Pattern | None = None
    statement_words: re.Pattern = re.compile(NEVER)
    end_negation: re.Pattern = re.compile(NEVER)
    end_uncertain: re.Pattern = re.compile(NEVER)
    referral: re.Pattern = re.compile(NEVER)
    statement_end: re.Pattern = re.compile(NEVER)

    @property
    def names(self) -> list[str]:
        return [g.name for g in self.groups]


def fold(text: str) -> str:
    """Text and patterns as the rules compare them: ё read as е (Russian writes either)."""
    return text.replace("ё", "е").replace("Ё", "Е")


def _compile(patterns: list[str], where: str) -> list[re.Pattern]:
    out = []
    for p in patterns:
        try:
            out.append(re.compile(fold(p), re.IGNORECASE))
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
    text_lines = Path(path).read_text(encoding="utf-8").splitlines()
    groups = []
    for g in raw["group"]:
        match = _compile(g["match"], f"{path} {g['name']}.match")
        unless = _compile(g.get("unless", []), f"{path} {g['name']}.unless")
        start = _line_of(text_lines, [f'name = "{g["name"]}"', f"name = '{g['name']}'"]) or 1
        lines = {c.pattern: n for raw_p, c in zip([*g["match"], *g.get("unless", [])], [*match, *unless], strict=True)
                 if (n := _line_of(text_lines, _written(raw_p), start + 1))}
        groups.append(GroupRule(g["name"], list(g.get("labels", [])), match, unless,
                                bool(g.get("negatable", True)), g.get("report_ctr"), lines))

    def alternation(key: str) -> re.Pattern:
        pats = raw.get(key, []) or [NEVER]
        _compile(pats, f"{path} {key}")
        return re.compile(fold("|".join(f"(?:{p})" for p in pats)), re.IGNORECASE)

    def one(key: str, default: str) -> re.Pattern:
        return _compile([raw.get(key, default)], f"{path} {key}")[0]

    ctr = one("report_ctr", NEVER) if "report_ctr" in raw else None
    if ctr is not None and "value" not in ctr.groupindex:
        raise GroupsError(f"{path}: report_ctr needs a (?P<value>...) group for the number")
    return Rules(groups, alternation("negation"), alternation("uncertain"), one("sentence_split", r"[.;!?\n]+"),
                 int(raw.get("window", 6)), str(path), alternation("post_negation"),
                 alternation("post_uncertain"), int(raw.get("post_window", 3)), one("clause_split", NEVER), ctr,
                 alternation("statement_words"), alternation("end_negation"), alternation("end_uncertain"),
                 alternation("referral"), alternation("statement_end"))


def _written(pattern: str) -> list[str]:
    """How a pattern may be written in TOML: a literal string, or a basic one with its
    backslashes and quotes escaped."""
    return [f"'{pattern}'", '"' + pattern.replace("\\", "\\\\").replace('"', '\\"') + '"']


def _line_of(lines: list[str], written: list[str], start: int = 1) -> int | None:
    """The first line (1-based, from ``start``) holding one of the ``written`` forms."""
    for n in range(start - 1, len(lines)):
        if any(w in lines[n] for w in written):
            return n + 1
    return None


_TOP_KEYS = {"group": list, "negation": list, "uncertain": list, "sentence_split": str, "window": int,
             "post_negation": list, "post_uncertain": list, "post_window": int, "clause_split": str,
             "report_ctr": str, "statement_words": list, "end_negation": list, "end_uncertain": list,
             "referral": list, "statement_end": list}
_GROUP_KEYS = {"name": str, "labels": list, "match": list, "unless": list, "negatable": bool, "report_ctr": str}
_LISTS_OF_STRINGS = {"negation", "uncertain", "labels", "match", "unless", "post_negation", "post_uncertain",
                     "statement_words", "end_negation", "end_uncertain", "referral",
                     "statement_end"}


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
    for key in ("window", "post_window"):
        if raw.get(key, 1) < 1:
            raise GroupsError(f"{path}: {key} must be a positive number of words, not {raw[key]!r}")
    for i, g in enumerate(raw["group"]):
        if not isinstance(g, dict):
            raise GroupsError(f"{path}: group #{i + 1} must be a [[group]] table")
        where = f"group {g.get('name', f'#{i + 1}')!r}: "
        check(g, _GROUP_KEYS, where)
        if "name" not in g or "match" not in g:
            raise GroupsError(f"{path}: {where}needs `name` and `match`")
        if g.get("report_ctr", "above") not in ("above", "below"):
            raise GroupsError(f"{path}: {where}report_ctr must be \"above\" or \"below\", not {g['report_ctr']!r}")


_KIND = {list: "list", str: "string", int: "whole number", bool: "true or false"}


# ---------------------------------------------------------------- reading a report


def clauses(text: str, rules: Rules) -> list[str]:
    """The report's clauses, lower-cased, runs of white space read as one: sentences (``sentence_split``; each keeps a
    closing '?', which reads as doubt) cut at contrasting conjunctions (``clause_split``:
    "but", "но", "однако"...). A finding's negation or doubt never reaches past its clause."""
    low = fold(text.lower())
    out, start = [], 0
    for m in rules.split.finditer(low):
        out.append(low[start:m.start()] + ("?" if "?" in m.group(0) else ""))
        start = m.end()
    out.append(low[start:])
    return [" ".join(c.split()) for s in out for c in rules.clause_split.split(s) if c and c.strip(" ,")]


class Hit(NamedTuple):
    """One pattern found in one clause, and what the words around it make of it."""

    verdict: str  # 'yes', 'negated', 'uncertain', or 'asked' (the referral's question, not a finding)
    words: str  # the matched words
    clause: str
    cue: str | None = None  # the negation or doubt, where one decided
    pattern: str = ""  # the rule's pattern that matched (GroupRule.lines: its line in the file)


def _list_item(before: str, words: str, rules: Rules) -> bool:
    """A negation before a comma still governs ``words`` when they are an item of the list
    it opened ("no effusion, pleural thickening or pneumothorax", "без очаговых,
    инфильтративных изменений"): a single word, or the list's last item after "or"/"или", at
    most four words after the last comma, none of them one that starts a statement of its
    own (``statement_words``: "в", "справа", "is"...). A statement ("..., сердце расширено",
    "..., справа пневмония") is not, and neither is what follows a negation that closed its
    own statement before the comma (``statement_end``: "сердце не расширено, аорта уплотнена")."""
    head, after = before.rsplit(",", 1)
    if rules.statement_end.search(head.rstrip()):
        return False
    after_comma = after.split()
    last_item = len(words.split()) == 1 or (after_comma[:1] and after_comma[0] in _LAST_ITEM)
    return bool(last_item and len(after_comma) <= 4 and not rules.statement_words.search(" ".join(after_comma)))


_LAST_ITEM = {"or", "and", "nor", "или", "и", "либо", "ни"}  # the conjunction before a list's last item


_WORD_REST = re.compile(r"\w*")


def judge(clause: str, start: int, end: int, rules: Rules, negatable: bool = True) -> tuple[str, str | None]:
    """``(verdict, cue)`` of the words ``clause[start:end]`` (a stem's match reaches to its
    word's end). 'uncertain' when a doubt cue is inside them, in the ``window`` words before
    (or a parenthetical doubt just before a comma: "вероятно, ..."), in the ``post_window``
    words after, closing their comma-stretch (``end_uncertain``: "... не исключается",
    "...?"), or standing alone after a comma at the clause's end ("cardiomegaly,
    questionable"); else 'negated' when a negation stands likewise (``negation`` before: across a
    comma only into a list it opened; ``post_negation`` after; ``end_negation`` closing the
    stretch: "очаговых теней в лёгких не выявлено"); else 'yes'."""
    end = m.end() if (m := _WORD_REST.match(clause, end)) else end
    words, before = clause[start:end], clause[:start]
    tail = before
    parenthetical = ""
    if "," in before:
        head, tail_part = before.rsplit(",", 1)
        if not _list_item(before, words, rules):
            tail = tail_part
        last = " ".join(head.split()[-3:])
        if (cue := _last(rules.uncertain, last)) is not None:
            parenthetical = cue
    pre = " ".join(tail.split()[-rules.window:]) + " " + words
    rest = clause[end:].split(",", 1)[0]
    post = " ".join(rest.split()[:rules.post_window])
    alone = clause[end:].split(",")[-1] if "," in clause[end:] else ""
    if len(alone.split()) <= 3 and (found := rules.post_uncertain.search(alone)):  # "cardiomegaly, questionable"
        return "uncertain", found.group(0).strip()
    checks = (("uncertain", rules.uncertain, rules.post_uncertain, rules.end_uncertain, True),
              ("negated", rules.negation, rules.post_negation, rules.end_negation, negatable))
    for verdict, cues, after, closing, check in checks:
        if not check:
            continue
        if verdict == "uncertain" and parenthetical:
            return verdict, parenthetical
        for text, pattern in ((pre, cues), (post, after), (rest, closing)):
            if found := pattern.search(text):
                return verdict, found.group(0).strip()
    return "yes", None


def _last(pattern: re.Pattern, text: str) -> str | None:
    """``pattern``'s match that ends ``text`` (bar punctuation), or None."""
    text = text.rstrip(" ,")
    for m in pattern.finditer(text):
        if m.end() >= len(text.rstrip(" ,.;:-")):
            return m.group(0).strip()
    return None


def find(clause_list: list[str], patterns: list[re.Pattern], rules: Rules, negatable: bool = True,
         until: tuple[str, ...] = ()) -> list[Hit]:
    """The matches of ``patterns`` in the clauses, judged (:func:`judge`): all of them, or up
    to the first whose verdict is in ``until``."""
    hits = []
    for c in clause_list:
        asked = rules.referral.search(c)
        for p in patterns:
            for m in p.finditer(c):
                cue: str | None
                if asked and asked.start() <= m.start():
                    verdict, cue = "asked", asked.group(0).strip()
                else:
                    verdict, cue = judge(c, m.start(), m.end(), rules, negatable)
                hits.append(Hit(verdict, m.group(0), c, cue, p.pattern))
                if verdict in until:
                    return hits
    return hits


class ReportCtr(NamedTuple):
    """A cardiothoracic ratio written in a report ("КТИ 0,58", "CTR = 55 %", "КТИ > 0,5")."""

    value: float  # as a ratio
    bound: str  # '' for a stated value; '>' or '<' for a bound ("КТИ > 0,5"), not a number to store
    words: str


_ABOVE = (">", "≥", "более", "больше", "over", "above", "greater")
_BELOW = ("<", "≤", "менее", "меньше", "under", "below", "less")


def report_ctr(text: str | None, rules: Rules) -> ReportCtr | None:
    """The first plausible (0.2-0.9) CTR the report states (``report_ctr`` of the rules), or None."""
    if not text or rules.ctr is None:
        return None
    for m in rules.ctr.finditer(fold(text.lower())):
        v = float(m.group("value").replace(",", "."))
        v = v / 100 if v > 1.5 else v
        if 0.2 <= v <= 0.9:
            cmp = (m.groupdict().get("cmp") or "").strip()
            bound = ">" if cmp.startswith(_ABOVE) else "<" if cmp.startswith(_BELOW) else ""
            return ReportCtr(v, bound, m.group(0).strip())
    return None


def ctr_evidence(ctr: ReportCtr | None) -> str | None:
    """'above' or 'below' 0.5: what a stated CTR says of the heart's size (None: nothing)."""
    if ctr is None:
        return None
    if ctr.value > 0.5 and ctr.bound != "<" or ctr.value == 0.5 and ctr.bound == ">":
        return "above"
    if ctr.value < 0.5 and ctr.bound != ">" or ctr.value == 0.5 and ctr.bound == "<":
        return "below"
    return None


@dataclass
class Decision:
    """An image's group, the reason stored with it, and every step that led there."""

    group: str | None
    reason: str
    steps: list[str] = field(default_factory=list)
    report_ctr: float | None = None


def _describe(h: Hit, g: GroupRule) -> str:
    said = {"yes": "counts", "negated": f"negated by {h.cue!r}", "uncertain": f"doubted by {h.cue!r}",
            "asked": f"asked by the referral {h.cue!r}, not a finding"}[h.verdict]
    return f"{h.words!r} in {h.clause!r}: {said}{_line(h, g)}"


def _line(h: Hit, g: GroupRule) -> str:
    """`` (rules line N)``: where the rules file writes the pattern ``h`` matched ('' if unknown)."""
    return f" (rules line {g.lines[h.pattern]})" if h.pattern in g.lines else ""


def decide(text: str | None, labels: str | None, rules: Rules, trace: bool = False) -> Decision:
    """The group of one image, with its reasons (``cxrlabel groups explain`` prints them).

    Structured labels decide first. Otherwise each group in order: its phrases (and a CTR the
    report states, where the group reads one) are looked for clause by clause; a doubted
    phrase makes the image ambiguous (no group); a counted one decides unless an ``unless``
    phrase counts or is doubted somewhere in the report, or the stated CTR contradicts it.
    A phrase after a ``referral`` cue in its clause (the clinician's question: "Indication: r/o
    ...", "С целью исключения ...") is neither a finding nor a veto.
    ``trace``: judge every phrase for the steps (else each search stops at the first that
    decides; the group is the same).
    """
    stop = () if trace else ("yes",)
    label_set = {x.strip().lower() for x in (labels or "").split("|") if x.strip()}
    for g in rules.groups:
        for lab in g.labels:
            low = lab.lower()
            if low in label_set and (low != "no finding" or len(label_set) == 1):
                return Decision(g.name, f"label: {lab}", [f"structured label {lab!r} -> {g.name}"])
    if not text or not text.strip():
        return Decision(None, "no text", ["no report text and no deciding label"])
    found = clauses(text, rules)
    ctr = report_ctr(text, rules)
    evidence = ctr_evidence(ctr)
    steps = [f"clauses: {found}"]
    if ctr:
        steps.append(f"report states CTR {ctr.value:.2f} ({ctr.words!r}): " +
                     (f"{evidence} 0.5" if evidence else "at 0.5, no evidence either way"))
    for g in rules.groups:
        hits = find(found, g.match, rules, g.negatable, until=stop)
        steps += [f"{g.name}: {_describe(h, g)}" for h in hits]
        counted = [h for h in hits if h.verdict == "yes"]
        doubted = [h for h in hits if h.verdict == "uncertain"]
        by_ctr = g.report_ctr is not None and evidence == g.report_ctr
        against_ctr = g.report_ctr is not None and evidence is not None and evidence != g.report_ctr
        if doubted and not counted and not by_ctr:
            steps.append(f"{g.name}: only doubted -> no group")
            return Decision(None, f"uncertain {g.name}: {doubted[0].words!r}", steps, _exact(ctr))
        if not counted and not by_ctr:
            continue
        if against_ctr and g.report_ctr == "above":  # the text says enlarged, the stated CTR does not
            assert ctr is not None  # a stated CTR is what contradicts
            steps.append(f"{g.name}: contradicted by the stated CTR {ctr.value:.2f} -> no group")
            return Decision(None, f"conflict {g.name}: {counted[0].words!r} vs CTR {ctr.value:.2f}", steps,
                            _exact(ctr))
        judged = find(found, g.unless, rules, until=() if trace else ("yes", "uncertain"))
        vetoes = [h for h in judged if h.verdict in ("yes", "uncertain")]
        steps += [f"{g.name} unless: {_describe(h, g)}" for h in judged]
        if vetoes or (against_ctr and g.report_ctr == "below"):
            steps.append(f"{g.name}: vetoed -> next group")
            continue
        why = (f"text: {counted[0].words!r}{_line(counted[0], g)}" if counted or ctr is None
               else f"report CTR {ctr.value:.2f}")
        steps.append(f"{g.name}: decided by {why}")
        return Decision(g.name, why, steps, _exact(ctr))
    steps.append("no group's phrase counted")
    return Decision(None, "no rule matched", steps, _exact(ctr))


def _exact(ctr: ReportCtr | None) -> float | None:
    return round(ctr.value, 4) if ctr and not ctr.bound else None


def classify(text: str | None, labels: str | None, rules: Rules) -> tuple[str | None, str]:
    """The group of one image and the reason: ``('cardiomegaly', "text: 'enlarged heart'")``.

    Returns ``(None, reason)`` when no group applies or the text is ambiguous.
    """
    d = decide(text, labels, rules)
    return d.group, d.reason


# ---------------------------------------------------------------- in the database


def assign(engine: Engine, rules: Rules | None = None, batch_size: int = 5000,
           progress: bool = True) -> dict[str, int]:
    """(Re)assign every catalogued image; returns counts per group (``None``: no group).
    Also stores the CTR each report states (``images.report_ctr``; NULL where none)."""
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
            out, ctrs = [], []
            for uid, text, labels, stored_ctr in rows:
                d = decide(text, labels, rules)
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
                for c in clauses(text or "", rules):
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
        row = conn.execute(select(D.images.c.text, D.images.c.labels).where(D.images.c.uid == uid)).first()
        if row is None:
            raise GroupsError(f"image {uid!r} is not in the catalogue: see `cxrlabel query \"SELECT uid FROM "
                              f"catalogue LIMIT 5\"` for its uids")
        stored = conn.execute(select(D.groups.c.group_name, D.groups.c.rule, D.groups.c.assigned_at)
                              .where(D.groups.c.uid == uid)).first()
    d = decide(row.text, row.labels, rules, trace=True)
    return {"uid": uid, "text": row.text, "labels": row.labels, "rules": rules.source,
            "stored_group": stored.group_name if stored else None, "stored_rule": stored.rule if stored else None,
            "group": d.group, "reason": d.reason, "report_ctr": d.report_ctr, "steps": d.steps}


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
                  source: str | None = None, labelled_by: str | None = None) -> Selection:
    """The images of one selection, sorted by uid: a group, a sample, or everything;
    ``source`` narrows any of them to one dataset (``images.source``), ``labelled_by`` to the
    images that model labelled."""
    chosen = sum(bool(x) for x in (group, sample_name, all_images))
    if chosen != 1 and not (chosen == 0 and source):
        raise GroupsError("choose exactly one of --group, --sample or --all (or --source alone)")
    i = D.images
    q = select(i.c.uid, i.c.path, i.c.spacing_x, i.c.spacing_y, i.c.view, i.c.modality, i.c.body_part,
               i.c.width, i.c.height, i.c.spacing_source)
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
    if limit:
        q = q.limit(limit)
    items = [Selected(uid, path, (sx, sy), view, modality, part, (w, h), spacing_from)
             for uid, path, sx, sy, view, modality, part, w, h, spacing_from in conn.execute(q)]
    if not items:
        raise GroupsError(why_empty(conn, group, sample_name, source, labelled_by))
    return Selection(items, describe(group, sample_name, source, limit))


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
    return f"{what} has no images: see `cxrlabel groups list`"
