"""Labelling and collecting on Ray: a local cluster of 2 CPUs, SQLite and PostgreSQL."""

from __future__ import annotations

import os
import signal

import pytest
from click.testing import CliRunner
from sqlalchemy import text

from pipeline import catalogue as C
from pipeline.collect import Settings
from pipeline.distributed import Ray, collect_on_ray
from pipeline.groups import select_images
from pipeline.label import LabelOptions, label
from tests.conftest import DICOM, NIH_PNG


@pytest.fixture(scope="module")
def ray_cluster():
    import ray
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _catalogue(engine, tmp_path):
    C.load_dicom(engine, DICOM, workers=1, progress=False)
    listing = tmp_path / "nih.csv"
    listing.write_text("id,file\n" + "".join(f"{p.stem},{p}\n" for p in sorted(NIH_PNG.glob("*.png"))))
    C.load_csv(engine, listing, {"uid": "id", "path": "file"}, progress=False)
    with engine.connect() as c:
        return select_images(c, all_images=True)


def _stored(engine) -> tuple[int, int, list]:
    with engine.connect() as c:
        n_meas = c.execute(text("SELECT COUNT(*) FROM measurements")).scalar()
        n_masks = c.execute(text("SELECT COUNT(*) FROM masks WHERE kind = 'predicted'")).scalar()
        twice = c.execute(text("SELECT uid, structure FROM masks WHERE kind = 'predicted' "
                               "GROUP BY uid, structure HAVING COUNT(*) > 1")).all()
    return n_meas, n_masks, twice


def test_label_on_ray_labels_every_image_once(engine, tiny_model, ray_cluster, tmp_path):
    chosen = _catalogue(engine, tmp_path)
    n = len(chosen.items)
    collected = collect_on_ray(engine, chosen.pairs(), Settings(64), tmp_path / "cache", batch_size=3,
                               progress=False)
    assert (collected.cached, collected.failed) == (n, 0)
    s = label(engine, chosen, LabelOptions(model=str(tiny_model), device="cpu", batch_size=2,
                                           cache_dir=str(tmp_path / "cache"), progress=False), Ray("local", actors=2))
    assert (s.labelled, s.failed, s.selected) == (n, 0, n) and s.device == "ray:2xcpu"
    assert _stored(engine) == (n, 3 * n, [])
    with engine.connect() as c:
        assert c.execute(text("SELECT status FROM label_runs")).scalar() == "done"
    again = label(engine, chosen, LabelOptions(model=str(tiny_model), device="cpu", batch_size=2,
                                               cache_dir=str(tmp_path / "cache"), progress=False),
                  Ray("local", actors=2))
    assert (again.labelled, again.skipped) == (0, n)


def test_a_worker_killed_mid_run_leaves_every_image_labelled_once(sqlite_engine, tiny_model, ray_cluster, tmp_path):
    chosen = _catalogue(sqlite_engine, tmp_path)
    killed = []

    def kill_first_worker(batch) -> None:
        if not killed:  # after its first batch is written: Ray restarts it and retries what it had
            os.kill(batch.pid, signal.SIGKILL)
            killed.append(batch.pid)

    s = label(sqlite_engine, chosen, LabelOptions(model=str(tiny_model), device="cpu", batch_size=1,
                                                  cache_dir=str(tmp_path / "cache"), progress=False),
              Ray("local", actors=2, on_batch=kill_first_worker))
    n = len(chosen.items)
    assert killed and s.labelled == n
    assert _stored(sqlite_engine) == (n, 3 * n, [])


def test_without_ray_the_option_says_how_to_get_it(annotated_db, tmp_path, monkeypatch):
    import builtins
    import shutil

    from pipeline.cli import cli
    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray":
            raise ImportError("no ray")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    db = tmp_path / "c.db"
    shutil.copy(annotated_db, db)
    r = CliRunner().invoke(cli, ["--db", f"sqlite:///{db}", "label", "--all", "--ray", "local"])
    assert r.exit_code == 1 and "pip install 'cxrlabel[ray]'" in r.output
