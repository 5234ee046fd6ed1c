import io
import json

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


def _chexmask_decode(rle: str, height: int, width: int) -> np.ndarray:
    """CheXmask's published reader, restated: 1-based starts into the row-major image."""
    numbers = [int(v) for v in rle.split()]
    flat = np.zeros(height * width, bool)
    for start, length in zip(numbers[0::2], numbers[1::2], strict=True):
        flat[start - 1:start - 1 + length] = True
    return flat.reshape(height, width)


@settings(max_examples=80, deadline=None)
@given(arrays(np.bool_, st.tuples(st.integers(1, 60), st.integers(1, 60))))
def test_run_length_text_round_trips_and_reads_as_chexmask(mask):
    data = M.rle_of(mask)
    assert np.array_equal(M.decode(data, "rle", mask.shape), mask)
    assert np.array_equal(_chexmask_decode(data.decode("ascii"), *mask.shape), mask)
    # the same text from the mask's runs, row by row, as labelling builds it
    rows, first, last = [], [], []
    for y, line in enumerate(mask):
        edges = np.flatnonzero(np.diff(np.r_[0, line.astype(np.int8), 0]))
        rows += [y] * (len(edges) // 2)
        first += list(edges[0::2])
        last += list(edges[1::2] - 1)
    (enc,) = M.EncodedMask.from_runs([(np.array(rows, int), np.array(first, int), np.array(last, int))], mask.shape)
    assert enc.data == data and enc.area == int(mask.sum()) and enc.encoding == "rle"
    assert np.array_equal(enc.decode(), mask)


@given(st.lists(st.lists(st.tuples(st.integers(0, 40), st.integers(0, 10 ** 6)), max_size=12), min_size=1, max_size=4),
       st.integers(1, 10 ** 6))
def test_run_length_text_is_the_runs_as_python_prints_them(masks, width):
    """Several masks' runs printed at once: each as Python prints its starts and lengths,
    runs that carry on onto the next row merged."""
    runs = []
    for cuts in masks:  # non-overlapping runs in row order, from sorted cuts of the flat image
        flat = sorted({r * width + min(c, width - 1) for r, c in cuts})
        starts, ends = flat[0::2], [e + 1 for e in flat[1::2]]
        runs.append([(s // width, s % width, min(e - 1, (s // width + 1) * width - 1))
                     for s, e in zip(starts, ends, strict=False)])
    expected = []
    for mask in runs:
        merged: list[list[int]] = []
        for row, first, last in mask:
            start, end = row * width + first, row * width + last + 1
            if merged and merged[-1][1] == start:
                merged[-1][1] = end
            else:
                merged.append([start, end])
        expected.append(" ".join(f"{s + 1} {e - s}" for s, e in merged).encode())
    arrays = [tuple(np.array([r[i] for r in mask], np.int64) for i in range(3)) for mask in runs]
    assert M.rles(arrays, width) == expected


@pytest.mark.parametrize("data", [b"1 2 3", b"0 4", b"5 0", b"90 20", b"1 x"])
def test_damaged_run_length_text_is_refused(data):
    with pytest.raises(ValueError, match="rle"):
        M.decode(data, "rle", (10, 10))


def test_encoding_is_compact():
    mask = np.zeros((2000, 1800), bool)
    cv2.circle(mask.view(np.uint8), (900, 1000), 500, 1, -1)
    assert len(M.encode(mask)) < 20_000  # 3.6 MB of pixels


def test_generalblockchain_import(sqlite_engine):
    s = M.import_generalblockchain(sqlite_engine, GB)
    assert (s.images, s.masks) == (100, 298)
    with sqlite_engine.connect() as c:
        per = dict(c.execute(text("SELECT structure, COUNT(*) FROM masks GROUP BY structure")).all())
        # GeneralBlockchain's heart class is the cardiomediastinum: kept under its own name
        assert per == {"cardiomediastinum": 100, "left_lung": 99, "right_lung": 99}
        uid = c.execute(text("SELECT uid FROM images WHERE source='generalblockchain' ORDER BY uid")).scalars().first()
        got = M.load_masks(c, [uid])[uid]
        img = c.execute(select(D.images).where(D.images.c.uid == uid)).mappings().one()
        defined = json.loads(c.execute(text("SELECT definitions FROM mask_sources")).scalar())
    assert got["cardiomediastinum"].shape == (img["height"], img["width"])
    assert set(defined) == {"cardiomediastinum", "left_lung", "right_lung"}
    assert "behind the heart" in defined["left_lung"]
    # patient's left lung lies on the image's right; the heart between the lungs
    cx = {k: np.flatnonzero(v.any(0)).mean() for k, v in got.items()}
    assert cx["right_lung"] < cx["cardiomediastinum"] < cx["left_lung"]
    # and runs on behind it: those pixels teach nothing (overlap_ignored)
    assert M.overlap_ignored(got)["left_lung"].sum() > 0
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
    with pytest.raises(M.MaskImportError, match="--lungs 'sideways'"):
        M.import_png_dirs(sqlite_engine, tmp_path, images="png", masks={"heart": "mask/heart"}, lungs="sideways")
    with pytest.raises(M.MaskImportError, match="structure.csv"):
        M.import_generalblockchain(sqlite_engine, tmp_path)


def test_png_dirs_never_rewrites_another_sources_image(sqlite_engine, tmp_path):
    """A png-dirs file named as a catalogued DICOM (another source, another size) is left out
    and the DICOM's row, and what was labelled on it, stay as they were; under a prefix it
    imports beside it. Two files of one stem are both left out."""
    from pipeline import catalogue as C
    from tests.conftest import DICOM

    C.load_dicom(sqlite_engine, DICOM, workers=1, progress=False)
    with sqlite_engine.connect() as c:
        before = c.execute(select(D.images).where(D.images.c.uid == "RG1_UNCR")).mappings().one()
    _png_dirs(tmp_path)
    (tmp_path / "png" / "case1.png").rename(tmp_path / "png" / "RG1_UNCR.png")
    (tmp_path / "mask" / "heart" / "case1.png").rename(tmp_path / "mask" / "heart" / "RG1_UNCR.png")
    cv2.imwrite(str(tmp_path / "png" / "coll.png"), np.full((300, 300), 90, np.uint8))
    cv2.imwrite(str(tmp_path / "png" / "coll.jpg"), np.full((300, 300), 90, np.uint8))
    s = M.import_png_dirs(sqlite_engine, tmp_path, images="png", masks={"heart": "mask/heart"}, source="wingspan")
    assert (s.images, s.masks, s.skipped) == (0, 0, 3)
    with sqlite_engine.connect() as c:
        after = c.execute(select(D.images).where(D.images.c.uid == "RG1_UNCR")).mappings().one()
        assert c.execute(select(func.count()).select_from(D.masks)).scalar() == 0
        assert c.execute(select(func.count()).select_from(D.images).where(D.images.c.uid == "coll")).scalar() == 0
    assert dict(after) == dict(before)
    s = M.import_png_dirs(sqlite_engine, tmp_path, images="png", masks={"heart": "mask/heart"}, source="wingspan",
                          uid_prefix="ws_")
    assert (s.images, s.masks) == (1, 1)
    with sqlite_engine.connect() as c:
        row = c.execute(select(D.images).where(D.images.c.uid == "ws_RG1_UNCR")).mappings().one()
        assert (row["source"], row["height"], row["width"]) == ("wingspan", 512, 512)
        assert dict(c.execute(select(D.images).where(D.images.c.uid == "RG1_UNCR")).mappings().one()) == dict(before)
    # the same set imported again from another folder is the same images: their path follows
    moved = tmp_path / "moved"
    (tmp_path / "png").rename(moved)
    (moved / "coll.jpg").unlink()
    s = M.import_png_dirs(sqlite_engine, tmp_path, images="moved", masks={"heart": "mask/heart"}, source="wingspan",
                          uid_prefix="ws_")
    assert (s.images, s.skipped) == (2, 0)
    with sqlite_engine.connect() as c:
        path = c.execute(select(D.images.c.path).where(D.images.c.uid == "ws_RG1_UNCR")).scalar()
    assert path == str((moved / "RG1_UNCR.png").resolve())


def test_a_mask_past_the_decoding_budget_is_one_skipped_image(sqlite_engine, tmp_path):
    """A 16-bit mask PNG that claims 10000 x 10000 pixels (100 megapixels, 200 MB decoded;
    the red team's 30000 x 30000 one reached 5.3 GB) is refused from its header: that image
    is left out and the rest of the folder imports."""
    import struct
    import zlib

    _png_dirs(tmp_path)
    img = cv2.imread(str(tmp_path / "png" / "case1.png"), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(tmp_path / "png" / "case2.png"), img)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    side = 10_000
    body = zlib.compressobj(9)
    idat = body.compress((b"\0" + b"\0" * 2 * side) * side) + body.flush()
    (tmp_path / "mask" / "heart" / "case2.png").write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 16, 0, 0, 0, 0))
        + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    s = M.import_png_dirs(sqlite_engine, tmp_path, images="png", masks={"heart": "mask/heart"})
    assert (s.images, s.masks, s.skipped) == (2, 1, 1)
    with sqlite_engine.connect() as c:
        assert set(M.load_masks(c, ["case1", "case2"])) == {"case1"}


