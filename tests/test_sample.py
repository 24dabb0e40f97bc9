"""Samples, completions and grids from a tiny random ImageGPT saved as a real checkpoint folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from igpt_core.config import ModelConfig
from igpt_core.sample import (
    SampleError,
    complete_images,
    grid_size,
    make_grid,
    sample_images,
    save_completion_grid,
    save_grid,
)

SIDE = 8
COLOURS = 16


def _centers() -> np.ndarray:
    """16 well-separated colours in [-1, 1]: the corners of the RGB cube and 8 mid-tones."""
    corners = np.array([[r, g, b] for r in (-1, 1) for g in (-1, 1) for b in (-1, 1)], dtype=np.float32)
    return np.concatenate([corners, corners * 0.4]).astype(np.float32)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer model over a 16-colour palette, saved the way pretrain saves one."""
    import torch

    from igpt_core.model import ImageGPT
    from igpt_core.palette import Palette

    folder = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=COLOURS, resolution=SIDE, n_layer=2, n_head=2, n_embd=32)
    ImageGPT(config).save(folder)
    Palette(centers=_centers()).save(folder, {"test": True})
    return folder


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(4, SIDE, SIDE, 3), dtype=np.uint8)


def _palette_colours() -> set[tuple[int, ...]]:
    from igpt_core.palette import Palette

    swatch = Palette(centers=_centers()).dequantize(np.arange(COLOURS, dtype=np.uint16)[None], 4)
    return {tuple(px) for px in swatch.reshape(-1, 3)}


# --- grids: pure numpy/PIL -------------------------------------------------------------------------


