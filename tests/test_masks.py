import io

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image
from sqlalchemy import func, select, text

from pipeline import db as D
from pipeline import masks as M
from tests.conftest import GB, NIH_PNG


@settings(max_examples=80, deadline=None)
@given(arrays(np.bool_, st.tuples(st.integers(1, 90), st.integers(1, 90))))
def test_encode_decode_round_trip(mask):
    data = M.encode(mask)
    assert np.array_equal(M.decode(data), mask)
    # a standard 1-bit PNG: a second, independent reader agrees
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode == "1" and np.array_equal(np.array(im), mask)


@settings(max_examples=80, deadline=None)
@given(arrays(np.bool_, st.tuples(st.integers(1, 40), st.integers(1, 40))),
       st.integers(0, 30), st.integers(0, 30), st.integers(0, 20), st.integers(0, 20))
def test_a_crop_encodes_as_the_full_mask_it_sits_in(crop, y0, x0, below, right):
    shape = (y0 + crop.shape[0] + below, x0 + crop.shape[1] + right)
    full = np.zeros(shape, bool)
    full[y0:y0 + crop.shape[0], x0:x0 + crop.shape[1]] = crop
    assert M.encode(crop, (y0, x0), shape) == M.encode(full)
    enc = M.EncodedMask.of(crop, (y0, x0), shape)
    assert (enc.height, enc.width, enc.area) == (*shape, int(full.sum()))


def test_a_crop_outside_its_image_is_refused():
    with pytest.raises(ValueError, match="does not fit"):
        M.encode(np.ones((5, 5), bool), (8, 0), (10, 10))


def test_encoding_is_compact():
    mask = np.zeros((2000, 1800), bool)
    cv2.circle(mask.view(np.uint8), (900, 1000), 500, 1, -1)
    assert len(M.encode(mask)) < 20_000  # 3.6 MB of pixels


def test_generalblockchain_import(sqlite_engine):
    s = M.import_generalblockchain(sqlite_engine, GB)
    assert (s.images, s.masks) == (100, 298)
    with sqlite_engine.connect() as c:
        per = dict(c.execute(text("SELECT structure, COUNT(*) FROM masks GROUP BY structure")).all())
        assert per == {"heart": 100, "left_lung": 99, "right_lung": 99}
        uid = c.execute(text("SELECT uid FROM images WHERE source='generalblockchain' ORDER BY uid")).scalars().first()
        got = M.load_masks(c, [uid])[uid]
        img = c.execute(select(D.images).where(D.images.c.uid == uid)).mappings().one()
    assert got["heart"].shape == (img["height"], img["width"])
    # patient's left lung lies on the image's right; the heart between the lungs
    cx = {k: np.flatnonzero(v.any(0)).mean() for k, v in got.items()}
    assert cx["right_lung"] < cx["heart"] < cx["left_lung"]
    # licences come with the images (some are CC BY-NC-SA)
    with sqlite_engine.connect() as c:
        licences = set(c.execute(text("SELECT DISTINCT license FROM images")).scalars())
    assert any(lic and "NC" in lic.upper() for lic in licences)
    # re-import: updated in place, nothing duplicated
    M.import_generalblockchain(sqlite_engine, GB)
    with sqlite_engine.connect() as c:
        assert c.execute(select(func.count()).select_from(D.masks)).scalar() == 298


def _png_dirs(tmp_path):
    (tmp_path / "png").mkdir()
    (tmp_path / "mask" / "heart").mkdir(parents=True)
    img = cv2.imread(str(NIH_PNG / "00000001_000.png"), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(tmp_path / "png" / "case1.png"), img)
    heart = np.zeros(img.shape, np.uint8)
    cv2.ellipse(heart, (280, 330), (90, 70), 0, 0, 360, 255, -1, cv2.LINE_AA)  # anti-aliased
    cv2.imwrite(str(tmp_path / "mask" / "heart" / "case1.png"), heart)
    return heart > 127


def test_png_dirs_import_keeps_catalogue_text(sqlite_engine, tmp_path):
    expected = _png_dirs(tmp_path)
    with sqlite_engine.begin() as c:
        c.execute(D.images.insert().values(uid="case1", source="clinic", text="Кардиомегалия",
                                           loaded_at=D.utcnow()))
    s = M.import_png_dirs(sqlite_engine, tmp_path, images="png", masks={"heart": "mask/heart"})
    assert (s.images, s.masks) == (1, 1)
    with sqlite_engine.connect() as c:
        stored = M.load_masks(c, ["case1"])["case1"]["heart"]
        row = c.execute(select(D.images).where(D.images.c.uid == "case1")).mappings().one()
    assert np.array_equal(stored, expected)
    assert row["text"] == "Кардиомегалия" and row["source"] == "clinic"
    assert (row["height"], row["width"]) == expected.shape


def test_png_dirs_errors(sqlite_engine, tmp_path):
    _png_dirs(tmp_path)
    with pytest.raises(M.MaskImportError, match="image folder not found"):
        M.import_png_dirs(sqlite_engine, tmp_path, images="nope")
    with pytest.raises(M.MaskImportError, match="--mask left_lung=FOLDER"):
        M.import_png_dirs(sqlite_engine, tmp_path, images="png", masks={"left_lung": "mask/ll"})
    with pytest.raises(M.MaskImportError, match="unknown structure"):
        M.import_png_dirs(sqlite_engine, tmp_path, images="png", masks={"liver": "mask/heart"})
    with pytest.raises(M.MaskImportError, match="structure.csv"):
        M.import_generalblockchain(sqlite_engine, tmp_path)
