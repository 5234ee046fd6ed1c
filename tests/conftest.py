"""Fixtures: the shared real data, fresh databases (SQLite, and PostgreSQL when available)."""

from __future__ import annotations

import contextlib
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


# ---------------------------------------------------------------- Orthanc (a real PACS)

ORTHANC = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
PACS_USER, PACS_PASSWORD = "reader-7f3a", "s3cret-Pw"


class Pacs:
    """A private Orthanc: its DICOMweb base URL, credentials and storage folder."""

    def __init__(self, url: str, root: Path, aet: str, dicom_port: int, move_port: int) -> None:
        self.url, self.root, self.aet, self.dicom_port = url, root, aet, dicom_port
        self.move_port = move_port  # where it sends what our AE title asks it to C-MOVE
        self.user, self.password = PACS_USER, PACS_PASSWORD

    def env(self, monkeypatch) -> None:
        monkeypatch.setenv("CXRLABEL_PACS_USER", self.user)
        monkeypatch.setenv("CXRLABEL_PACS_PASSWORD", self.password)

    def instances(self) -> list[str]:
        import requests
        r = requests.get(self.url.replace("/dicom-web", "/instances"), auth=(self.user, self.password), timeout=30)
        return r.json()


def stow(url: str, files: list[Path], auth: tuple[str, str]) -> None:
    """Store DICOM files over STOW-RS (plain requests: the fixture does not lean on the code tested)."""
    import requests
    boundary = "cxrlabel-test-boundary"
    body = b"".join(b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + f.read_bytes()
                    + b"\r\n" for f in files) + b"--" + boundary.encode() + b"--\r\n"
    r = requests.post(f"{url}/studies", data=body, auth=auth, timeout=60, headers={
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Accept": "application/dicom+json"})
    r.raise_for_status()


def orthanc_available() -> bool:
    return ORTHANC.exists() and DICOMWEB_PLUGIN.exists()


@contextlib.contextmanager
def running_orthanc(root: Path, files: list[Path]):
    """A private Orthanc with its DICOMweb plugin on free 127.0.0.1 ports, authentication on
    and its storage under ``root`` (never the system service), holding ``files`` stored over
    STOW-RS; stopped when the block ends. (Also bench/pacs.py's server.)"""
    import json
    http, dicom, move = _free_port(), _free_port(), _free_port()
    config = {"Name": "cxrlabel-test", "HttpPort": http, "DicomPort": dicom, "DicomAet": "ORTHANCTEST",
              "StorageDirectory": str(root / "storage"), "IndexDirectory": str(root / "index"),
              "RemoteAccessAllowed": False, "AuthenticationEnabled": True,
              "RegisteredUsers": {PACS_USER: PACS_PASSWORD}, "Plugins": [str(DICOMWEB_PLUGIN)],
              "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True},
              # C-FIND, C-GET and C-MOVE (to our storage SCP's port) from our AE title: a PACS
              # answers the modalities it knows
              "DicomModalities": {"cxrlabel": {"AET": "CXRLABEL", "Host": "127.0.0.1", "Port": move,
                                               "AllowFind": True, "AllowGet": True, "AllowMove": True}}}
    (root / "orthanc.json").write_text(json.dumps(config))
    log = open(root / "orthanc.log", "w+b")
    proc = subprocess.Popen([str(ORTHANC), str(root / "orthanc.json")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        assert proc.stderr is not None
        for line in proc.stderr:  # blocks until Orthanc says it has started (or ends)
            log.write(line)
            if b"Orthanc has started" in line:
                break
        else:
            raise RuntimeError(f"Orthanc did not start: see {root / 'orthanc.log'}")
        import threading
        threading.Thread(target=lambda: [log.write(x) for x in proc.stderr], daemon=True).start()
        url = f"http://127.0.0.1:{http}/dicom-web"
        for start in range(0, len(files), 16):
            stow(url, files[start:start + 16], (PACS_USER, PACS_PASSWORD))
        yield Pacs(url, root, "ORTHANCTEST", dicom, move)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory):
    """A private Orthanc (:func:`running_orthanc`) holding the shared chest DICOMs (JPEG 2000,
    JPEG baseline and uncompressed among them)."""
    if not orthanc_available():
        if os.environ.get("CXRLABEL_REQUIRE_ORTHANC"):
            pytest.fail("Orthanc or its DICOMweb plugin not found (apt-get install orthanc orthanc-dicomweb)")
        pytest.skip("Orthanc not installed: apt-get install orthanc orthanc-dicomweb to run the PACS tests")
    with running_orthanc(tmp_path_factory.mktemp("orthanc"), sorted(DICOM.glob("*.dcm"))) as pacs:
        yield pacs


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