def test_png_dirs_reads_a_mask_in_any_common_encoding_and_refuses_empty_or_inverted_ones(sqlite_engine, tmp_path):
    """A real Wingspan heart outline written as 0/255, 0/1 (8 and 16 bit), two grey levels,
    a palette and the alpha channel alone imports as the same mask; all-zero and inverted
    masks are refused with a line naming the file, and the rest of the folder imports."""
    from tests.conftest import WINGSPAN

    stem = sorted(p.stem for p in (WINGSPAN / "png").glob("*.png"))[0]
    film = cv2.imread(str(WINGSPAN / "png" / f"{stem}.png"), cv2.IMREAD_GRAYSCALE)
    heart = cv2.imread(str(WINGSPAN / "mask" / "heart" / f"{stem}.png"), cv2.IMREAD_GRAYSCALE) > 127
    (tmp_path / "png").mkdir()
    (tmp_path / "heart").mkdir()
    rgba = np.zeros((*heart.shape, 4), np.uint8)
    rgba[..., 3] = heart * 255
    encodings = {"b255": heart.astype(np.uint8) * 255, "b01": heart.astype(np.uint8),
                 "w01": heart.astype(np.uint16), "w65535": heart.astype(np.uint16) * 65535,
                 "grey": np.where(heart, 100, 20).astype(np.uint8), "alpha": rgba}
    for name, arr in encodings.items():
        cv2.imwrite(str(tmp_path / "heart" / f"{name}.png"), arr)
    Image.fromarray(heart.astype(np.uint8), "P").save(tmp_path / "heart" / "palette.png")
    cv2.imwrite(str(tmp_path / "heart" / "zero.png"), np.zeros(heart.shape, np.uint8))
    cv2.imwrite(str(tmp_path / "heart" / "inverted.png"), (~heart).astype(np.uint8) * 255)
    for name in [*encodings, "palette", "zero", "inverted"]:
        cv2.imwrite(str(tmp_path / "png" / f"{name}.png"), film)
    s = M.import_png_dirs(sqlite_engine, tmp_path, images="png", masks={"heart": "heart"})
    assert (s.images, s.masks, s.skipped) == (9, 7, 2)
    with sqlite_engine.connect() as c:
        got = M.load_masks(c, [*encodings, "palette", "zero", "inverted"])
    assert set(got) == {*encodings, "palette"}
    assert all(np.array_equal(got[n]["heart"], heart) for n in got)
