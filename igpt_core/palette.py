"""The colour palette: k-means over RGB pixels, nearest-colour tokens, save/load.

Two fitting methods, both distributed over the parts of a source with Ray:

- ``histogram`` (default): a colour histogram is a sufficient statistic for k-means over RGB pixels,
  so Ray tasks count 24-bit colour codes per part, the driver merges the counts, and weighted Lloyd
  runs over the distinct colours (at most 2**24, however many pixels there are).
- ``minibatch``: Ray actors hold the pixels of their parts; each step every actor assigns a random
  mini-batch of its pixels and returns per-centre sums and counts, and the driver applies the
  mini-batch update.

Quantization gives the tokens of transformers' ``ImageGPTImageProcessor`` arithmetic (float32
squared distances ``|a|^2 - 2 a.c + |c|^2``, first argmin) once per distinct colour: a k-d tree finds
the exact nearest centre, and the near-ties where float32 rounding could choose otherwise get the
reference arithmetic itself. Answers are cached in a lazily filled 2**24 lookup table, so tokens are
identical to the reference and repeated colours cost one gather.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from igpt_core.config import DEFAULT_CLUSTERS, DEFAULT_RESOLUTION, PaletteConfig
from igpt_core.kmeans import assign as _assign
from igpt_core.kmeans import fit_weighted
from igpt_core.kmeans import kmeans_plus_plus as _kmeans_plus_plus

N_COLOURS = 1 << 24
_UNFILLED = np.uint16(0xFFFF)  # never a token: clusters <= 65535, so tokens <= 65534
_CHUNK = 32768  # rows per distance block: 32768 x 512 float32 = 64 MiB


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


def _reference_levels() -> np.ndarray:
    """The 256 channel values exactly as transformers computes them: float32(u * (1/255)), then
    (v - 0.5) / 0.5 in float32 (its rescale upcasts to float64 before the downcast)."""
    v = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
    half = np.array([0.5], dtype=np.float32)
    return (v - half) / half


def _reference_pixels(codes: np.ndarray) -> np.ndarray:
    """float32 (N, 3) pixels of uint32 colour codes with the reference's channel values."""
    levels = _reference_levels()
    return np.stack([levels[codes & 255], levels[(codes >> 8) & 255], levels[codes >> 16]], axis=1)


