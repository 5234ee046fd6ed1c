"""README's commands run as written on the demo's data (issue 42): every ``bash`` block, in
order, from a folder laid out as a checkout after ``make demo`` (``data/`` with the catalogue,
the cache and the demo clinic; ``../shared`` beside it), but the blocks marked
``<!-- not run on the demo data: REASON -->`` (the demo itself, a PACS of one's own)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import DATA

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SKIP = re.compile(r"<!-- not run on the demo data: (.+?) -->\s*$")
SKIPPED = {"these make the demo and run the tests", "a PACS of your own"}  # and the Orthanc trial, below


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


def test_the_readme_marks_only_what_the_demo_cannot_run():
    got = blocks((REPO / "README.md").read_text())
    reasons = [r for _, _, r in got if r]
    assert {r for r in reasons if "PACS server" not in r} == SKIPPED and len(reasons) == 3
    run = [script for _, script, r in got if r is None]
    assert len(run) >= 3 and all("cxrlabel" in script for script in run)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A folder as a checkout is after ``make demo`` (12 clinic films, not 200), ``../shared``
    beside it."""
    root = tmp_path_factory.mktemp("readme")
    (root / "shared").symlink_to(DATA.resolve().parent)
    work = root / "work"
    (work / "data").mkdir(parents=True)  # as a checkout has it
    venv = Path(sys.executable).parent.parent
    done = subprocess.run(["make", "-s", "-C", str(REPO), "demo", f"VENV={venv}", f"OUT={work / 'data'}",
                           f"DB=sqlite:///{work / 'data' / 'catalogue.db'}", f"CACHE={work / 'data' / 'cache'}",
                           "DEMO_N=12", f"DATA={DATA}"], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return work


def test_every_readme_command_runs_as_written_on_the_demo_data(demo):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXRLABEL_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    for line, script, reason in blocks((REPO / "README.md").read_text()):
        if reason:
            continue
        done = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", script], cwd=demo, env=env,
                              capture_output=True, text=True)
        assert done.returncode == 0, f"README.md:{line}: {done.stderr[-3000:]}"
    assert (demo / "reports" / "calibration.png").exists()  # written where the README says
