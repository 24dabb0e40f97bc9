"""Unconditional samples, completions of held-out images, and PNG grids a person can look at.

A checkpoint argument is either a checkpoint folder (model.safetensors, config.json, palette.npy) or an
already-loaded `(ImageGPT, Palette)` pair, so a caller that has just trained a model need not reload it.
Sampling is seeded through one `torch.Generator`, so the same seed gives the same pixels.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np
from PIL import Image

from igpt_core.checkpoint import CONFIG_FILE, PALETTE_FILE, load
from igpt_core.data import load_tokens
from igpt_core.shards import read_meta
from igpt_core.sources import Sample, iter_source, open_source

if TYPE_CHECKING:
    from igpt_core.model import ImageGPT
    from igpt_core.palette import Palette

Checkpoint: TypeAlias = str | os.PathLike | tuple["ImageGPT", "Palette"]
"""A checkpoint folder, or an in-memory (model, palette) pair."""


class SampleError(ValueError):
    """Bad input to sampling or completion; the message names the argument."""


def load_checkpoint(checkpoint: Checkpoint) -> tuple[ImageGPT, Palette]:
    """The (model, palette) of a checkpoint folder, or the pair itself when one is passed in."""
    if isinstance(checkpoint, tuple):
        if len(checkpoint) != 2:
            raise SampleError(
                f"checkpoint: expected a folder or a (model, palette) pair, got {len(checkpoint)} items"
            )
        model, palette = checkpoint
        _check_pair(model, palette)
        return model, palette
    folder = Path(checkpoint)
    if not (folder / CONFIG_FILE).is_file():
        raise SampleError(f"checkpoint: {folder} is not a checkpoint folder (no {CONFIG_FILE})")
    if not (folder / PALETTE_FILE).is_file():
        raise SampleError(
            f"checkpoint: {folder} has no {PALETTE_FILE}, so tokens cannot be turned into colours"
        )
    loaded, found, _ = load(folder)
    assert found is not None  # checked above
    _check_pair(loaded, found)
    return loaded, found


def _check_pair(model: Any, palette: Any) -> None:
    if palette.clusters != model.config.vocab_size:
        raise SampleError(
            f"checkpoint: palette has {palette.clusters} colours but the model's vocab_size is "
            f"{model.config.vocab_size}"
        )


@contextlib.contextmanager
def _eval_mode(model: ImageGPT) -> Iterator[None]:
    """Eval mode for the duration, then the caller's mode back (a training loop may pass its model)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _generator(seed: int) -> Any:
    import torch  # heavy: torch

    return torch.Generator(device="cpu").manual_seed(int(seed))


