"""The wheel carries what cxrlabel reads at run time, and a plain (non-editable) install of it
labels with the shipped model from any folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.conftest import DICOM, REPO

RUNTIME_FILES = ["pipeline/sql/views.sql", "pipeline/sql/schema.sql", "pipeline/sql/queries/ctr_by_group.sql",
                 "pipeline/models/presets.toml", "pipeline/models/default/model.pt",
                 "pipeline/models/default/MODEL_CARD.md", "pipeline/models/default/model.quality.json",
                 "pipeline/models/default/model.quality-tta.json", "pipeline/models/default/cross_validation.json",
                 "pipeline/rules/default.toml",
                 "pipeline/cli/__init__.py", "pipeline/train/loop.py", "pipeline/model/spec.py",
                 "pipeline/db/schema.py", "pipeline/label/run.py", "pipeline/imaging/fixups.py"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The project's wheel, built offline from a copy of the sources (the checkout stays clean)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("pipeline", "sql", "models"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("dist")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation",
                            "-w", str(out), str(src)], check=True, capture_output=True, text=True)
    (out / "build.log").write_text(build.stdout + build.stderr)
    (found,) = out.glob("cxrlabel-*.whl")
    return found


def test_the_build_has_nothing_to_warn_about(wheel):
    """Every folder of data files is a package of its own, and the licence an SPDX expression."""
    log = (wheel.parent / "build.log").read_text()
    assert "absent from the `packages` configuration" not in log and "is deprecated" not in log.replace(
        "license-file", "")


def test_wheel_carries_the_runtime_data(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [f for f in RUNTIME_FILES if f not in names]
    assert not missing, f"not in the wheel: {missing}"
    shipped = zipfile.ZipFile(wheel).getinfo("pipeline/models/default/model.pt").file_size
    assert shipped == (REPO / "models/default/model.pt").stat().st_size


def test_plain_install_labels_with_the_shipped_model(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
                    "--no-deps", "--no-index", str(wheel)], check=True, capture_output=True)
    # the dependencies come from this environment (path entries only: its editable finder stays off)
    purelib = Path(subprocess.run([str(venv / "bin" / "python"), "-c",
                                   "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  check=True, capture_output=True, text=True).stdout.strip())
    (purelib / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CXRLABEL_DB", "CXRLABEL_CACHE")}

    def cx(*args: str) -> str:
        r = subprocess.run([str(venv / "bin" / "cxrlabel"), "--db", f"sqlite:///{work / 'c.db'}", *args],
                           cwd=work, env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stdout

    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import pipeline; print(pipeline.__file__)"],
                           cwd=work, env=env, check=True, capture_output=True, text=True).stdout
    assert where.startswith(str(venv)), where  # the installed copy, not the checkout
    cx("catalogue", "load", "dicom", str(DICOM), "--workers", "1")
    out = cx("label", "--all", "--limit", "3", "--device", "cpu", "--workers", "1", "--batch-size", "2")
    assert "3 labelled" in out and "(default on cpu)" in out
    rows = json.loads(cx("query", "ctr_by_group", "--json"))  # a ready query by name, from the package
    assert sum(r["films"] for r in rows) == 3
    # the shipped model's fitted quality score travelled too: estimates per structure
    scored = json.loads(cx("query", "SELECT quality, quality_heart FROM label_results", "--json"))
    assert len(scored) == 3 and all(0 <= r["quality_heart"] <= 1 for r in scored)
    presets = subprocess.run([str(venv / "bin" / "python"), "-c",
                              "from pipeline.train import presets; print(sorted(presets()))"],
                             cwd=work, env=env, check=True, capture_output=True, text=True).stdout
    assert "cxr_deep" in presets and "tiny" in presets
