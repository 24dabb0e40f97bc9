"""The colour palette value: K centres in [-1, 1], nearest-colour tokens, save/load, digest.

Fitting a palette (k-means over a source's pixels, on Ray) is `palette_fit.fit_palette`; this module is
the value it returns and everything that only reads it.

Quantization gives the tokens of transformers' ``ImageGPTImageProcessor`` arithmetic (float32
squared distances ``|a|^2 - 2 a.c + |c|^2``, first argmin) once per distinct colour: a k-d tree finds
the exact nearest centre, and the near-ties where float32 rounding could choose otherwise get the
reference arithmetic itself. Answers are cached in a lazily filled 2**24 lookup table, so tokens are
identical to the reference and repeated colours cost one gather. For colours never seen, the full
table (`build_table`, exact for all 2**24 colours, see `palette_table`) is stored beside the palette
as palette.lut and memory-mapped on load, so every colour costs one gather.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from igpt_core.kmeans import assign as _assign
from igpt_core.kmeans import process_cpus
from igpt_core.palette_table import (
    MARGIN,
    N_COLOURS,
    TABLE_NAME,
    TableError,
    build_table,
    read_table,
    reference_levels,
    reference_nearest,
    reference_pixels,
    write_table,
)

_UNFILLED = np.uint16(0xFFFF)  # never a token: clusters <= 65535, so tokens <= 65534
# New distinct colours in one quantize call beyond which the full table is built instead: on CIFAR the
# per-colour path took ~3-10 s for a million new colours, the table ~3.5 s CPU (bench/bench_quantize.py's
# payoff rows), so past a million the table is the cheaper way, and every later colour is free.
BUILD_AT = 1 << 20
# Pixels per gather from a full table in `Palette.quantize`: 1 MiB of codes and 512 KiB of tokens, which
# stay in cache (bench/bench_quantize.py: 4-6 ns a pixel in a fresh process, against 28-34 ns for one
# gather over 100,000 images).
LOOKUP_CHUNK = 1 << 18
# Old private names, kept for callers and tests.
_reference_levels = reference_levels
_reference_pixels = reference_pixels
_reference_nearest = reference_nearest


def _threads() -> int:
    """Threads a large quantize call uses: OMP_NUM_THREADS when set (Ray sets it to a task's CPUs), else
    the CPUs this process may run on."""
    try:
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    except (KeyError, ValueError):
        return process_cpus()


def colour_codes(pixels: np.ndarray) -> np.ndarray:
    """uint32 code ``r | g << 8 | b << 16`` of every pixel of a uint8 (..., 3) array, flattened."""
    flat = np.ascontiguousarray(pixels, dtype=np.uint8).reshape(-1)
    n = flat.size // 3
    if n == 0:
        return np.zeros(0, np.uint32)
    # Read each pixel as a little-endian uint32 at a 3-byte stride (one pass, no per-channel
    # temporaries); the fourth byte belongs to the next pixel and is masked off. The last pixel has
    # no fourth byte, so it is done apart.
    codes = np.empty(n, np.uint32)
    if n > 1:
        strided = np.ndarray((n - 1,), dtype="<u4", buffer=flat, offset=0, strides=(3,))
        np.bitwise_and(strided, 0xFFFFFF, out=codes[:-1])
    last = flat[-3:].astype(np.uint32)
    codes[-1] = last[0] | (last[1] << 8) | (last[2] << 16)
    return codes


def codes_to_rgb(codes: np.ndarray) -> np.ndarray:
    """uint8 (N, 3) colours of uint32 colour codes (inverse of `colour_codes`)."""
    codes = np.asarray(codes, np.uint32)
    return np.stack([codes & 255, (codes >> 8) & 255, codes >> 16], axis=1).astype(np.uint8)


def normalise(rgb: np.ndarray) -> np.ndarray:
    """float32 pixels in [-1, 1] as ``x / 127.5 - 1`` (the paper's normalisation, used for fitting)."""
    return (np.asarray(rgb, np.float64) / 127.5 - 1.0).astype(np.float32)


def _nearest_tokens(codes: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """The tokens `_reference_nearest` gives, found faster for many colours.

    The exact (float64) nearest and second-nearest centres come from a k-d tree. Where the second
    is farther by more than twice the bound on the reference's float32 error, the reference's
    argmin can only be the nearest; the near-ties left (about 0.2% of CIFAR colours) get the
    reference arithmetic itself, so every token is the reference's.
    """
    if codes.size < 4096 or len(centers) < 2:
        return reference_nearest(codes, centers)
    nearest, first, second = _assign(reference_pixels(codes), centers, second=True)
    out = nearest.astype(np.uint16)
    close = np.flatnonzero(second - first <= MARGIN)
    if close.size:
        out[close] = reference_nearest(codes[close], centers)
    return out


@dataclass(frozen=True, eq=False)
class Palette:
    """K colours in [-1, 1] (openai's ``kmeans_centers.npy`` layout) and the nearest-colour mapping."""

    centers: np.ndarray
    """float32 (K, 3) in [-1, 1]; row k is token k."""
    info: Mapping[str, Any] = field(default_factory=dict)
    """What the fit measured (pixels, unique colours, inertia, ...); written into palette.json."""
    _lut: np.ndarray | None = field(default=None, init=False, repr=False)
    _full: bool = field(default=False, init=False, repr=False)
    """`_lut` holds every colour (built or read from a table file), not only colours seen."""
    _table_path: Path | None = field(default=None, init=False, repr=False)
    """The table file `_lut` came from or was written to: what a pickled copy memory-maps."""
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        centers = np.array(self.centers, dtype=np.float32, order="C", copy=True)
        if centers.ndim != 2 or centers.shape[1] != 3:
            raise ValueError(f"centers: expected shape (K, 3), got {centers.shape}")
        if not 2 <= centers.shape[0] <= 65535:
            raise ValueError(f"centers: K must be in [2, 65535], got {centers.shape[0]}")
        if not np.all(np.isfinite(centers)):
            raise ValueError("centers: contains NaN or infinite values")
        if np.abs(centers).max() > 1.0 + 1e-5:
            raise ValueError(
                f"centers: values must lie in [-1, 1] (pixels scaled as x / 127.5 - 1), "
                f"got range [{centers.min():.4f}, {centers.max():.4f}]"
            )
        centers.setflags(write=False)
        object.__setattr__(self, "centers", centers)
        object.__setattr__(self, "info", dict(self.info))

    # The lookup table (32 MiB) and the lock stay behind when a palette is pickled to a Ray worker: the
    # worker memory-maps the table file when there is one (the page cache shares it between workers of
    # a node), else fills its own cache colour by colour.
    def __getstate__(self) -> dict[str, Any]:
        path = str(self._table_path) if self._table_path is not None else None
        return {"centers": self.centers, "info": dict(self.info), "table_path": path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        object.__setattr__(self, "centers", state["centers"])
        object.__setattr__(self, "info", state["info"])
        object.__setattr__(self, "_lut", None)
        object.__setattr__(self, "_full", False)
        path = state.get("table_path")
        object.__setattr__(self, "_table_path", Path(path) if path else None)
        object.__setattr__(self, "_lock", threading.Lock())

    @property
    def has_table(self) -> bool:
        """True when every colour's token is at hand (a built table, or a table file to map)."""
        return self._full or self._table_path is not None

    def build_table(self) -> np.ndarray:
        """The read-only uint16 (2**24,) token of every colour code, computed exactly once (~3.5 s CPU for
        K=512 on one core; see `palette_table`); quantize uses it from then on."""
        with self._lock:
            self._map_table()
            if not self._full:
                table = build_table(self.centers)
                table.setflags(write=False)
                object.__setattr__(self, "_lut", table)
                object.__setattr__(self, "_full", True)
            assert self._lut is not None
            return self._lut

    def use_table(self, path: str | Path) -> None:
        """Takes the table at `path` (memory-mapped, digest checked): TableError naming the file if it
        belongs to another palette."""
        table = read_table(Path(path), self.digest(), self.clusters)
        with self._lock:
            object.__setattr__(self, "_lut", table.view(np.ndarray))
            object.__setattr__(self, "_full", True)
            object.__setattr__(self, "_table_path", Path(path))

    def save_table(self, path: str | Path) -> Path:
        """Writes the full table (building it first if needed) to `path`; pickled copies map it."""
        out = Path(path)
        if self._table_path is not None and out.exists() and out.samefile(self._table_path):
            return out  # this palette's table is already that file
        table = self.build_table()
        write_table(out, table, self.digest(), self.clusters)
        object.__setattr__(self, "_table_path", out)
        return out

    def _map_table(self) -> None:
        """Memory-maps the table file of an unpickled copy; keeps the colour cache if the file is not
        reachable from here (another node's disk). Called with the lock held."""
        if self._full or self._table_path is None:
            return
        try:
            table = read_table(self._table_path, self.digest(), self.clusters)
        except FileNotFoundError:
            object.__setattr__(self, "_table_path", None)
            return
        object.__setattr__(self, "_lut", table.view(np.ndarray))
        object.__setattr__(self, "_full", True)

    @property
    def clusters(self) -> int:
        return int(self.centers.shape[0])

    def digest(self) -> str:
        """sha256 hex of the centres' float32 little-endian bytes."""
        return hashlib.sha256(self.centers.astype("<f4").tobytes()).hexdigest()

    def rgb(self) -> np.ndarray:
        """uint8 (K, 3) colours of the centres: ``rint((c + 1) * 127.5)`` clipped to [0, 255]."""
        return np.clip(np.rint((self.centers.astype(np.float64) + 1.0) * 127.5), 0, 255).astype(np.uint8)

    def tokens_of_codes(self, codes: np.ndarray) -> np.ndarray:
        """uint16 token of each uint32 colour code: one gather from the full table when there is one;
        else computes (and caches) only colours not seen yet, or builds the full table when a call
        brings more than `BUILD_AT` new colours."""
        if not self._full:
            with self._lock:
                self._map_table()
        if self._full:
            assert self._lut is not None
            return np.take(self._lut, codes)
        with self._lock:
            lut = self._lut
            if lut is None:
                lut = np.full(N_COLOURS, _UNFILLED, np.uint16)
                object.__setattr__(self, "_lut", lut)
            tokens = np.take(lut, codes)
            missing = tokens == _UNFILLED
            if missing.any():
                new = np.unique(codes[missing])
                if new.size > BUILD_AT:
                    table = build_table(self.centers)
                    table.setflags(write=False)
                    object.__setattr__(self, "_lut", table)
                    object.__setattr__(self, "_full", True)
                    return np.take(table, codes)
                lut[new] = _nearest_tokens(new, self.centers)
                tokens[missing] = np.take(lut, codes[missing])
        return tokens

    def quantize(self, images: np.ndarray) -> np.ndarray:
        """uint16 (N, R*R) tokens in raster order of uint8 images (N, R, R, 3) or one image (R, R, 3).

        Token-for-token identical to transformers' ImageGPTImageProcessor given these centres as
        float32 clusters (and do_resize=False): squared Euclidean distance in its float32
        arithmetic, ties to the lowest index.
        """
        images = np.asarray(images)
        if images.dtype != np.uint8:
            raise TypeError(f"images: expected uint8 RGB pixels, got dtype {images.dtype}")
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images: expected shape (N, H, W, 3) or (H, W, 3), got {images.shape}")
        n = images.shape[0]
        if not self._full:
            with self._lock:
                self._map_table()
        if not self._full or images.size <= 3 * LOOKUP_CHUNK:
            return self.tokens_of_codes(colour_codes(images)).reshape(n, -1)
        # The full table: gather chunk by chunk, so the codes stay in cache and no image-sized temporary
        # is made (one gather over 100,000 images ran 5-7x slower per pixel than this, in a fresh process),
        # on the process's threads (numpy releases the GIL in both steps).
        lut = self._lut
        assert lut is not None
        pixels = np.ascontiguousarray(images).reshape(-1, 3)
        tokens = np.empty(len(pixels), np.uint16)

        def gather(start: int) -> None:
            stop = start + LOOKUP_CHUNK
            np.take(lut, colour_codes(pixels[start:stop]), out=tokens[start:stop])

        starts = range(0, len(pixels), LOOKUP_CHUNK)
        workers = min(_threads(), len(starts))
        if workers > 1:
            with ThreadPoolExecutor(workers, thread_name_prefix="igpt-quantize") as pool:
                list(pool.map(gather, starts))
        else:
            for start in starts:
                gather(start)
        return tokens.reshape(n, -1)

    def dequantize(self, tokens: np.ndarray, resolution: int | None = None) -> np.ndarray:
        """uint8 (N, R, R, 3) images of tokens (N, R*R) or (R*R,); R defaults to sqrt(R*R)."""
        tokens = np.asarray(tokens)
        if not np.issubdtype(tokens.dtype, np.integer):
            raise TypeError(f"tokens: expected integers, got dtype {tokens.dtype}")
        if tokens.ndim == 1:
            tokens = tokens[None]
        if tokens.ndim != 2:
            raise ValueError(f"tokens: expected shape (N, R*R) or (R*R,), got {tokens.shape}")
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.clusters):
            raise ValueError(
                f"tokens: values must be in [0, {self.clusters}), got [{tokens.min()}, {tokens.max()}]"
            )
        side = resolution if resolution is not None else math.isqrt(tokens.shape[1])
        if side * side != tokens.shape[1]:
            raise ValueError(f"tokens: {tokens.shape[1]} tokens per image is not resolution**2 (R={side})")
        return self.rgb()[tokens].reshape(tokens.shape[0], side, side, 3)

    def save(
        self, out_dir: str | Path, meta: Mapping[str, Any] | None = None, *, table: bool | None = None
    ) -> Path:
        """Writes palette.npy, palette.json (this palette's info, then `meta`) and palette.png, and the
        colour table palette.lut when `table` (None: when one is built). A palette.lut of another
        palette left in the folder is removed."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        np.save(out / "palette.npy", self.centers, allow_pickle=False)
        lut = out / TABLE_NAME
        if table or (table is None and self._full):
            self.save_table(lut)
        elif lut.exists():
            try:
                read_table(lut, self.digest(), self.clusters)
            except TableError:
                lut.unlink()
        record = {**self.info, **(meta or {}), "clusters": self.clusters, "digest": self.digest()}
        (out / "palette.json").write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
        # Swatch: tokens in order, row-major, 32 per row, 16 px each.
        cols = min(32, self.clusters)
        rows = -(-self.clusters // cols)
        grid = np.zeros((rows * cols, 3), np.uint8)
        grid[: self.clusters] = self.rgb()
        swatch = grid.reshape(rows, cols, 3).repeat(16, axis=0).repeat(16, axis=1)
        Image.fromarray(swatch).save(out / "palette.png")
        return out

    @classmethod
    def load(cls, path: str | Path) -> Palette:
        """A palette folder (palette.npy [+ palette.json] [+ palette.lut, memory-mapped]) or an .npy file
        such as openai's ``kmeans_centers.npy`` (float32 (512, 3) in [-1, 1]). TableError naming the
        file for a palette.lut of another palette."""
        path = Path(path)
        npy = path / "palette.npy" if path.is_dir() else path
        if not npy.is_file():
            raise FileNotFoundError(f"palette: no palette.npy at {path}")
        try:
            centers = np.load(npy, allow_pickle=False)
        except ValueError as exc:
            raise ValueError(f"palette: {npy} is not a plain .npy array ({exc})") from exc
        info: dict[str, Any] = {}
        if path.is_dir() and (path / "palette.json").is_file():
            info = json.loads((path / "palette.json").read_text())
        try:
            palette = cls(centers, info)
        except ValueError as exc:
            raise ValueError(f"palette: {npy}: {exc}") from exc
        if path.is_dir() and (path / TABLE_NAME).is_file():
            palette.use_table(path / TABLE_NAME)
        return palette
