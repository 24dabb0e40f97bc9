"""Image decoding: encoded bytes or a uint8 array -> a C-contiguous uint8 (R, R, 3) image, or a reject.

`igpt_core.sources` reads inputs and hands each one here; bad input raises `ImageRejected(reason)`,
which the source readers turn into a `Reject`.

Pixel rules, in this order:

1. Size is read from the header first (PIL's lazy open): more than `max_pixels` pixels (default
   `MAX_PIXELS`, 64 Mi) is a reject before any decoding; PIL's own decompression-bomb guard also applies.
2. Mode: 16-bit greyscale is scaled to 8 bits as `round(v / 257)` (not clipped; 16-bit RGB PNGs keep
   their high byte, as PIL reads them, at most 1 off that rule); CMYK, YCbCr, palette
   and 1-bit images are converted by PIL; any alpha (RGBA, LA, PA, palette or RGB/L transparency) is
   composited over white; greyscale is repeated into three channels. Animated images give their first
   frame. EXIF orientation is applied.
3. Geometry: a non-square image is centre-cropped to a square (the short side is kept), then resized to
   R×R with PIL's BICUBIC filter. Images already R×R are not resized. JPEGs at least twice R on the short
   side are decoded at a reduced size first (libjpeg DCT scaling via `Image.draft`, to no less than R):
   deterministic, and much faster than a full decode.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = ["MAX_PIXELS", "ImageRejected", "array_image", "decode_image"]

MAX_PIXELS = 64 * 1024 * 1024
"""Images whose header claims more pixels than this are rejected before decoding."""
_PIL_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")  # JPEG covers MPO (camera JPEGs)
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
# EXIF orientation tag -> the PIL transpose that undoes it (the table ImageOps.exif_transpose uses).
_ORIENTATION = {2: 0, 3: 3, 4: 1, 5: 5, 6: 4, 7: 6, 8: 2}


class ImageRejected(ValueError):
    """One input cannot become an image; the message is the reject reason."""


def _open_header(data: bytes, max_pixels: int) -> Image.Image:
    if not data:
        raise ImageRejected("empty file (0 bytes)")
    try:
        im = Image.open(io.BytesIO(data), formats=_PIL_FORMATS)
    except UnidentifiedImageError:
        raise ImageRejected(f"not a recognised image ({len(data)} bytes, starts {data[:8]!r})") from None
    except Image.DecompressionBombError as e:
        raise ImageRejected(f"image too large (PIL decompression-bomb guard): {e}") from None
    w, h = im.size
    if w * h > max_pixels:
        raise ImageRejected(f"image is {w}x{h} = {w * h} pixels, over the limit of {max_pixels}")
    if w < 1 or h < 1:
        raise ImageRejected(f"image has no pixels ({w}x{h})")
    return im


def _to_rgb_or_l(im: Image.Image) -> Image.Image:
    """An 8-bit RGB or L image; alpha composited over white, 16-bit scaled."""
    mode = im.mode
    if mode in ("RGB", "L") and "transparency" not in im.info:
        return im
    if mode.startswith("I"):
        # PIL's convert() clips 16-bit values at 255; scale the full range instead.
        wide = np.clip(np.asarray(im).astype(np.int64), 0, 65535)
        return Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8), mode="L")
    if mode in _ALPHA_MODES or "transparency" in im.info:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode == "1":
        return im.convert("L")
    if mode == "F":
        raise ImageRejected("floating-point pixels (mode F) are not supported")
    return im.convert("RGB")


def _fit(im: Image.Image, resolution: int) -> np.ndarray:
    """Centre-crop to a square, resize to R×R (BICUBIC), and return uint8 (R, R, 3)."""
    w, h = im.size
    if (w, h) != (resolution, resolution):
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        im = im.resize(
            (resolution, resolution), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side)
        )
    pixels = np.array(im)  # a writable copy (asarray would be a read-only view for RGB only)
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[:, :, None], 3, axis=2)
    return pixels


def decode_image(data: bytes, resolution: int, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Encoded image bytes -> uint8 (R, R, 3) by the module's rules; raises ImageRejected(reason)."""
    im = _open_header(data, max_pixels)
    try:
        orientation = im.getexif().get(0x0112, 1) if "exif" in im.info else 1
        if im.format in ("JPEG", "MPO") and min(im.size) >= 2 * resolution:
            im.draft(None, (resolution, resolution))
        pixels = _fit(_to_rgb_or_l(im), resolution)
        if orientation in _ORIENTATION:
            pixels = np.ascontiguousarray(_transpose(pixels, _ORIENTATION[orientation]))
    except ImageRejected:
        raise
    except Exception as e:  # any decoder failure (truncated data, bad chunks) is this input's reject
        raise ImageRejected(f"cannot decode {im.format or 'image'}: {type(e).__name__}: {e}") from None
    return pixels


def _transpose(pixels: np.ndarray, method: int) -> np.ndarray:
    # PIL Transpose ids: 0 flip L-R, 1 flip T-B, 2 rot90, 3 rot180, 4 rot270, 5 transpose, 6 transverse.
    if method == 0:
        return pixels[:, ::-1]
    if method == 1:
        return pixels[::-1]
    if method == 2:
        return np.rot90(pixels, 1)
    if method == 3:
        return np.rot90(pixels, 2)
    if method == 4:
        return np.rot90(pixels, 3)
    if method == 5:
        return pixels.transpose(1, 0, 2)
    return np.rot90(pixels, 2).transpose(1, 0, 2)


def array_image(pixels: np.ndarray, resolution: int) -> np.ndarray:
    """One uint8 image (H, W), (H, W, 1|3|4) -> uint8 (R, R, 3) by the module's rules (alpha over white)."""
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    if pixels.shape[:2] == (resolution, resolution) and pixels.ndim == 3 and pixels.shape[2] == 3:
        return np.array(pixels, order="C")  # a copy: a sample must not pin the whole source array
    mode = "L" if pixels.ndim == 2 else {3: "RGB", 4: "RGBA"}[pixels.shape[2]]
    return _fit(_to_rgb_or_l(Image.fromarray(np.ascontiguousarray(pixels), mode=mode)), resolution)
