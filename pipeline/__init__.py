"""cxrlabel: label chest X-ray archives with heart and lung masks in a SQL catalogue.

Stages (one module each): ``catalogue`` and ``groups`` (stage 1), ``collect`` and ``masks``
(stage 2), ``train`` (stage 3), ``label``, ``measure``, ``evaluate`` and ``report`` (stage 4).
``cli`` is a thin click layer over them.
"""

__version__ = "0.1.0"


class CxrlabelError(Exception):
    """Base class of the errors the CLI turns into a one-line message with a next step."""
