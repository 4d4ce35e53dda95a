"""Image loading: every format the loader promises, and one exact error for every bad file."""

import cv2
import numpy as np
import pytest

from karyo.errors import ImageError
from karyo.data.imageio import decode_image, encode_png, read_image, write_image


def test_gray_png_becomes_three_identical_channels(tmp_path):
    gray = np.arange(64 * 48, dtype=np.uint32).reshape(64, 48) % 256
    cv2.imwrite(str(tmp_path / "g.png"), gray.astype(np.uint8))
    image = decode_image(tmp_path / "g.png")
    assert image.shape == (64, 48, 3) and image.dtype == np.uint8
    for channel in range(3):
        assert (image[:, :, channel] == gray).all()


def test_color_png_is_returned_as_rgb(tmp_path):
    bgr = np.zeros((16, 16, 3), np.uint8)
    bgr[:, :, 0] = 200  # blue in OpenCV's BGR order
    cv2.imwrite(str(tmp_path / "c.png"), bgr)
    image = decode_image(tmp_path / "c.png")
    assert image[0, 0].tolist() == [0, 0, 200]


def test_rgba_is_composited_over_white(tmp_path):
    bgra = np.zeros((16, 16, 4), np.uint8)
    bgra[:8, :, 3] = 255  # top half opaque black, bottom half transparent
    cv2.imwrite(str(tmp_path / "a.png"), bgra)
    image = decode_image(tmp_path / "a.png")
    assert image[:8].max() == 0 and image[8:].min() == 255


def test_16bit_tiff_is_scaled_to_8bit(tmp_path):
    deep = np.full((20, 20), 65535, np.uint16)
    deep[:10] = 257 * 100
    cv2.imwrite(str(tmp_path / "d.tif"), deep)
    image = decode_image(tmp_path / "d.tif")
    assert image.dtype == np.uint8
    assert image[0, 0, 0] == 100 and image[-1, -1, 0] == 255


@pytest.mark.parametrize("ext", [".jpg", ".bmp", ".tiff"])
def test_other_formats_decode(tmp_path, ext):
    cv2.imwrite(str(tmp_path / f"x{ext}"), np.full((30, 40, 3), 128, np.uint8))
    assert decode_image(tmp_path / f"x{ext}").shape == (30, 40, 3)


def test_read_image_resizes_to_square(tmp_path):
    cv2.imwrite(str(tmp_path / "r.png"), np.full((100, 60), 30, np.uint8))
    assert read_image(tmp_path / "r.png", 32).shape == (32, 32, 3)
    assert read_image(tmp_path / "r.png", None).shape == (100, 60, 3)


def _error(path):
    with pytest.raises(ImageError) as info:
        decode_image(path)
    assert str(path) in str(info.value)
    return info.value.reason


def test_bad_files_raise_one_exact_reason(tmp_path):
    good = encode_png(np.full((40, 40), 90, np.uint8))
    (tmp_path / "truncated.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("this is not an image\n" * 20)
    ok, jpg = cv2.imencode(".jpg", np.full((40, 40), 90, np.uint8))
    (tmp_path / "truncated.jpg").write_bytes(jpg.tobytes()[:-40])
    cv2.imwrite(str(tmp_path / "tiny.png"), np.zeros((1, 1), np.uint8))

    assert _error(tmp_path / "truncated.png") == "truncated PNG (no IEND chunk at the end)"
    assert _error(tmp_path / "empty.png") == "empty file (0 bytes)"
    assert _error(tmp_path / "text.png").startswith("cannot be decoded as an image")
    assert _error(tmp_path / "truncated.jpg") == "truncated JPEG (no end-of-image marker)"
    assert _error(tmp_path / "tiny.png") == "too small (1x1 pixels; at least 8x8 needed)"
    assert _error(tmp_path / "missing.png") == "file not found"
    assert _error(tmp_path) == "is a folder, not an image"


def test_write_image_roundtrip_and_non_ascii_name(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    path = tmp_path / "karyogramm_ä_染色体.png"
    write_image(path, image)
    assert (decode_image(path) == image).all()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind


def test_huge_image_is_refused_with_the_limit_named(tmp_path):
    cv2.imwrite(str(tmp_path / "huge.png"), np.zeros((10_001, 10_000), np.uint8))
    assert _error(tmp_path / "huge.png").startswith(("too large (10000x10001 pixels",
                                                     "cannot be decoded as an image"))