def test_grid_has_expected_pixel_size_and_nearest_neighbour_tiles(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    tiles = rng.integers(0, 256, size=(5, SIDE, SIDE, 3), dtype=np.uint8)
    path = save_grid(tiles, tmp_path / "g.png", scale=3, ncols=3, pad=2)
    with Image.open(path) as png:
        grid = np.asarray(png.convert("RGB"))
    # 2 rows x 3 columns of 24-pixel cells with 2-pixel gutters around and between them.
    assert grid.shape == (2 * 24 + 3 * 2, 3 * 24 + 4 * 2, 3)
    assert grid.shape[:2] == grid_size(5, SIDE, scale=3, ncols=3, pad=2)
    # Tile 4 sits at row 1, column 1; every source pixel is a 3x3 block.
    top, left = 2 + 1 * 26, 2 + 1 * 26
    cell = grid[top : top + 24, left : left + 24]
    np.testing.assert_array_equal(cell[::3, ::3], tiles[4])
    np.testing.assert_array_equal(cell[2::3, 1::3], tiles[4])
    # The unused sixth cell and the gutters stay white.
    assert (grid[top : top + 24, 2 + 2 * 26 :] == 255).all()
    assert (grid[:2] == 255).all()


def test_completion_grid_puts_original_first_in_each_row(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    originals = rng.integers(0, 256, size=(2, SIDE, SIDE, 3), dtype=np.uint8)
    completions = rng.integers(0, 256, size=(2, 3, SIDE, SIDE, 3), dtype=np.uint8)
    path = save_completion_grid(originals, completions, tmp_path / "c.png", scale=2, pad=1)
    grid = np.asarray(Image.open(path).convert("RGB"))
    assert grid.shape[:2] == grid_size(8, SIDE, scale=2, ncols=4, pad=1)
    step = SIDE * 2 + 1
    np.testing.assert_array_equal(grid[1 + step : 1 + step + 16 : 2, 1:17:2], originals[1])
    np.testing.assert_array_equal(
        grid[1 + step : 1 + step + 16 : 2, 1 + 3 * step : 1 + 3 * step + 16 : 2], completions[1, 2]
    )


def test_grid_rejects_bad_images() -> None:
    with pytest.raises(SampleError, match="images"):
        make_grid(np.zeros((2, SIDE, SIDE, 3), dtype=np.float32))
    with pytest.raises(SampleError, match="scale"):
        make_grid(np.zeros((2, SIDE, SIDE, 3), dtype=np.uint8), scale=0)
    with pytest.raises(SampleError, match="completions"):
        save_completion_grid(
            np.zeros((2, SIDE, SIDE, 3), np.uint8), np.zeros((3, 1, SIDE, SIDE, 3), np.uint8), "unused.png"
        )


# --- sampling with a real model ----------------------------------------------------------------------


def test_samples_have_shape_palette_colours_and_follow_the_seed(checkpoint: Path) -> None:
    first = sample_images(checkpoint, n=3, seed=7)
    again = sample_images(checkpoint, n=3, seed=7)
    other = sample_images(checkpoint, n=3, seed=8)
    assert first.shape == (3, SIDE, SIDE, 3) and first.dtype == np.uint8
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert {tuple(px) for px in first.reshape(-1, 3)} <= _palette_colours()


def test_in_memory_pair_samples_like_the_folder(checkpoint: Path) -> None:
    from igpt_core.model import ImageGPT
    from igpt_core.palette import Palette

    model = ImageGPT.load(checkpoint)
    model.train()  # a training loop hands its model over in train mode; sampling must not change that
    pair = (model, Palette.load(checkpoint))
    np.testing.assert_array_equal(sample_images(pair, n=2, seed=3), sample_images(checkpoint, n=2, seed=3))
    assert model.training


def test_greedy_ignores_the_seed(checkpoint: Path) -> None:
    np.testing.assert_array_equal(
        sample_images(checkpoint, n=2, temperature=0, seed=1),
        sample_images(checkpoint, n=2, temperature=0, seed=2),
    )


def test_completion_keeps_the_given_top_rows_exactly(checkpoint: Path, images: np.ndarray) -> None:
    from igpt_core.palette import Palette

    palette = Palette.load(checkpoint)
    originals, completions = complete_images(checkpoint, images, n=3, rows=3, samples=2, seed=5)
    assert originals.shape == (3, SIDE, SIDE, 3)
    assert completions.shape == (3, 2, SIDE, SIDE, 3)
    np.testing.assert_array_equal(originals, images[:3])
    quantized = palette.dequantize(palette.quantize(originals), SIDE)
    for sample in range(2):
        np.testing.assert_array_equal(completions[:, sample, :3], quantized[:, :3])
    # The bottom is drawn, not copied: with 16 colours over 40 pixels a copy by chance is negligible.
    assert not np.array_equal(completions[:, 0, 3:], quantized[:, 3:])
    again = complete_images(checkpoint, images, n=3, rows=3, samples=2, seed=5)[1]
    np.testing.assert_array_equal(completions, again)


def test_completion_defaults_to_half_and_accepts_tokens(checkpoint: Path, images: np.ndarray) -> None:
    from igpt_core.palette import Palette

    palette = Palette.load(checkpoint)
    tokens = palette.quantize(images)
    originals, completions = complete_images(checkpoint, tokens, n=8, seed=0)
    assert len(originals) == 4 and completions.shape == (4, 1, SIDE, SIDE, 3)  # n caps at what exists
    np.testing.assert_array_equal(originals, palette.dequantize(tokens, SIDE))
    np.testing.assert_array_equal(completions[:, 0, : SIDE // 2], originals[:, : SIDE // 2])


def test_completion_rejects_bad_input(checkpoint: Path, images: np.ndarray) -> None:
    with pytest.raises(SampleError, match="rows"):
        complete_images(checkpoint, images, rows=SIDE)
    with pytest.raises(SampleError, match="images_or_source"):
        complete_images(checkpoint, np.zeros((2, 5, 5, 3), np.uint8))
    with pytest.raises(SampleError, match="temperature"):
        sample_images(checkpoint, n=1, temperature=-1.0)


def test_not_a_checkpoint_is_named(tmp_path: Path) -> None:
    with pytest.raises(SampleError, match=str(tmp_path)):
        sample_images(tmp_path, n=1)
