"""Palette.quantize gives the same tokens as transformers' ImageGPTImageProcessor, token for token."""

from __future__ import annotations

import io
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest

from igpt_core.palette import Palette, _reference_levels, codes_to_rgb, normalise

pytest.importorskip("transformers")


def reference_tokens(images: np.ndarray, centers: np.ndarray, batch: int = 250) -> np.ndarray:
    """Tokens from transformers' ImageGPTImageProcessor, called as a user would (no resize)."""
    from transformers import ImageGPTImageProcessor

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        processor = ImageGPTImageProcessor(clusters=centers, do_resize=False)
    out = [
        np.asarray(processor(list(images[i : i + batch]), return_tensors="np")["input_ids"])
        for i in range(0, len(images), batch)
    ]
    return np.concatenate(out)


def load_test_images(cifar_dir: Path, n: int) -> np.ndarray:
    from PIL import Image

    images = []
    with tarfile.open(cifar_dir / "test-000000.tar") as tar:
        for member in tar:
            if member.name.endswith(".jpg"):
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                images.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
                if len(images) == n:
                    break
    return np.stack(images)


@pytest.mark.shared
def test_cifar_images_match_transformers(cifar_dir: Path) -> None:
    images = load_test_images(cifar_dir, 2000)
    rng = np.random.default_rng(0)
    # A palette drawn from the images' own pixels (so many pixels sit on or near a centre).
    pixels = images.reshape(-1, 3)
    centers = normalise(pixels[rng.choice(len(pixels), 512, replace=False)])
    palette = Palette(centers)
    ours = palette.quantize(images)
    expected = reference_tokens(images, palette.centers)
    assert ours.dtype == np.uint16 and ours.shape == (2000, 1024)
    np.testing.assert_array_equal(ours, expected)
    # Warm cache: same answer, and the same again for a different batching of the images.
    np.testing.assert_array_equal(palette.quantize(images[:777]), expected[:777])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_images_and_palettes_match_transformers(seed: int) -> None:
    rng = np.random.default_rng(seed)
    k = int(rng.choice([2, 17, 512]))
    centers = rng.uniform(-1, 1, (k, 3)).astype(np.float32)
    images = rng.integers(0, 256, (64, 16, 16, 3), dtype=np.uint8)
    np.testing.assert_array_equal(Palette(centers).quantize(images), reference_tokens(images, centers))


def test_near_ties_match_transformers() -> None:
    """Centres placed symmetrically around pixel colours (ties in exact arithmetic, decided by
    float32 rounding), duplicated centres (exact ties: the lower index wins) and centres sitting
    exactly on pixel colours."""
    rng = np.random.default_rng(7)
    levels = _reference_levels()
    colours = rng.integers(0, 256, (40, 3))
    on_pixel = levels[colours]  # exactly the reference's value of those pixels
    offsets = rng.choice([-1, 1], (40, 3)) * rng.choice([1, 2, 3], (40, 3)).astype(np.float32) / 255
    centers = np.concatenate(
        [
            np.clip(on_pixel + offsets, -1, 1),
            np.clip(on_pixel - offsets, -1, 1),
            on_pixel[:10],
            on_pixel[:10],  # duplicates of the rows above
        ]
    ).astype(np.float32)
    rng.shuffle(centers)
    # Images made of those colours and their immediate neighbours.
    near = (colours[:, None, :] + rng.integers(-3, 4, (40, 64, 3))).clip(0, 255).astype(np.uint8)
    images = near.reshape(40, 8, 8, 3)
    np.testing.assert_array_equal(Palette(centers).quantize(images), reference_tokens(images, centers))


def test_every_grey_and_primary_ramp_matches_transformers() -> None:
    values = np.arange(256, dtype=np.uint8)
    ramps = [np.stack([values, values, values], 1)]
    for channel in range(3):
        ramp = np.zeros((256, 3), np.uint8)
        ramp[:, channel] = values
        ramps.append(ramp)
    images = np.stack(ramps).reshape(4, 16, 16, 3)
    centers = normalise(codes_to_rgb(np.random.default_rng(3).integers(0, 1 << 24, 512, dtype=np.uint32)))
    np.testing.assert_array_equal(Palette(centers).quantize(images), reference_tokens(images, centers))


# -- the full colour table: images the palette has never seen ---------------------------------


def load_train_images(cifar_dir: Path, n: int) -> np.ndarray:
    from PIL import Image

    images = []
    with tarfile.open(cifar_dir / "train-000000.tar") as tar:
        for member in tar:
            if member.name.endswith(".jpg"):
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                images.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
                if len(images) == n:
                    break
    return np.stack(images)


@pytest.mark.shared
def test_table_of_a_fresh_palette_matches_transformers_on_unseen_images(
    cifar_dir: Path, tmp_path: Path
) -> None:
    """A palette drawn from train pixels, its table built, stored and loaded back (nothing quantized
    before), then test images it never saw."""
    train = load_train_images(cifar_dir, 500).reshape(-1, 3)
    centers = normalise(train[np.random.default_rng(1).choice(len(train), 512, replace=False)])
    Palette(centers).save(tmp_path / "pal", table=True)
    palette = Palette.load(tmp_path / "pal")
    assert palette.has_table
    images = load_test_images(cifar_dir, 1000)
    ours = palette.quantize(images)
    np.testing.assert_array_equal(ours, reference_tokens(images, palette.centers))


def test_table_matches_transformers_on_random_colours_and_near_ties() -> None:
    """The full table of a palette with deliberate near-ties (centre pairs symmetric about pixel
    colours, centres 1e-7 apart, duplicates, centres on pixel colours), against transformers on
    random colours and on the colours around every near-tie."""
    rng = np.random.default_rng(21)
    levels = _reference_levels()
    colours = rng.integers(0, 256, (60, 3))
    on_pixel = levels[colours]
    offsets = rng.choice([-1, 1], (60, 3)) * rng.choice([1, 2, 3], (60, 3)).astype(np.float32) / 255
    spread = rng.uniform(-1, 1, (300, 3)).astype(np.float32)
    twins = np.clip(spread[:4] + rng.normal(0, 1e-7, (4, 3)).astype(np.float32), -1, 1)
    centers = np.concatenate(
        [
            np.clip(on_pixel + offsets, -1, 1),
            np.clip(on_pixel - offsets, -1, 1),
            on_pixel[:12],
            on_pixel[:12],  # duplicates of the rows above: exact ties, the lower index wins
            spread,
            twins,
        ]
    ).astype(np.float32)
    rng.shuffle(centers)
    palette = Palette(centers)
    table = palette.build_table()
    assert table.dtype == np.uint16 and table.shape == (1 << 24,) and int(table.max()) < len(centers)
    near = (colours[:, None, :] + rng.integers(-3, 4, (60, 256, 3))).clip(0, 255)
    random = rng.integers(0, 256, (60 * 256, 3))
    pixels = np.concatenate([near.reshape(-1, 3), random]).astype(np.uint8)
    images = pixels.reshape(-1, 16, 16, 3)
    np.testing.assert_array_equal(palette.quantize(images), reference_tokens(images, centers))