def _reference_nearest(codes: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Token of each colour code with transformers' arithmetic (float32, first argmin), in blocks.

    Each output row depends only on its own colour: the distance block is computed row-wise by the
    same numpy calls the reference makes, so splitting into blocks does not change any result.
    """
    clusters_t = centers.T  # (3, K) as the reference transposes its clusters
    c2 = np.sum(np.square(clusters_t), axis=0)
    out = np.empty(codes.size, np.uint16)
    for start in range(0, codes.size, _CHUNK):
        block = codes[start : start + _CHUNK]
        a = _reference_pixels(block)
        a2 = np.sum(np.square(a), axis=1)
        d = a2[:, None] - 2 * np.matmul(a, clusters_t) + c2[None, :]
        out[start : start + block.size] = np.argmin(d, axis=1)
    return out


# Bound on the error of the reference's float32 squared distance |a|^2 - 2 a.c + |c|^2 for pixels
# and centres in [-1, 1]: terms of magnitude <= 12 and about ten roundings of 2**-24 relative error
# each give < 4e-6; 1e-5 leaves a margin.
_REFERENCE_ERROR = 1e-5


def _nearest_tokens(codes: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """The tokens `_reference_nearest` gives, found faster for many colours.

    The exact (float64) nearest and second-nearest centres come from a k-d tree. Where the second
    is farther by more than twice the bound on the reference's float32 error, the reference's
    argmin can only be the nearest; the near-ties left (about 0.2% of CIFAR colours) get the
    reference arithmetic itself, so every token is the reference's.
    """
    if codes.size < 4096 or len(centers) < 2:
        return _reference_nearest(codes, centers)
    nearest, first, second = _assign(_reference_pixels(codes), centers, second=True)
    out = nearest.astype(np.uint16)
    close = np.flatnonzero(second - first <= 2 * _REFERENCE_ERROR)
    if close.size:
        out[close] = _reference_nearest(codes[close], centers)
    return out


@dataclass(frozen=True, eq=False)
class Palette:
    """K colours in [-1, 1] (openai's ``kmeans_centers.npy`` layout) and the nearest-colour mapping."""

    centers: np.ndarray
    """float32 (K, 3) in [-1, 1]; row k is token k."""
    info: Mapping[str, Any] = field(default_factory=dict)
    """What the fit measured (pixels, unique colours, inertia, ...); written into palette.json."""
    _lut: np.ndarray | None = field(default=None, init=False, repr=False)
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

    # The lookup table (32 MiB once filled) and the lock stay behind when a palette is pickled to a
    # Ray worker; the worker fills its own table.
    def __getstate__(self) -> dict[str, Any]:
        return {"centers": self.centers, "info": dict(self.info)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        object.__setattr__(self, "centers", state["centers"])
        object.__setattr__(self, "info", state["info"])
        object.__setattr__(self, "_lut", None)
        object.__setattr__(self, "_lock", threading.Lock())

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
        """uint16 token of each uint32 colour code; computes (and caches) only colours not seen yet."""
        with self._lock:
            lut = self._lut
            if lut is None:
                lut = np.full(N_COLOURS, _UNFILLED, np.uint16)
                object.__setattr__(self, "_lut", lut)
            tokens = np.take(lut, codes)
            missing = tokens == _UNFILLED
            if missing.any():
                new = np.unique(codes[missing])
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
        return self.tokens_of_codes(colour_codes(images)).reshape(n, -1)

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

    def save(self, out_dir: str | Path, meta: Mapping[str, Any] | None = None) -> Path:
        """Writes palette.npy, palette.json (this palette's info, then `meta`) and palette.png."""
        from PIL import Image

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        np.save(out / "palette.npy", self.centers, allow_pickle=False)
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
        """A palette folder (palette.npy [+ palette.json]) or an .npy file such as openai's
        ``kmeans_centers.npy`` (float32 (512, 3) in [-1, 1])."""
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
            return cls(centers, info)
        except ValueError as exc:
            raise ValueError(f"palette: {npy}: {exc}") from exc


# --------------------------------------------------------------------------------------------------
# Colour statistics per part (run in Ray tasks and actors)


@dataclass(frozen=True)
class _Counts:
    """Sparse colour histogram of one part: distinct codes (ascending) and their pixel counts."""

    codes: np.ndarray  # uint32
    counts: np.ndarray  # int64
    images: int
    rejects: int


def _count_codes(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct codes (ascending uint32) and their int64 counts."""
    if len(codes) < (1 << 22):  # a sort is cheaper than touching a 2**24-bin histogram
        distinct, counts = np.unique(codes, return_counts=True)
        return distinct.astype(np.uint32), counts.astype(np.int64)
    hist = np.bincount(codes, minlength=N_COLOURS)
    distinct = np.flatnonzero(hist)
    return distinct.astype(np.uint32), hist[distinct].astype(np.int64)


def _add_counts(pairs: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Sum of sparse histograms, as one sparse histogram (exact integer counts)."""
    if not pairs:
        return np.zeros(0, np.uint32), np.zeros(0, np.int64)
    if len(pairs) == 1:
        return pairs[0]
    if sum(len(c) for c, _ in pairs) < (1 << 22):
        distinct, inverse = np.unique(np.concatenate([c for c, _ in pairs]), return_inverse=True)
        total = np.zeros(len(distinct), np.int64)
        np.add.at(total, inverse, np.concatenate([n for _, n in pairs]))
        return distinct.astype(np.uint32), total
    hist = np.zeros(N_COLOURS, np.int64)
    for codes, counts in pairs:
        hist[codes] += counts  # codes are distinct within one histogram
    distinct = np.flatnonzero(hist)
    return distinct.astype(np.uint32), hist[distinct]


def _sparse_histogram(code_batches: Iterable[np.ndarray], images: int, rejects: int) -> _Counts:
    codes, counts = _add_counts([_count_codes(batch) for batch in code_batches])
    return _Counts(codes, counts, images, rejects)


def _read_images(item: Any, resolution: int, batch: int = 4096) -> Iterable[tuple[np.ndarray, int]]:
    """(uint8 (n, R, R, 3) batch, rejects in it) of a part: an image array or a sources.SourcePart."""
    if isinstance(item, np.ndarray):
        for start in range(0, len(item), batch):
            yield item[start : start + batch], 0
        return
    from igpt_core.sources import Sample, read_part

    images: list[np.ndarray] = []
    rejects = 0
    for record in read_part(item, resolution):
        if isinstance(record, Sample):
            images.append(record.image)
        else:
            rejects += 1
        if len(images) == batch:
            yield np.stack(images), rejects
            images, rejects = [], 0
    if images or rejects:
        yield (np.stack(images) if images else np.zeros((0, resolution, resolution, 3), np.uint8)), rejects


def _part_counts(item: Any, resolution: int) -> _Counts:
    totals = {"images": 0, "rejects": 0}

    def batches() -> Iterable[np.ndarray]:
        for images, rejects in _read_images(item, resolution):
            totals["images"] += len(images)
            totals["rejects"] += rejects
            yield colour_codes(images)

    counts = _sparse_histogram(batches(), 0, 0)
    return _Counts(counts.codes, counts.counts, totals["images"], totals["rejects"])


class _PixelShard:
    """Ray actor holding the pixels of some parts, for mini-batch k-means."""

    def __init__(self, items: list[Any], resolution: int, seed: int, index: int) -> None:
        batches, self.images, self.rejects = [], 0, 0
        for item in items:
            for images, rejects in _read_images(item, resolution):
                batches.append(images.reshape(-1, 3))
                self.images += len(images)
                self.rejects += rejects
        self.pixels = np.concatenate(batches) if batches else np.zeros((0, 3), np.uint8)
        self.rng = np.random.default_rng([seed, index])

    def size(self) -> int:
        return len(self.pixels)

    def counts(self) -> _Counts:
        return _sparse_histogram([colour_codes(self.pixels)], self.images, self.rejects)

    def step(self, centers: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, float, np.ndarray]:
        """Per-centre pixel counts and sums of a random mini-batch of n pixels, its inertia, and
        its 8 worst-fitted pixels (candidates to re-seed empty centres)."""
        k = len(centers)
        if n == 0 or len(self.pixels) == 0:
            return np.zeros(k), np.zeros((k, 3)), 0.0, np.zeros((0, 3), np.float32)
        x = normalise(self.pixels[self.rng.integers(0, len(self.pixels), n)])
        assign, dist = _assign(x, centers.astype(np.float32))
        counts = np.bincount(assign, minlength=k).astype(np.float64)
        sums = np.stack([np.bincount(assign, weights=x[:, j], minlength=k) for j in range(3)], axis=1)
        worst = x[np.argsort(-dist, kind="stable")[:8]]
        return counts, sums, float(dist.astype(np.float64).sum()), worst


# --------------------------------------------------------------------------------------------------
# Weighted k-means over distinct colours


def _fit_distinct(
    codes: np.ndarray, counts: np.ndarray, k: int, seed: int, max_iter: int, tol: float, progress: bool
) -> tuple[np.ndarray, np.ndarray, dict[str, Any], np.ndarray | None]:
    """k-means centres (float64 (K, 3)) over distinct colours weighted by their pixel counts, the
    pixels each centre takes, and the nearest centre of each colour (None when every colour is a
    centre)."""
    from tqdm.auto import tqdm

    w = counts.astype(np.float64)
    if len(codes) <= k:
        x = normalise(codes_to_rgb(codes))
        # No more colours than centres: every colour is a centre (inertia 0); the spare centres
        # repeat the most frequent colour, so they are never chosen (argmin takes the first).
        order = np.argsort(-w, kind="stable")
        centers = np.repeat(x[order[:1]].astype(np.float64), k, axis=0)
        centers[: len(order)] = x[order]
        usage: np.ndarray = np.zeros(k)
        usage[: len(order)] = w[order]
        return centers, usage, {"iterations": 0, "converged": True}, None
    with tqdm(total=max_iter, desc="k-means (Lloyd)", disable=not progress, unit="it") as bar:
        centers, assign, iterations, converged = fit_weighted(
            codes_to_rgb(codes), w, k, seed, max_iter, tol, bar
        )
    usage_of_fit: np.ndarray = np.bincount(assign, weights=w, minlength=k)
    return centers, usage_of_fit, {"iterations": iterations, "converged": converged}, assign


def _inertia(codes: np.ndarray, counts: np.ndarray, centers: np.ndarray, nearest: np.ndarray) -> float:
    """Sum over all pixels of the squared distance (float64) to the centre `nearest` names."""
    x = normalise(codes_to_rgb(codes)).astype(np.float64)
    diff = x - centers.astype(np.float64)[nearest]
    return float(np.einsum("ij,ij->i", diff, diff) @ counts.astype(np.float64))


def _exact_inertia(codes: np.ndarray, counts: np.ndarray, centers: np.ndarray) -> float:
    """Sum over all pixels of the squared distance (x / 127.5 - 1 units, float64) to the nearest centre.

    The nearest centre comes from the exact float64 search (`kmeans.assign`); it differs from the
    token the float32 reference arithmetic picks only where two centres are equidistant to ~1e-7,
    which leaves the sum unchanged to that precision."""
    x = normalise(codes_to_rgb(codes))
    nearest, _ = _assign(x, centers.astype(np.float64))
    err = np.sum((x.astype(np.float64) - centers.astype(np.float64)[nearest]) ** 2, axis=1)
    return float(err @ counts.astype(np.float64))


def _usage(centers: np.ndarray, codes: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Pixels each centre takes (used only to order the centres)."""
    assign, _ = _assign(normalise(codes_to_rgb(codes)), centers)
    return np.bincount(assign, weights=counts.astype(np.float64), minlength=len(centers))


# --------------------------------------------------------------------------------------------------
# Fitting


def _merge(parts: list[_Counts]) -> tuple[np.ndarray, np.ndarray, int, int]:
    codes, counts = _add_counts([(p.codes, p.counts) for p in parts])
    return codes, counts, sum(p.images for p in parts), sum(p.rejects for p in parts)


def _minibatch_fit(
    items: list[Any], cfg: PaletteConfig, progress: bool
) -> tuple[np.ndarray, list[_Counts], dict[str, Any]]:
    import ray
    from tqdm.auto import tqdm

    workers = max(1, min(len(items), int(ray.cluster_resources().get("CPU", 1))))
    groups = [items[i::workers] for i in range(workers)]
    actor_cls: Any = ray.remote(num_cpus=1, max_restarts=3, max_task_retries=3)(_PixelShard)
    actors: list[Any] = [
        actor_cls.remote(group, cfg.resolution, cfg.seed, i) for i, group in enumerate(groups)
    ]
    try:
        sizes = np.array(ray.get([a.size.remote() for a in actors]), np.int64)
        counts = ray.get([a.counts.remote() for a in actors])
        if sizes.sum() == 0:
            raise ValueError("source: no valid images to fit a palette on")
        codes, weights, _, _ = _merge(counts)
        rng = np.random.default_rng(cfg.seed)
        k = cfg.clusters
        if len(codes) <= k:
            centers, _, _, _ = _fit_distinct(codes, weights, k, cfg.seed, cfg.max_iter, cfg.tol, False)
            return centers, counts, {"iterations": 0, "converged": True, "workers": workers}
        # Seed from a weighted sample of the data's colours (as sklearn seeds from init_size pixels).
        sample = max(3 * cfg.batch_size, 10 * k)
        picks = np.searchsorted(np.cumsum(weights), rng.random(sample) * weights.sum())
        seed_codes, seed_counts = np.unique(codes[np.minimum(picks, len(codes) - 1)], return_counts=True)
        if len(seed_codes) <= k:
            seed_codes, seed_counts = codes, weights
        centers = _kmeans_plus_plus(
            normalise(codes_to_rgb(seed_codes)).astype(np.float64), seed_counts.astype(np.float64), k, rng
        )
        share = np.floor(cfg.batch_size * sizes / sizes.sum()).astype(np.int64)
        share[np.argmax(sizes)] += cfg.batch_size - share.sum()
        seen = np.zeros(k)
        ewa, best, stale, steps = None, np.inf, 0, 0
        with tqdm(total=cfg.max_iter, desc="k-means (mini-batch)", disable=not progress, unit="step") as bar:
            for steps in range(1, cfg.max_iter + 1):
                ref = ray.put(centers.astype(np.float32))
                results = ray.get([a.step.remote(ref, int(n)) for a, n in zip(actors, share, strict=True)])
                batch_counts = sum(r[0] for r in results)
                batch_sums = sum(r[1] for r in results)
                batch_inertia = sum(r[2] for r in results) / cfg.batch_size
                # Per-centre learning rate 1 / (pixels seen so far): the running mean of its pixels.
                seen += batch_counts
                hit = batch_counts > 0
                centers[hit] += (batch_sums[hit] - batch_counts[hit, None] * centers[hit]) / seen[hit, None]
                empty = np.flatnonzero(seen == 0)
                if empty.size and steps >= 2:
                    worst = np.concatenate([r[3] for r in results])
                    worst = worst[: empty.size]
                    centers[empty[: len(worst)]] = worst
                ewa = batch_inertia if ewa is None else 0.9 * ewa + 0.1 * batch_inertia
                bar.update(1)
                bar.set_postfix(inertia=f"{ewa:.5g}")
                # Stop after 10 steps without a relative improvement of tol (sklearn's rule).
                if ewa < best * (1 - cfg.tol):
                    best, stale = ewa, 0
                else:
                    stale += 1
                    if stale >= 10:
                        break
        return centers, counts, {"iterations": steps, "converged": stale >= 10, "workers": workers}
    finally:
        for actor in actors:
            ray.kill(actor)


def _open(source: Any, resolution: int) -> tuple[list[Any], str, str]:
    """(items to read, source digest, description) of a source spec or a uint8 image array."""
    from igpt_core.sources import open_source

    opened = open_source(source)  # validates arrays too (uint8, shape)
    if (
        isinstance(source, np.ndarray)
        and source.ndim == 4
        and source.shape[1:] == (resolution, resolution, 3)
    ):
        # Already at resolution: count the pixels as they are, in slices (one per mini-batch actor).
        step = -(-len(source) // 8)
        return [source[i : i + step] for i in range(0, len(source), step)], opened.digest(), str(opened.spec)
    return list(opened.parts()), opened.digest(), str(opened.spec)


def fit_palette(
    source: Any,
    clusters: int = DEFAULT_CLUSTERS,
    seed: int = 0,
    method: str = "histogram",
    resolution: int = DEFAULT_RESOLUTION,
    *,
    ray_address: str | None = None,
    progress: bool = True,
    config: PaletteConfig | None = None,
) -> Palette:
    """Fits a K-colour palette by k-means over the pixels of `source` resized to resolution².

    `source` is a source spec (see sources.open_source) or a uint8 image array (N, H, W, 3); `config`,
    when given, supplies every setting instead of the keyword arguments. The same source and seed
    give the same centres bit for bit. Parts of a spec source are read by Ray tasks (histogram) or
    actors (minibatch); an array already at resolution² is counted in this process for the histogram
    method (shipping it to Ray would cost more than counting it).
    """
    from igpt_core.distributed import ensure_ray, map_parts

    cfg = config or PaletteConfig(clusters=clusters, seed=seed, method=method, resolution=resolution)  # type: ignore[arg-type]
    began = time.perf_counter()
    items, source_digest, spec = _open(source, cfg.resolution)
    local = all(isinstance(item, np.ndarray) for item in items)
    if cfg.method == "histogram":
        if local:
            # One histogram of all the slices: a single count beats counting and merging slices.
            codes, weights = _count_codes(np.concatenate([colour_codes(item) for item in items]))
            parts = [_Counts(codes, weights, sum(len(item) for item in items), 0)]
        else:
            ensure_ray(ray_address)
            parts = map_parts(
                _part_counts_remote,
                [(item, cfg.resolution) for item in items],
                desc="colour histogram",
                progress=progress,
            )
        codes, weights, images, rejects = _merge(parts)
        if len(codes) == 0:
            raise ValueError(f"source: {spec} has no valid images to fit a palette on")
        centers, usage, stats, nearest = _fit_distinct(
            codes, weights, cfg.clusters, cfg.seed, cfg.max_iter, cfg.tol, progress
        )
    else:
        ensure_ray(ray_address)
        centers, parts, stats = _minibatch_fit(items, cfg, progress)
        codes, weights, images, rejects = _merge(parts)
        usage = _usage(centers, codes, weights)
        nearest = None
    # Canonical order: token 0 is the most used colour (stable on ties).
    order = np.argsort(-usage, kind="stable")
    palette = Palette(np.clip(centers, -1.0, 1.0)[order])
    pixels = int(weights.sum())
    if nearest is None:
        inertia = _exact_inertia(codes, weights, palette.centers)
    else:
        # The fit's final assignment is exact for its float64 centres; rounding them to float32
        # moves a distance by ~1e-8, too little to matter to the sum.
        rank = np.empty(len(order), np.int64)
        rank[order] = np.arange(len(order))
        inertia = _inertia(codes, weights, palette.centers, rank[nearest])
    info = {
        "clusters": cfg.clusters,
        "seed": cfg.seed,
        "method": cfg.method,
        "resolution": cfg.resolution,
        "max_iter": cfg.max_iter,
        "tol": cfg.tol,
        "batch_size": cfg.batch_size,
        "images": images,
        "rejects": rejects,
        "pixels": pixels,
        "unique_colours": int(len(codes)),
        "inertia": inertia,
        "mse": inertia / pixels,
        "source": spec,
        "source_digest": source_digest,
        "seconds": round(time.perf_counter() - began, 3),
        **stats,
    }
    return Palette(palette.centers, info)


def _part_counts_remote(args: tuple[Any, int]) -> _Counts:
    return _part_counts(*args)