def _check_sampling(
    temperature: float, top_k: int | None, top_p: float | None
) -> tuple[float, int | None, float | None]:
    """Validated sampling settings; temperature 0 means greedy, which is top-1 sampling."""
    if temperature < 0:
        raise SampleError(f"temperature: must be non-negative (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise SampleError(f"top_k: must be at least 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise SampleError(f"top_p: must be in (0, 1], got {top_p}")
    return temperature, top_k, top_p


def sample_images(
    checkpoint: Checkpoint,
    n: int = 16,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    batch_size: int = 64,
) -> np.ndarray:
    """`n` images drawn from the model, uint8 (n, R, R, 3), coloured with the checkpoint's palette.

    temperature 0 is greedy decoding; top_k and top_p restrict sampling to the likeliest colours.
    """
    import torch  # heavy: torch

    from igpt_core.generation import generate  # heavy: torch

    if n < 1:
        raise SampleError(f"n: must be at least 1, got {n}")
    temperature, top_k, top_p = _check_sampling(temperature, top_k, top_p)
    model, palette = load_checkpoint(checkpoint)
    cfg = model.config
    generator = _generator(seed)
    device = next(model.parameters()).device
    chunks = []
    with _eval_mode(model):
        for start in range(0, n, batch_size):
            count = min(batch_size, n - start)
            prefix = torch.full((count, 1), cfg.start_token, dtype=torch.long, device=device)
            out = generate(
                model,
                prefix,
                cfg.block_size,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                generator=generator,
            )
            chunks.append(out[:, 1:].cpu().numpy())  # drop the start token
    tokens = np.concatenate(chunks).astype(np.uint16)
    return palette.dequantize(tokens, cfg.resolution)


def _looks_like_shards(path: Path) -> bool:
    return path.is_dir() and (
        (path / "manifest.parquet").exists() or (path / "meta.json").exists() or any(path.glob("*.tar"))
    )


def pick_split(path: str | os.PathLike, preferred: tuple[str, ...]) -> str | None:
    """The first of `preferred` splits a token folder holds when it holds several; None lets one split be."""
    folder = Path(path)
    names: list[str] = []
    if (folder / "meta.json").is_file():
        names = list(read_meta(folder).get("splits", {}))
    elif folder.is_dir():
        names = sorted({tar.name.rsplit("-", 1)[0] for tar in folder.glob("*-*.tar")})
    if len(names) <= 1:
        return None
    return next((name for name in preferred if name in names), None)


def _held_out(
    images_or_source: Any, n: int, resolution: int, palette: Palette
) -> tuple[np.ndarray, np.ndarray]:
    """(originals uint8 (n, R, R, 3), tokens uint16 (n, R*R)) from an array, token shards or an image source.

    Token shards hold only palette indices, so their "originals" are the dequantized tokens.
    """
    data = images_or_source
    if isinstance(data, np.ndarray):
        if data.dtype == np.uint8 and data.ndim == 4 and data.shape[1:] == (resolution, resolution, 3):
            images = data[:n]
            return images, palette.quantize(images)
        if (
            data.ndim == 2
            and data.shape[1] == resolution * resolution
            and np.issubdtype(data.dtype, np.integer)
        ):
            tokens = data[:n].astype(np.uint16)
            if tokens.size and int(tokens.max()) >= palette.clusters:
                raise SampleError(
                    f"images_or_source: token {int(tokens.max())} is outside the palette of {palette.clusters}"
                )
            return palette.dequantize(tokens, resolution), tokens
        raise SampleError(
            f"images_or_source: expected uint8 images (N, {resolution}, {resolution}, 3) or tokens "
            f"(N, {resolution * resolution}), got {data.dtype} {data.shape}"
        )
    if isinstance(data, (str, os.PathLike)) and _looks_like_shards(Path(data)):
        # A folder with several splits: complete held-out images (test, else val), never training ones.
        tokens, _ = load_tokens(data, split=pick_split(data, ("test", "val")), limit=n)
        if tokens.shape[1] != resolution * resolution:
            raise SampleError(
                f"images_or_source: shards {data} hold {tokens.shape[1]} tokens per image but the model "
                f"expects {resolution * resolution} (R={resolution})"
            )
        tokens = tokens[:n].astype(np.uint16)
        return palette.dequantize(tokens, resolution), tokens
    images_list = []
    for item in iter_source(open_source(data), resolution):
        if isinstance(item, Sample):
            images_list.append(item.image)
            if len(images_list) == n:
                break
    if not images_list:
        raise SampleError(f"images_or_source: {data} yielded no valid images")
    images = np.stack(images_list).astype(np.uint8)
    return images, palette.quantize(images)


def complete_images(
    checkpoint: Checkpoint,
    images_or_source: Any,
    n: int = 8,
    *,
    rows: int | None = None,
    samples: int = 1,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """The model's completions of the bottom of held-out images given their top `rows` (default R // 2).

    `images_or_source` is uint8 images (N, R, R, 3), tokens (N, R*R), a token shard folder or any image
    source spec. The prefix is the quantized top rows, so each completion's top rows equal the quantized
    original's. Returns (originals uint8 (m, R, R, 3), completions uint8 (m, samples, R, R, 3)) with
    m = min(n, images available).
    """
    import torch  # heavy: torch

    from igpt_core.generation import generate  # heavy: torch

    if n < 1:
        raise SampleError(f"n: must be at least 1, got {n}")
    if samples < 1:
        raise SampleError(f"samples: must be at least 1, got {samples}")
    temperature, top_k, top_p = _check_sampling(temperature, top_k, top_p)
    model, palette = load_checkpoint(checkpoint)
    cfg = model.config
    side = cfg.resolution
    rows = side // 2 if rows is None else rows
    if not 0 <= rows < side:
        raise SampleError(f"rows: must be in [0, {side - 1}] for R={side}, got {rows}")
    originals, tokens = _held_out(images_or_source, n, side, palette)
    given = rows * side
    device = next(model.parameters()).device
    prefix = torch.from_numpy(tokens[:, :given].astype(np.int64))
    start = torch.full((len(tokens), 1), cfg.start_token, dtype=torch.long)
    # Each image's prefix repeated `samples` times, image-major, so rows of the grid stay together.
    prefix = torch.cat([start, prefix], dim=1).repeat_interleave(samples, dim=0).to(device)
    with _eval_mode(model):
        out = generate(
            model,
            prefix,
            cfg.block_size - given,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            generator=_generator(seed),
        )
    completed = out[:, 1:].cpu().numpy().astype(np.uint16)
    completions = palette.dequantize(completed, side).reshape(len(tokens), samples, side, side, 3)
    return originals, completions


def grid_size(
    count: int, resolution: int, *, scale: int = 4, ncols: int | None = None, pad: int = 2
) -> tuple[int, int]:
    """(height, width) in pixels of the grid `save_grid` writes for `count` R x R images."""
    ncols = ncols or math.ceil(math.sqrt(count))
    nrows = math.ceil(count / ncols)
    cell = resolution * scale
    return nrows * cell + (nrows + 1) * pad, ncols * cell + (ncols + 1) * pad


def make_grid(images: np.ndarray, *, scale: int = 4, ncols: int | None = None, pad: int = 2) -> np.ndarray:
    """Images uint8 (N, R, R, 3) tiled row-major on a white background, each upscaled by nearest neighbour."""
    images = np.asarray(images)
    if (
        images.dtype != np.uint8
        or images.ndim != 4
        or images.shape[-1] != 3
        or images.shape[1] != images.shape[2]
    ):
        raise SampleError(f"images: expected uint8 (N, R, R, 3), got {images.dtype} {images.shape}")
    if len(images) == 0:
        raise SampleError("images: nothing to draw (0 images)")
    if scale < 1:
        raise SampleError(f"scale: must be at least 1, got {scale}")
    if ncols is not None and ncols < 1:
        raise SampleError(f"ncols: must be at least 1, got {ncols}")
    if pad < 0:
        raise SampleError(f"pad: must be non-negative, got {pad}")
    count, side = len(images), images.shape[1]
    ncols = ncols or math.ceil(math.sqrt(count))
    height, width = grid_size(count, side, scale=scale, ncols=ncols, pad=pad)
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    cell = side * scale
    big = images.repeat(scale, axis=1).repeat(scale, axis=2)  # nearest neighbour: hard pixel edges
    for index in range(count):
        row, col = divmod(index, ncols)
        top, left = pad + row * (cell + pad), pad + col * (cell + pad)
        canvas[top : top + cell, left : left + cell] = big[index]
    return canvas


def save_grid(
    images: np.ndarray, path: str | os.PathLike, *, scale: int = 4, ncols: int | None = None, pad: int = 2
) -> Path:
    """Writes `images` as one PNG grid (see `make_grid`); returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(make_grid(images, scale=scale, ncols=ncols, pad=pad)).save(out, format="PNG")
    return out


def save_completion_grid(
    originals: np.ndarray, completions: np.ndarray, path: str | os.PathLike, *, scale: int = 4, pad: int = 2
) -> Path:
    """One row per image: the original, then its completions. `completions` is (m, S, R, R, 3) or (m, R, R, 3)."""
    originals = np.asarray(originals)
    completions = np.asarray(completions)
    if completions.ndim == 4:
        completions = completions[:, None]
    if (
        completions.ndim != 5
        or len(completions) != len(originals)
        or completions.shape[2:] != originals.shape[1:]
    ):
        raise SampleError(
            f"completions: shape {completions.shape} does not match originals {originals.shape} "
            "(expected (m, S, R, R, 3) for m originals)"
        )
    per_row = 1 + completions.shape[1]
    tiles = np.concatenate([originals[:, None], completions], axis=1).reshape(-1, *originals.shape[1:])
    return save_grid(tiles, path, scale=scale, ncols=per_row, pad=pad)
