"""Fitting a palette: k-means over the pixels of a source, distributed over its parts with Ray.

Two methods:

- ``histogram`` (default): a colour histogram is a sufficient statistic for k-means over RGB pixels,
  so Ray tasks count 24-bit colour codes per part, the driver merges the counts, and weighted Lloyd
  (`kmeans.fit_weighted`) runs over the distinct colours (at most 2**24, however many pixels there are).
- ``minibatch``: Ray actors hold the pixels of their parts; each step every actor assigns a random
  mini-batch of its pixels and returns per-centre sums and counts, and the driver applies the
  mini-batch update.

Either way the result is a `palette.Palette` whose centres are ordered by use (token 0 the most used
colour) and whose info records what the fit measured.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from igpt_core.config import DEFAULT_CLUSTERS, DEFAULT_RESOLUTION, PaletteConfig
from igpt_core.distributed import ensure_ray, map_parts
from igpt_core.kmeans import assign as _assign
from igpt_core.kmeans import fit_weighted
from igpt_core.kmeans import kmeans_plus_plus as _kmeans_plus_plus
from igpt_core.palette import N_COLOURS, Palette, codes_to_rgb, colour_codes, normalise
from igpt_core.sources import Sample, open_source, read_part

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
    import ray  # heavy: ray

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
