"""Fixtures: the shared real data, fresh databases (SQLite, and PostgreSQL when available)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

from pipeline import db as D
from pipeline.masks import STRUCTURES

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("CXRLABEL_DATA", REPO.parent / "shared" / "data"))
NIH_CSV = DATA / "catalogues/nih/Data_Entry_2017_v2020.csv.gz"
OPENI = DATA / "catalogues/openi/NLMCXR_reports.tgz"
DICOM = DATA / "dicom"
GB = DATA / "generalblockchain"
NIH_PNG = DATA / "nih-samples"
WINGSPAN = DATA / "wingspan"


def pytest_configure(config):
    if not DATA.exists():
        raise pytest.UsageError(f"shared data not found at {DATA}: put ../shared beside the "
                                "checkout or set CXRLABEL_DATA")


# ---------------------------------------------------------------- PostgreSQL


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return found[-1].parent if found else None


@pytest.fixture(scope="session")
def pg_server():
    """URL of a PostgreSQL server: $CXRLABEL_TEST_PG, or one started here from Debian's
    packages on a free local port (as the postgres user when run as root)."""
    if os.environ.get("CXRLABEL_TEST_PG"):
        yield os.environ["CXRLABEL_TEST_PG"]
        return
    bindir = _pg_bin()
    if bindir is None:
        if os.environ.get("CXRLABEL_REQUIRE_PG"):
            pytest.fail("PostgreSQL binaries not found (apt-get install postgresql)")
        pytest.skip("PostgreSQL not installed: apt-get install postgresql to run these tests")
    root = Path(tempfile.mkdtemp(prefix="cxrlabel-pg-"))
    port = _free_port()
    prefix: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
        prefix = ["runuser", "-u", "postgres", "--"]
    data = root / "data"
    subprocess.run(prefix + [str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U",
                             "postgres", "--no-sync"], check=True, capture_output=True)
    subprocess.run(prefix + [str(bindir / "pg_ctl"), "-D", str(data), "-w", "-l", str(root / "log"),
                             "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off",
                             "start"], check=True, capture_output=True)
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}"
    finally:
        subprocess.run(prefix + [str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate",
                                 "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


_counter = iter(range(10**6))


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """A fresh, empty database: SQLite in tmp_path, and a new PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'catalogue.db'}"
        return
    server = request.getfixturevalue("pg_server")
    from sqlalchemy import create_engine, text
    name = f"cxr_test_{os.getpid()}_{next(_counter)}"
    admin = create_engine(f"{server}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f"CREATE DATABASE {name}"))
    yield f"{server}/{name}"
    with admin.connect() as c:
        c.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
    admin.dispose()


@pytest.fixture
def engine(db_url):
    eng = D.connect(db_url)
    yield eng
    eng.dispose()


@pytest.fixture
def sqlite_engine(tmp_path):
    eng = D.connect(f"sqlite:///{tmp_path / 'catalogue.db'}")
    yield eng
    eng.dispose()


def import_wingspan(engine) -> None:
    """The Wingspan half's 131 films with their heart-only and lung masks."""
    from pipeline.masks import import_png_dirs
    import_png_dirs(engine, WINGSPAN, images="png", source="wingspan",
                    masks={s: f"mask/{s}" for s in ("heart", "left_lung", "right_lung")})


@pytest.fixture(scope="session")
def annotated_db(tmp_path_factory):
    """SQLite catalogue with the two annotated sources (built once): GeneralBlockchain's 100
    films (cardiomediastinum and lungs) and the Wingspan half's 131 (heart alone and lungs)."""
    from pipeline.masks import import_generalblockchain
    root = tmp_path_factory.mktemp("annotated")
    url = f"sqlite:///{root / 'catalogue.db'}"
    eng = D.connect(url)
    import_generalblockchain(eng, GB)
    import_wingspan(eng)
    eng.dispose()
    return root / "catalogue.db"


@pytest.fixture(scope="session")
def annotated_128(annotated_db, tmp_path_factory):
    """The first eight annotated images with the heart and both lungs and a CTR below 0.5, at 128 px:
    ``(images (8, 128, 128) uint8, masks (8, 3, 128, 128) float32)``."""
    from pipeline.train import TrainConfig
    from pipeline.train.data import load_dataset
    eng = D.connect(f"sqlite:///{annotated_db}")
    ds = load_dataset(eng, TrainConfig.from_preset("tiny", size=128), str(tmp_path_factory.mktemp("cache")))
    eng.dispose()
    from pipeline.measure import measure
    # the heart alone and both lungs (Wingspan), hearts of normal size: room to widen them
    whole = [i for i in range(len(ds.uids)) if ds.valid[i, :3].all()
             and (measure({s: ds.masks[i, j] > 0.5 for j, s in enumerate(STRUCTURES)})["ctr"] or 1) < 0.5][:8]
    return ds.images[whole], ds.masks[whole][:, :3]


@pytest.fixture
def annotated_engine(annotated_db, tmp_path):
    """A private copy of the annotated catalogue."""
    path = tmp_path / "catalogue.db"
    shutil.copy(annotated_db, path)
    eng = D.connect(f"sqlite:///{path}")
    yield eng
    eng.dispose()


@pytest.fixture(scope="session")
def tiny_model(annotated_db, tmp_path_factory):
    """A checkpoint of the `tiny` preset trained for 4 epochs at 64 px on both annotated
    sources (seconds on a CPU)."""
    from pipeline.train import TrainConfig, train
    root = tmp_path_factory.mktemp("tiny")
    path = root / "catalogue.db"
    shutil.copy(annotated_db, path)
    eng = D.connect(f"sqlite:///{path}")
    cfg = TrainConfig.from_preset("tiny", threads=2, epochs=4)  # 2 epochs leave the (small) heart unlearnt
    result = train(eng, cfg, root / "run", str(root / "cache"), progress=False)
    eng.dispose()
    return result.run_dir / "best.pt"
