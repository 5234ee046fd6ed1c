"""Data files cxrlabel needs at run time: presets, SQL views, ready queries, the shipped model.

In the repository they live where readers look for them (``sql/``, ``models/``); a built
wheel carries them inside the package (``pipeline/sql/``, ``pipeline/models/``, mapped in
``pyproject.toml``). :func:`resource` finds a file in either place, so an editable install,
a plain ``pip install .`` and a source checkout all run the same.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from pipeline import CxrlabelError

_CHECKOUT = Path(__file__).resolve().parent.parent


class ResourceMissing(CxrlabelError):
    pass


def resource(*parts: str) -> Path:
    """Path of a shipped data file, e.g. ``resource("sql", "views.sql")``."""
    packaged = files("pipeline").joinpath(*parts)
    if packaged.is_file():  # pip installs unpack wheels: the resource is a real file
        return Path(str(packaged))
    in_checkout = _CHECKOUT.joinpath(*parts)
    if in_checkout.is_file():
        return in_checkout
    raise ResourceMissing(f"{'/'.join(parts)} is missing from this cxrlabel installation: "
                          "reinstall it (`pip install .` or `make install`)")


def ready_queries() -> dict[str, Path]:
    """The ready queries shipped in ``sql/queries``, by name (file stem)."""
    folder = resource("sql", "views.sql").parent / "queries"
    return {p.stem: p for p in sorted(folder.glob("*.sql"))}
