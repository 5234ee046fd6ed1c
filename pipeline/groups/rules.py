"""A rules file read, its keys and types checked, its patterns compiled, each pattern's line kept
(:func:`load_rules`)."""

from __future__ import annotations

import functools
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import CxrlabelError
from pipeline import db as D
from pipeline.regular import read_text
from pipeline.resources import resource


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
    historical: re.Pattern = re.compile(NEVER)  # ConText's historical context, before a phrase
    post_historical: re.Pattern = re.compile(NEVER)  # ... and after it
    experiencer: re.Pattern = re.compile(NEVER)  # ConText's experiencer: someone else's finding
    post_experiencer: re.Pattern = re.compile(NEVER)

    @functools.cached_property
    def context(self) -> re.Pattern:
        """Any cue of the past or of someone else: a clause without one is judged without
        looking for them (most are; judged phrase by phrase they cost a quarter of the pace)."""
        cues = [p.pattern for p in (self.historical, self.post_historical, self.experiencer, self.post_experiencer)
                if p.pattern != NEVER]
        return re.compile("|".join(f"(?:{c})" for c in cues) or NEVER, re.IGNORECASE)

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
    if not path.exists():
        raise GroupsError(f"rules file {path} not found")
    text = read_text(path, GroupsError, "rules file")
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise GroupsError(f"rules file {path} is not valid TOML: {e}") from e
    _validate(raw, path)
    text_lines = text.splitlines()
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
                 alternation("referral"), alternation("statement_end"), alternation("historical"),
                 alternation("post_historical"), alternation("experiencer"), alternation("post_experiencer"))


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
             "referral": list, "statement_end": list, "historical": list, "post_historical": list,
             "experiencer": list, "post_experiencer": list}


_GROUP_KEYS = {"name": str, "labels": list, "match": list, "unless": list, "negatable": bool, "report_ctr": str}

_LISTS_OF_STRINGS = {"negation", "uncertain", "labels", "match", "unless", "post_negation", "post_uncertain",
                     "statement_words", "end_negation", "end_uncertain", "referral",
                     "statement_end", "historical", "post_historical", "experiencer", "post_experiencer"}


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
        # one limit on both databases, checked before a write
        width = int(getattr(D.groups.c.group_name.type, "length", 40))
        if not g["name"].strip() or len(g["name"]) > width or "\x00" in g["name"]:
            raise GroupsError(f"{path}: {where}a group's name is 1 to {width} characters (no NUL): shorten it")
        if g.get("report_ctr", "above") not in ("above", "below"):
            raise GroupsError(f"{path}: {where}report_ctr must be \"above\" or \"below\", not {g['report_ctr']!r}")


_KIND = {list: "list", str: "string", int: "whole number", bool: "true or false"}
