"""Image decoding on its own: bytes and arrays in, uint8 (R, R, 3) out or ImageRejected (no sources, no files)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageOps

from igpt_core import imaging, sources
from igpt_core.imaging import MAX_PIXELS, ImageRejected, array_image, decode_image


def encode(im: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def random_rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_moved_names_are_still_importable_from_sources():
    for name in ("MAX_PIXELS", "ImageRejected", "decode_image", "array_image"):
        assert getattr(sources, name) is getattr(imaging, name)
        assert name in sources.__all__
    assert MAX_PIXELS == 64 * 1024 * 1024


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_matches_pil_exif_transpose(orientation):
    pixels = random_rgb(8, 8, seed=orientation)  # asymmetric, so each transpose gives a different image
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(Image.fromarray(pixels), "PNG", exif=exif)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    decoded = decode_image(data, 8)
    np.testing.assert_array_equal(decoded, expected)
    assert decoded.flags.c_contiguous and decoded.flags.writeable


def test_decode_rejects_name_the_problem():
    with pytest.raises(ImageRejected, match=r"^empty file \(0 bytes\)$"):
        decode_image(b"", 8)
    png = encode(Image.fromarray(random_rgb(10, 20)), "PNG")
    with pytest.raises(ImageRejected, match=r"^image is 20x10 = 200 pixels, over the limit of 199$"):
        decode_image(png, 8, max_pixels=199)
    assert decode_image(png, 8, max_pixels=200).shape == (8, 8, 3)
    floats = encode(Image.fromarray(np.zeros((4, 4), np.float32), mode="F"), "TIFF")
    with pytest.raises(ImageRejected, match=r"mode F"):
        decode_image(floats, 4)
    with pytest.raises(ImageRejected, match=r"^cannot decode PNG: "):
        decode_image(png[:60], 8)


def test_array_image_modes_crop_and_copy():
    rgb = random_rgb(8, 8)
    same = array_image(rgb, 8)
    np.testing.assert_array_equal(same, rgb)
    assert not np.shares_memory(same, rgb)  # a sample must not pin the source array

    wide = random_rgb(6, 10, seed=1)
    reference = Image.fromarray(wide).resize((4, 4), Image.Resampling.BICUBIC, box=(2, 0, 8, 6))
    np.testing.assert_array_equal(array_image(wide, 4), np.asarray(reference))

    grey = np.arange(16, dtype=np.uint8).reshape(4, 4)
    expected_grey = np.repeat(grey[:, :, None], 3, axis=2)
    np.testing.assert_array_equal(array_image(grey, 4), expected_grey)
    np.testing.assert_array_equal(array_image(grey[:, :, None], 4), expected_grey)

    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 2] = 255
    rgba[:2, :, 3] = 255  # top half opaque blue, bottom half fully transparent
    over_white = array_image(rgba, 4)
    assert tuple(over_white[0, 0]) == (0, 0, 255)
    assert tuple(over_white[3, 3]) == (255, 255, 255)
