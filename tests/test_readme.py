"""README's commands run as written on the demo's data (issue 42): every ``bash`` block, in
order, from a folder laid out as a checkout after ``make demo`` (``data/`` with the catalogue,
the cache and the demo clinic; ``../shared`` beside it), but the blocks marked
``<!-- not run on the demo data: REASON -->`` (the demo itself, a PACS of one's own).

The ``../shared`` beside that folder is the real one but for the NIH catalogue, cut to its
first 2,000 rows and the rows of the two NIH films in ``nih-samples`` (the whole 112,120 rows
cost minutes of loading and grouping twice, and change nothing the commands show)."""

import gzip
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import DATA

pytestmark = [pytest.mark.slow, pytest.mark.readme]

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
SKIP = re.compile(r"<!-- not run on the demo data: (.+?) -->\s*$")
SKIPPED = {"these make the demo and run the tests", "a PACS of your own"}  # and the Orthanc trial, below
NIH = Path("catalogues") / "nih" / "Data_Entry_2017_v2020.csv.gz"
NIH_ROWS = 2000


def blocks(readme: str) -> list[tuple[int, str, str | None]]:
    """``(line, script, reason not run or None)`` of every ``bash`` block."""
    out, lines = [], readme.splitlines()
    n = 0
    while n < len(lines):
        if lines[n].strip() == "```bash":
            end = lines.index("```", n + 1)
            before = next((lines[k] for k in range(n - 1, -1, -1) if lines[k].strip()), "")
            reason = SKIP.match(before.strip())
            out.append((n + 1, "\n".join(lines[n + 1:end]), reason.group(1) if reason else None))
            n = end
        n += 1
    return out


RUN = [(line, script) for line, script, reason in blocks(README.read_text()) if reason is None]


def test_the_readme_marks_only_what_the_demo_cannot_run():
    got = blocks(README.read_text())
    reasons = [r for _, _, r in got if r]
    assert {r for r in reasons if "PACS server" not in r} == SKIPPED and len(reasons) == 3
    assert len(RUN) >= 3 and all("cxrlabel" in script for _, script in RUN)


def shared_with_a_slice_of_nih(root: Path) -> Path:
    """``root/shared``: the real shared folder's entries, but the NIH catalogue cut short."""
    shared = root / "shared"
    data = shared / "data"
    for entry in DATA.iterdir():
        if entry.name != "catalogues":
            (data / entry.name).parent.mkdir(parents=True, exist_ok=True)
            (data / entry.name).symlink_to(entry.resolve())
    for entry in (DATA / "catalogues").iterdir():
        if entry.name != "nih":
            (data / "catalogues" / entry.name).parent.mkdir(parents=True, exist_ok=True)
            (data / "catalogues" / entry.name).symlink_to(entry.resolve())
    (data / NIH).parent.mkdir(parents=True)
    films = {p.name for p in (DATA / "nih-samples").glob("*.png")}
    with gzip.open(DATA / NIH, "rt") as src, gzip.open(data / NIH, "wt") as dst:
        for n, line in enumerate(src):
            if n <= NIH_ROWS or line.split(",", 1)[0] in films:
                dst.write(line)
    for entry in (DATA / NIH).parent.iterdir():
        if entry.name != NIH.name:
            (data / NIH).parent.joinpath(entry.name).symlink_to(entry.resolve())
    return shared


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A folder as a checkout is after ``make demo`` (12 clinic films, not 200), ``../shared``
    beside it."""
    root = tmp_path_factory.mktemp("readme")
    shared = shared_with_a_slice_of_nih(root)
    work = root / "work"
    (work / "data").mkdir(parents=True)  # as a checkout has it
    venv = Path(sys.executable).parent.parent
    done = subprocess.run(["make", "-s", "-C", str(REPO), "demo", f"VENV={venv}", f"OUT={work / 'data'}",
                           f"DB=sqlite:///{work / 'data' / 'catalogue.db'}", f"CACHE={work / 'data' / 'cache'}",
                           "DEMO_N=12", f"DATA={shared / 'data'}"], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return work


@pytest.mark.parametrize("line,script", RUN, ids=[f"README.md:{line}" for line, _ in RUN])
def test_the_readme_block_runs_as_written_on_the_demo_data(demo, line, script):
    """Each block in the README's order (the module's tests run in order: a block may use what
    the ones above it made)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXRLABEL_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    done = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", script], cwd=demo, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, f"README.md:{line}: {done.stderr[-3000:]}"
    if "quality fit" in script:
        assert (demo / "reports" / "calibration.png").exists()  # written where the README says
