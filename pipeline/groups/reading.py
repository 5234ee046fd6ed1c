"""One report read: clauses, each phrase judged by the words around it (the four contexts of
ConText, Harkema et al. 2009: negation, doubt, the past and someone else; and the referral's
question), a CTR the report states, and the group decided with its steps."""

from __future__ import annotations

import os
import re
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import NamedTuple

from pipeline.groups.rules import GroupRule, GroupsError, Rules, fold
from pipeline.limits import time_limit

# The most one report's reading may take (seconds; 0: no limit). A report reads in about half a
# millisecond; one that takes longer than this is pathological (a megabyte of repeated clauses)
# or meets a rules pattern that backtracks (`(a+)+$`): it is recorded as a failure, not waited on.
REPORT_TIMEOUT = float(os.environ.get("CXRLABEL_REPORT_TIMEOUT", "1"))


class ReportTimeout(GroupsError):
    pass


def budget(uid: str, seconds: float | None = None) -> AbstractContextManager[None]:
    """Raise :class:`ReportTimeout` naming ``uid`` when reading its report runs past
    ``seconds`` (default :data:`REPORT_TIMEOUT`; :func:`pipeline.limits.time_limit`)."""
    limit = REPORT_TIMEOUT if seconds is None else seconds
    return time_limit(limit, lambda: ReportTimeout(
        f"{uid}: reading its report took longer than {limit:g} s (a pathological report, or a rules pattern "
        "that backtracks): it has no group; see `cxrlabel groups explain` and the rules' patterns, or raise "
        "CXRLABEL_REPORT_TIMEOUT"))


_SPACE = re.compile(r"\s+")


def squeezed(text: str) -> str:
    """``text`` with each run of white space as one character: a line break where the run
    holds one (a sentence ends there), else a space. Linear in the text's length, so the rules'
    patterns never meet a long run (``\\s+`` tried at each of its characters is quadratic)."""
    return _SPACE.sub(lambda m: "\n" if "\n" in m.group(0) else " ", text)


def clauses(text: str, rules: Rules) -> list[str]:
    """The report's clauses, lower-cased, runs of white space read as one: sentences (``sentence_split``; each keeps a
    closing '?', which reads as doubt) cut at contrasting conjunctions (``clause_split``:
    "but", "но", "однако"...). A finding's negation or doubt never reaches past its clause."""
    low = squeezed(fold(text.lower()))
    out, start = [], 0
    for m in rules.split.finditer(low):
        out.append(low[start:m.start()] + ("?" if "?" in m.group(0) else ""))
        start = m.end()
    out.append(low[start:])
    return [" ".join(c.split()) for s in out for c in rules.clause_split.split(s) if c and c.strip(" ,")]


class Hit(NamedTuple):
    """One pattern found in one clause, and what the words around it make of it."""

    verdict: str  # 'yes', 'negated', 'uncertain'; or, none of them a finding of today's film of this
    # patient: 'asked' (the referral's question), 'historical' (the past), 'other' (someone else's)
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


def judge(clause: str, start: int, end: int, rules: Rules, negatable: bool = True, context: bool = True
          ) -> tuple[str, str | None]:
    """``(verdict, cue)`` of the words ``clause[start:end]`` (a stem's match reaches to its
    word's end). 'other' when an ``experiencer`` cue starts in the ``window`` words before or
    inside them, or a ``post_experiencer`` cue stands after them in their comma-stretch ("у
    матери кардиомегалия", "family history of cardiomegaly", "cardiomegaly in the patient's
    father"): someone else's finding; else 'historical' likewise with the ``historical``
    cues ("в анамнезе", "history of", "ранее выявленная"): a past finding, not today's
    film's. Neither counts for a group nor vetoes one, whatever negation or doubt stands
    beside it (``context``: False where the clause holds no such cue, :attr:`Rules.context`).
    Otherwise 'uncertain' when a doubt cue is inside them, in the ``window`` words before (or
    a parenthetical doubt just before a comma: "вероятно, ..."), in the ``post_window`` words
    after, closing their comma-stretch (``end_uncertain``: "... не исключается", "...?"), or
    standing alone after a comma at the clause's end ("cardiomegaly, questionable"); else
    'negated' when a negation stands likewise (``negation`` before: across a comma only into
    a list it opened; ``post_negation`` after; ``end_negation`` closing the
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
    if context:
        around = f"{pre} {rest.strip()}"  # a cue that starts before the words' end governs them
        for verdict, cues, after in (("other", rules.experiencer, rules.post_experiencer),
                                     ("historical", rules.historical, rules.post_historical)):
            if (found := next((m for m in cues.finditer(around) if m.start() < len(pre)), None)
                    or after.search(rest)):
                return verdict, found.group(0).strip()
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


class Clause:
    """A clause of the report, and what :func:`judge` reads of it, once per report: the
    referral's question that opens it, and (asked only where a phrase matched in it) whether
    it holds a cue of the past or of someone else (:attr:`Rules.context`)."""

    __slots__ = ("text", "asked", "_context", "_rules")

    def __init__(self, text: str, rules: Rules) -> None:
        self.text, self.asked, self._rules = text, rules.referral.search(text), rules
        self._context: bool | None = None

    @property
    def context(self) -> bool:
        if self._context is None:
            self._context = self._rules.context.search(self.text) is not None
        return self._context


def marked(clause_list: list[str], rules: Rules) -> list[Clause]:
    return [Clause(c, rules) for c in clause_list]


def find(clause_list: list[Clause], patterns: list[re.Pattern], rules: Rules, negatable: bool = True,
         until: tuple[str, ...] = ()) -> list[Hit]:
    """The matches of ``patterns`` in the clauses (:func:`marked`), judged (:func:`judge`): all
    of them, or up to the first whose verdict is in ``until``."""
    hits = []
    for clause in clause_list:
        c, asked = clause.text, clause.asked
        for p in patterns:
            for m in p.finditer(c):
                cue: str | None
                if asked and asked.start() <= m.start():
                    verdict, cue = "asked", asked.group(0).strip()
                else:
                    verdict, cue = judge(c, m.start(), m.end(), rules, negatable, clause.context)
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
    for m in rules.ctr.finditer(squeezed(fold(text.lower()))):
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
            "asked": f"asked by the referral {h.cue!r}, not a finding",
            "historical": f"a past finding ({h.cue!r}), not today's",
            "other": f"said of someone else ({h.cue!r}), not the patient"}[h.verdict]
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
    ...", "С целью исключения ..."), of the past ("в анамнезе") or of someone else ("у
    матери") is neither a finding nor a veto.
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
    read = marked(found, rules)
    ctr = report_ctr(text, rules)
    evidence = ctr_evidence(ctr)
    steps = [f"clauses: {found}"]
    if ctr:
        steps.append(f"report states CTR {ctr.value:.2f} ({ctr.words!r}): " +
                     (f"{evidence} 0.5" if evidence else "at 0.5, no evidence either way"))
    for g in rules.groups:
        hits = find(read, g.match, rules, g.negatable, until=stop)
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
        judged = find(read, g.unless, rules, until=() if trace else ("yes", "uncertain"))
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
