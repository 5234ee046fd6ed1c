"""Stage 1b: groups of interest from report text, named samples, and selections.

Rules are data (``pipeline/rules/default.toml``, or ``--rules FILE`` in the same form): see
that file's header for how they are read.

* :mod:`~pipeline.groups.rules`: a rules file read, checked and compiled (:func:`load_rules`);
* :mod:`~pipeline.groups.reading`: one report read clause by clause and judged
  (:func:`decide`, :func:`classify`: pure functions of the text and structured labels, so the
  same rules run anywhere);
* :mod:`~pipeline.groups.database`: every catalogued image grouped (:func:`assign`), one
  image's steps (:func:`explain`), the phrasings each group and the ungrouped hold
  (:func:`coverage`), counts;
* :mod:`~pipeline.groups.selections`: named samples and the selections a stage works on
  (:class:`Selection`).
"""

from pipeline.groups.database import (  # noqa: F401
    _NOT_WORD,
    _NUMBER,
    PHRASE_WORDS,
    assign,
    counts,
    coverage,
    explain,
    phrase,
)
from pipeline.groups.reading import (  # noqa: F401
    _ABOVE,
    _BELOW,
    _LAST_ITEM,
    _WORD_REST,
    Decision,
    Hit,
    ReportCtr,
    _describe,
    _exact,
    _last,
    _line,
    _list_item,
    classify,
    clauses,
    ctr_evidence,
    decide,
    find,
    judge,
    report_ctr,
)
from pipeline.groups.rules import (  # noqa: F401
    _GROUP_KEYS,
    _KIND,
    _LISTS_OF_STRINGS,
    _TOP_KEYS,
    NEVER,
    GroupRule,
    GroupsError,
    Rules,
    _compile,
    _line_of,
    _validate,
    _written,
    fold,
    load_rules,
)
from pipeline.groups.selections import (  # noqa: F401
    NO_GROUP,
    SampleSummary,
    Selected,
    Selection,
    describe,
    missing_name,
    sample,
    select_images,
    why_empty,
)
