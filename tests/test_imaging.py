import io

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline.imaging import DecodeError, Geometry, decode, model_input, preprocess
from tests.conftest import DICOM, GB, NIH_PNG


def test_j2k_lossless_is_pixel_identical_to_uncompressed():
    a, _, _ = decode(DICOM / "RG1_UNCR.dcm")
    b, _, _ = decode(DICOM / "RG1_J2KR.dcm")
    assert a.shape == (1955, 1841) and np.array_equal(a, b)


def test_j2k_lossy_decodes_close_to_original():
    a, _, _ = decode(DICOM / "RG1_UNCR.dcm")
    b, _, _ = decode(DICOM / "RG1_J2KI.dcm")
    assert a.shape == b.shape and np.abs(a - b).mean() < 0.01


def test_monochrome1_copy_is_the_inverse_of_its_original():
    a, _, fa = decode(DICOM / "cr_chest_pa_jpeg_baseline.dcm")
    b, _, fb = decode(DICOM / "cr_chest_pa_jpeg_baseline_monochrome1.dcm")
    assert (fa["photometric"], fb["photometric"]) == ("MONOCHROME2", "MONOCHROME1")
    assert np.allclose(a, 1.0 - b, atol=1e-6)


def test_monochrome1_comes_out_with_dark_lungs():
    img, _, _ = decode(DICOM / "RG1_UNCR.dcm")
    h, w = img.shape
    lungs = np.concatenate([img[h // 3:h // 2, w // 6:w // 3].ravel(),
                            img[h // 3:h // 2, 2 * w // 3:5 * w // 6].ravel()])
    mediastinum = img[h // 3:h // 2, int(w * 0.45):int(w * 0.55)]
    assert lungs.mean() < mediastinum.mean() - 0.1


def _save(tmp_path, arr, mode, fmt="PNG", **kw):
    path = tmp_path / f"x_{mode}.{fmt.lower()}"
    Image.fromarray(arr).convert(mode).save(path, fmt, **kw) if mode != "I;16" else \
        Image.fromarray(arr.astype(np.uint16) * 257).save(path, fmt)
    return path


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "LA", "I;16"])
def test_raster_modes_give_one_grey_image(tmp_path, mode):
    ramp = np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (96, 1))
    arr, orig, _ = decode(_save(tmp_path, ramp, mode))
    assert arr.shape == (96, 64) == orig and arr.dtype == np.float32
    assert 0 <= arr.min() < 0.05 and arr.max() > 0.95
    assert np.all(np.diff(arr[10]) >= -0.02)  # left dark, right bright, as drawn


def test_16_bit_png_keeps_precision(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 1000).astype(np.uint16), (300, 1))
    path = tmp_path / "r16.png"
    Image.fromarray(ramp).save(path)
    arr, _, _ = decode(path)
    assert len(np.unique(arr)) > 900  # 8-bit would collapse to 256 levels


def test_large_jpeg_reduced_decode_keeps_geometry():
    path = next(p for p in sorted((GB / "images").glob("*.jp*g")) if Image.open(p).size[0] > 2000)
    full_w, full_h = Image.open(path).size
    img, geom = preprocess(path, 256)
    assert (geom.orig_height, geom.orig_width) == (full_h, full_w)
    # the same image decoded at full size and resampled agrees with the reduced decode
    arr = np.asarray(Image.open(path).convert("L"), np.float32) / 255
    ref = np.clip(np.rint(geom.to_cache(arr) * 255), 0, 255)
    assert np.abs(ref - img.astype(np.float32)).mean() < 3.0


def test_errors_name_the_file(tmp_path):
    with pytest.raises(DecodeError, match="file not found"):
        decode(tmp_path / "missing.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(DecodeError, match="bad.png"):
        decode(bad)
    trunc = tmp_path / "trunc.dcm"
    trunc.write_bytes((DICOM / "RG1_UNCR.dcm").read_bytes()[:5000])
    with pytest.raises(DecodeError, match="trunc.dcm"):
        decode(trunc)


def test_nih_png_and_model_input():
    img, geom = preprocess(NIH_PNG / "00000001_000.png", 128)
    assert img.shape == (128, 128) and img.dtype == np.uint8 and geom.mode == "pad"
    x = model_input(img)
    assert x.shape == (1, 128, 128) and abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 1e-3
    # CLAHE: still z-scored, a different image, and the same for the float (augmented) path
    c = model_input(img, "clahe")
    assert c.shape == x.shape and abs(float(c.mean())) < 1e-4 and abs(float(c.std()) - 1) < 1e-3
    assert np.abs(c - x).mean() > 0.05
    np.testing.assert_array_equal(c, model_input(img.astype(np.float32), "clahe"))
    with pytest.raises(ValueError, match="zscore, clahe"):
        model_input(img, "minmax")


@settings(max_examples=60, deadline=None)
@given(h=st.integers(20, 400), w=st.integers(20, 400), size=st.sampled_from([32, 64, 100]),
       mode=st.sampled_from(["pad", "stretch"]), x0=st.floats(0.1, 0.5), y0=st.floats(0.1, 0.5))
def test_geometry_round_trip(h, w, size, mode, x0, y0):
    """A box mapped to the cache and back lands where it was (within a cache pixel)."""
    geom = Geometry.fit(h, w, size, mode)
    assume(min(h // 3 * geom.scale_y, w // 3 * geom.scale_x) >= 2)  # visible in the cache
    mask = np.zeros((h, w), np.float32)
    r0, c0 = int(y0 * h), int(x0 * w)
    r1, c1 = r0 + h // 3, c0 + w // 3
    mask[r0:r1, c0:c1] = 1
    back = geom.to_original(geom.to_cache(mask)) > 0.5
    tol_y, tol_x = 1.5 / geom.scale_y + 1, 1.5 / geom.scale_x + 1
    rows, cols = np.flatnonzero(back.any(1)), np.flatnonzero(back.any(0))
    assert abs(rows[0] - r0) <= tol_y and abs(rows[-1] - (r1 - 1)) <= tol_y
    assert abs(cols[0] - c0) <= tol_x and abs(cols[-1] - (c1 - 1)) <= tol_x


@settings(max_examples=60, deadline=None)
@given(h=st.integers(20, 4000), w=st.integers(20, 4000), size=st.sampled_from([32, 256, 512]),
       mode=st.sampled_from(["pad", "stretch"]), fx=st.floats(0, 1), fy=st.floats(0, 1))
def test_point_to_cache_follows_the_documented_convention(h, w, size, mode, fx, fy):
    """cache = (original + 0.5 + offset) * scale - 0.5 for pixel centres, on each axis."""
    geom = Geometry.fit(h, w, size, mode)
    x, y = fx * (w - 1), fy * (h - 1)
    cx, cy = geom.point_to_cache(x, y)
    assert abs(cx - ((x + 0.5 + geom.offset_x) * geom.scale_x - 0.5)) <= 0.5 + 1e-9
    assert abs(cy - ((y + 0.5 + geom.offset_y) * geom.scale_y - 0.5)) <= 0.5 + 1e-9
    assert 0 <= cx < size and 0 <= cy < size


def test_geometry_keeps_aspect_in_pad_mode():
    g = Geometry.fit(1000, 500, 100, "pad")
    assert g.scale_x == g.scale_y == 0.1 and g.offset_x == 250 and g.offset_y == 0
    assert g.point_to_cache(250, 500) == (50, 50) and g.point_to_cache(0, 0) == (25, 0)
    with pytest.raises(ValueError, match="unknown geometry mode"):
        Geometry.fit(10, 10, 10, "crop")


def test_jpeg_bytes_of_every_kind_decode(tmp_path):
    ramp = np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (96, 1))
    buf = io.BytesIO()
    Image.fromarray(ramp).convert("RGB").save(buf, "JPEG")
    (tmp_path / "a.jpg").write_bytes(buf.getvalue())
    arr, _, _ = decode(tmp_path / "a.jpg")
    assert arr.shape == (96, 64)


def test_jpeg_baseline_dicom_reduced_decode_matches_full_decode():
    path = DICOM / "cr_chest_pa_jpeg_baseline.dcm"
    fast, geom = preprocess(path, 128)  # 1024 px frame decoded at 1/4 scale
    full, (h, w), _ = decode(path)
    assert (geom.orig_height, geom.orig_width) == (h, w) == (1024, 1024)
    ref = np.clip(np.rint(geom.to_cache(full) * 255), 0, 255)
    assert np.abs(ref - fast.astype(np.float32)).mean() < 3.0
    mono1, _ = preprocess(DICOM / "cr_chest_pa_jpeg_baseline_monochrome1.dcm", 128)
    assert np.abs(255 - mono1.astype(np.int16) - fast).max() <= 1  # inversion survives the fast path


@pytest.mark.parametrize(("name", "how", "shape"), [("RG1_J2KR.dcm", "wavelet", (489, 461)),
                                                     ("RG1_UNCR.dcm", "block", (489, 461))])
def test_large_dicom_frames_reduce_before_the_luts_like_the_full_decode(name, how, shape):
    """JPEG 2000 decodes levels down; an uncompressed frame is block-averaged before the
    modality/VOI LUTs. Either way the cache matches the whole-frame path closely."""
    fast, geom = preprocess(DICOM / name, 256)
    arr, orig, facts = decode(DICOM / name, target=256)
    assert orig == (1955, 1841) and arr.shape == shape and facts["reduced"] == how
    full, _, _ = decode(DICOM / "RG1_UNCR.dcm")
    ref = np.clip(np.rint(geom.to_cache(full) * 255), 0, 255)
    assert np.abs(ref - fast.astype(np.float32)).mean() < 1.5


def test_j2k_reduce_falls_back_to_pillows_public_reduce(monkeypatch):
    """Without the exact-size path, Pillow's own reduce takes the deepest level whose
    rounding agrees with OpenJPEG's (1841 px: only one level down)."""
    from pipeline.imaging import decoders

    def moved(*_args):
        raise AttributeError("Pillow internals moved")

    monkeypatch.setattr(decoders, "_j2k_at_level", moved)
    arr, _, facts = decode(DICOM / "RG1_J2KR.dcm", target=256)
    assert arr.shape == (978, 921) and facts["reduced"] == "wavelet"


def test_a_failing_reduced_decode_falls_back_to_the_whole_frame(monkeypatch):
    from pipeline.imaging import decoders

    def broken(*_args):
        raise OSError("broken data stream")

    monkeypatch.setattr(decoders, "_reduced_j2k", broken)
    arr, _, facts = decode(DICOM / "RG1_J2KR.dcm", target=256)
    full, _, _ = decode(DICOM / "RG1_J2KR.dcm")
    assert facts["reduced"] == "block" and arr.shape == (489, 461)  # whole frame, then blocks
    assert full.shape == (1955, 1841)


def test_j2k_resolution_levels_sit_on_every_fth_pixel():
    """JPEG 2000's low-pass sample c lies at original pixel c * f (not at a block's centre):
    an edge keeps its place when the reduced image is mapped back."""
    import cv2

    from pipeline.imaging import _from_smaller_source, _reduced_j2k
    img = np.zeros((1024, 1024), np.uint16)
    img[:, 300:] = 4000
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG2000", no_jp2=True, irreversible=False)
    small = _reduced_j2k(buf.getvalue(), 128)
    assert small is not None and small.shape == (128, 128)  # 3 levels down
    assert abs(float(small[64, 100]) - 4000) < 50 and abs(float(small[64, 5])) < 50

    def edge_after_mapping_back(block: bool) -> int:
        m = _from_smaller_source(np.eye(2, 3), 8, 8, block)  # reduced -> original pixel grid
        back = cv2.warpAffine(small.astype(np.float32), m, (1024, 1024), flags=cv2.INTER_LINEAR)
        return int(np.argmax(back[512] > 2000))  # first column past half height

    assert abs(edge_after_mapping_back(block=False) - 300) <= 1
    assert abs(edge_after_mapping_back(block=True) - 300) >= 3  # a block's centre would misplace it
