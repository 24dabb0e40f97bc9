"""Weighted k-means over distinct colours: exact nearest-centre search, k-means++ and Lloyd.

The palette's histogram fit runs here: points are distinct colours in [-1, 1] weighted by their
pixel counts. Nearest centres come from a k-d tree over the K centres (scipy, a dependency of
scikit-learn) with float64 distances, so every assignment is the true nearest centre (ties aside)
and the same input gives the same result bit for bit, whatever the number of threads Lloyd uses.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Relative widening of the Hamerly bounds: k-d tree distances are float64 square roots, exact to a
# few ulps, so 1e-9 keeps every bound valid.
_SLACK = 1e-9
# Points per chunk of the Lloyd state: fixed, so sums (added chunk by chunk) do not depend on the
# number of threads.
_CHUNK = 1 << 16
# Coarse-to-fine stages of fit_weighted: (bits per channel of the colour grid, tolerance; None = the fit's).
_STAGES: tuple[tuple[int, float | None], ...] = ((6, 1e-3), (7, None))


def assign(x: np.ndarray, centers: np.ndarray, second: bool = False) -> tuple[np.ndarray, ...]:
    """Nearest centre (int64) and its squared distance (float64) per row of (N, 3) points, plus the
    squared distance to the second-nearest centre when `second`; exact in float64."""
    from scipy.spatial import cKDTree  # heavy: scipy.spatial (seconds to import)

    tree = cKDTree(np.asarray(centers, np.float64))
    x64 = np.asarray(x, np.float64)
    if second:
        dist, index = tree.query(x64, k=2, workers=-1)
        return index[:, 0].astype(np.int64), dist[:, 0] ** 2, dist[:, 1] ** 2
    dist, index = tree.query(x64, k=1, workers=-1)
    return np.asarray(index, np.int64), np.asarray(dist) ** 2


def kmeans_plus_plus(x: np.ndarray, w: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Greedy k-means++ seeding weighted by counts (2 + log k candidates per centre, keep the one
    that lowers the weighted potential most). x float64 (P, 3), P >= k distinct points."""
    trials = 2 + int(np.log(k))
    x2 = np.sum(x * x, axis=1)
    xt = np.ascontiguousarray(x.T)  # (3, P): the candidates' distances are one (trials, 3) @ (3, P)
    centers = np.empty((k, 3))
    first = int(np.searchsorted(np.cumsum(w), rng.random() * w.sum()))
    centers[0] = x[min(first, len(x) - 1)]
    closest = np.maximum(x2 - 2 * x @ centers[0] + centers[0] @ centers[0], 0)
    weighted = np.empty_like(closest)
    d = np.empty((trials, len(x)))
    for i in range(1, k):
        potential = np.cumsum(np.multiply(w, closest, out=weighted), out=weighted)
        picks = np.searchsorted(potential, rng.random(trials) * potential[-1])
        picks = np.minimum(picks, len(x) - 1)
        cand = x[picks]
        # d = min(|x - cand|^2, closest), in place: (trials, P) temporaries cost more than the math
        np.matmul(cand, xt, out=d)
        d *= -2
        d += x2
        d += np.sum(cand * cand, axis=1)[:, None]
        np.maximum(d, 0, out=d)
        np.minimum(d, closest, out=d)
        best = int(np.argmin(d @ w))
        centers[i] = cand[best]
        closest = d[best].copy()
    return centers


def process_cpus() -> int:
    """Threads for the per-chunk work: the CPUs this process may use (numpy and the k-d tree release
    the GIL in the array loops, so chunks run in parallel)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distance (float64) between the rows of two (n, 3) arrays."""
    diff = a - b
    return np.sqrt(np.einsum("ij,ij->i", diff, diff))


def _closest_tracked(x: np.ndarray, centers: np.ndarray, near: np.ndarray) -> tuple[np.ndarray, ...]:
    """Exact distance to the closest of each point's tracked centres `near` (n, m), its column
    (the first on ties), and the distance to the next closest (inf when m = 1). Column by column:
    numpy reductions along a length-m row are slow."""
    best = _distance(x, centers[near[:, 0]])
    pick = np.zeros(len(x), np.int64)
    runner = np.full(len(x), np.inf)
    for j in range(1, near.shape[1]):
        d = _distance(x, centers[near[:, j]])
        closer = d < best
        np.minimum(runner, np.where(closer, best, d), out=runner)
        np.copyto(best, d, where=closer)
        pick[closer] = j
    return best, pick, runner


@dataclass
class _Chunk:
    """One fixed slice of the points and its per-point state: the `m` centres tracked at its last
    search, the assigned (nearest) centre, an upper bound on the distance to it, a lower bound on
    the distance to the other tracked centres and one on the distance to every untracked centre."""

    x: np.ndarray  # float64 (n, 3)
    w: np.ndarray  # float64 (n,)
    # (group of each point, group points, their tracked centres, their bound on every other centre)
    # to start from instead of a full search, or None
    hint: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None
    wxt: np.ndarray = field(init=False)  # float64 (3, n): weight times each coordinate, rows contiguous
    sxx: float = field(init=False)  # weighted sum of squared norms
    near: np.ndarray = field(init=False)  # int64 (n, m)
    assigned: np.ndarray = field(init=False)  # int64 (n,)
    upper: np.ndarray = field(init=False)
    lower: np.ndarray = field(init=False)
    rest: np.ndarray = field(init=False)

    def search(self, tree: Any, m: int, rows: np.ndarray | slice = slice(None)) -> None:
        """Exact m+1 nearest centres of the points `rows` (k-d tree) and fresh bounds for them."""
        dist, index = tree.query(self.x[rows], k=m + 1)
        index = index.reshape(-1, m + 1)
        dist = dist.reshape(-1, m + 1)
        self.near[rows] = index[:, :m]
        self.assigned[rows] = index[:, 0]
        self.upper[rows] = dist[:, 0] * (1 + _SLACK)
        self.lower[rows] = (dist[:, 1] if m > 1 else dist[:, m]) * (1 - _SLACK)
        self.rest[rows] = dist[:, m] * (1 - _SLACK)

    def start(self, tree: Any, m: int) -> None:
        """Initial state: from the k-d tree, or from `hint`, which bounds each point from its group
        point's state (triangle inequality) and searches only the points that leaves open."""
        n = len(self.x)
        self.wxt = self.x.T * self.w
        self.sxx = float(np.einsum("ij,ij->", self.wxt, self.x.T))
        self.near = np.empty((n, m), np.int64)
        self.assigned = np.empty(n, np.int64)
        self.upper, self.lower, self.rest = np.empty(n), np.empty(n), np.empty(n)
        if self.hint is None:
            self.search(tree, m)
            return
        group, gx, gnear, grest = self.hint
        # Track the group point's centres; exact distances to them give the nearest and runner-up.
        near = gnear[group]
        best, pick, runner = _closest_tracked(self.x, tree.data, near)
        # Every other centre is at least grest from the group point, so at least
        # grest - |x - group point| from x (widened by 4 ulps' worth for the roundings in it, and by
        # an absolute 1e-12 for the difference of two near-equal distances).
        outside = (grest[group] - _distance(self.x, gx[group])) * (1 - 4 * _SLACK) - 1e-12
        self.near[:] = near
        self.assigned[:] = np.take_along_axis(near, pick[:, None], axis=1)[:, 0]
        self.upper[:] = best * (1 + _SLACK)
        self.lower[:] = runner * (1 - _SLACK) if m > 1 else outside
        self.rest[:] = outside
        unsure = np.flatnonzero(self.upper > self.rest)
        if unsure.size:
            self.search(tree, m, unsure)

    def stats(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Weight and weighted coordinate sum of the points assigned to each centre."""
        counts = np.bincount(self.assigned, weights=self.w, minlength=k)
        sums = np.stack([np.bincount(self.assigned, weights=row, minlength=k) for row in self.wxt], 1)
        return counts, sums

    def update(
        self, tree: Any, m: int, shift: np.ndarray, half: np.ndarray, movers: tuple[float, np.ndarray]
    ) -> None:
        """Move the bounds by the centres' shifts and re-assign the points they no longer settle.
        `half`: half the distance from each centre to its nearest other centre; `movers`: (the
        largest shift but those of the few centres that moved most, each centre's distance to the
        nearest of those few)."""
        centers = tree.data
        self.upper += shift[self.assigned]
        # Largest shift among the tracked centres (columns: a reduction over a length-m axis is slow).
        moved = shift[self.near[:, 0]]
        for j in range(1, m):
            np.maximum(moved, shift[self.near[:, j]], out=moved)
        self.lower -= moved
        # An untracked centre either is one of the few that moved most, at least `apart` from the
        # point's own centre and so at least apart - upper from the point, or it moved at most
        # `slow`. Both beat decaying by the largest shift when a few centres move far.
        slow, apart = movers
        bound = np.minimum(self.rest - slow, apart[self.assigned] - self.upper)
        self.rest -= shift.max()
        np.maximum(self.rest, bound, out=self.rest)
        # A point within half the distance from its centre to the centre's nearest other centre
        # keeps it (Elkan's lemma).
        maybe = np.flatnonzero(
            self.upper > np.maximum(half[self.assigned], np.minimum(self.lower, self.rest))
        )
        if maybe.size == 0:
            return
        # Exact distances to the tracked centres settle the points whose nearest tracked centre
        # is no farther than the bound on the untracked ones.
        tracked = self.near[maybe]
        best, pick, runner = _closest_tracked(self.x[maybe], centers, tracked)
        settled = best * (1 + _SLACK) <= self.rest[maybe]
        done = maybe[settled]
        self.assigned[done] = np.take_along_axis(tracked[settled], pick[settled, None], axis=1)[:, 0]
        self.upper[done] = best[settled] * (1 + _SLACK)
        self.lower[done] = runner[settled] * (1 - _SLACK)
        again = maybe[~settled]
        if again.size:
            self.search(tree, m, again)


def _movers(centers: np.ndarray, shift: np.ndarray, few: int = 16) -> tuple[float, np.ndarray]:
    """(largest shift outside the `few` centres that moved most, distance (float64, widened) from
    each centre to the nearest of those few other than itself)."""
    if len(centers) <= few + 1:
        return float(shift.max()), np.full(len(centers), -np.inf)
    order = np.argsort(-shift, kind="stable")
    fast, slow = order[:few], float(shift[order[few]])
    d = np.sqrt(np.sum((centers[:, None, :] - centers[None, fast, :]) ** 2, axis=2))
    d[fast, np.arange(few)] = np.inf  # a centre is not its own far mover
    return slow, d.min(axis=1) * (1 - _SLACK) - 1e-12


@dataclass(frozen=True)
class Groups:
    """Points gathered into groups (e.g. colour-grid cells) whose own Lloyd state is known: the
    group of each point, each group's point (its mean), the centres it tracks, and a lower bound
    on its distance to every other centre."""

    group: np.ndarray  # int64 (U,): row of `x` for each point
    x: np.ndarray  # float64 (G, 3)
    near: np.ndarray  # int64 (G, m)
    rest: np.ndarray  # float64 (G,)


@dataclass
class LloydResult:
    centers: np.ndarray  # float64 (K, 3)
    assign: np.ndarray  # int64 (U,): nearest centre of every point under `centers`
    iterations: int
    converged: bool
    _chunks: list[_Chunk] = field(repr=False)

    @functools.cached_property
    def state(self) -> Groups:
        """Each point's tracked centres and bound, valid for `centers` (each point its own group);
        gathered only when asked for, as it costs as much memory as the points."""
        return Groups(
            np.arange(len(self.assign)),
            np.concatenate([chunk.x for chunk in self._chunks]),
            np.concatenate([chunk.near for chunk in self._chunks]),
            np.concatenate([chunk.rest for chunk in self._chunks]),
        )


def lloyd(
    x: np.ndarray, w: np.ndarray, centers: np.ndarray, max_iter: int, tol: float, bar: Any = None
) -> tuple[np.ndarray, np.ndarray, int, bool]:
    """Weighted Lloyd over points x (U, 3) with weights w (U,) from centers (K, 3); see `run_lloyd`.
    Returns (centers, assign, iterations, converged)."""
    result = run_lloyd(x, w, centers, max_iter, tol, bar)
    return result.centers, result.assign, result.iterations, result.converged


def run_lloyd(
    x: np.ndarray,
    w: np.ndarray,
    centers: np.ndarray,
    max_iter: int,
    tol: float,
    bar: Any = None,
    groups: Groups | None = None,
) -> LloydResult:
    """Weighted Lloyd that re-assigns a point only when its centre may no longer be its nearest.

    Each point tracks its `m` nearest centres at its last search (m = 3) with an upper bound on
    the distance to its own centre, a lower bound on the distance to the other tracked ones and a
    lower bound on the distance to every untracked centre (Hamerly's bounds, split in two). When
    the bounds fail, the distances to the tracked centres are taken exactly; only when the
    nearest of them may be beaten by an untracked centre is the point searched again in a k-d
    tree. Every assignment is therefore the exact nearest centre (float64).

    With `groups` (the final state of a Lloyd over group means, under these same centres), the
    first assignment needs no full search: each point starts from its group's tracked centres and
    bound (triangle inequality), and only points those leave open are searched.

    The points are cut into fixed chunks that threads work on in parallel; per-centre sums add
    up the chunks in order, so the result does not depend on the number of threads.

    Stops when an iteration lowers the inertia by at most `tol` of it; the state returned is that
    of every point under the returned centres. x (U, 3), w float64 (U,), centers float64 (K, 3)."""
    from scipy.spatial import cKDTree  # heavy: scipy.spatial (seconds to import)

    k = len(centers)
    m = min(3, k - 1)
    x64 = np.ascontiguousarray(x, np.float64)
    w = np.asarray(w, np.float64)
    centers = np.asarray(centers, np.float64)
    starts = range(0, len(x64), _CHUNK)
    chunks = [
        _Chunk(
            x64[s : s + _CHUNK],
            w[s : s + _CHUNK],
            None if groups is None else (groups.group[s : s + _CHUNK], groups.x, groups.near, groups.rest),
        )
        for s in starts
    ]
    threads = min(len(chunks), process_cpus())
    pool = ThreadPoolExecutor(threads) if threads > 1 else None

    def each(fn: Any, *args: Any) -> list[Any]:
        """fn(chunk, *args) for every chunk, in chunk order."""
        if pool is None:
            return [fn(chunk, *args) for chunk in chunks]
        return list(pool.map(lambda chunk: fn(chunk, *args), chunks))

    try:
        tree = cKDTree(centers)
        each(_Chunk.start, tree, m)
        sxx = sum(chunk.sxx for chunk in chunks)
        previous = np.inf
        converged = False
        iteration = 0
        for iteration in range(1, max_iter + 1):  # noqa: B007 (returned after the loop)
            parts = each(_Chunk.stats, k)
            counts, sums = parts[0]
            for more_counts, more_sums in parts[1:]:
                counts = counts + more_counts
                sums = sums + more_sums
            inertia = (
                sxx - 2 * float(np.sum(centers * sums)) + float(counts @ np.sum(centers * centers, axis=1))
            )
            new = centers.copy()
            filled = counts > 0
            new[filled] = sums[filled] / counts[filled, None]
            empty = np.flatnonzero(~filled)
            if empty.size:
                # Re-seed each empty centre at a distinct point with the largest weighted error.
                upper = np.concatenate([chunk.upper for chunk in chunks])
                worst = np.argsort(-(w * upper * upper), kind="stable")[: empty.size]
                new[empty[: worst.size]] = x64[worst]
            shift = np.sqrt(np.sum((new - centers) ** 2, axis=1))
            centers = new
            if bar is not None:
                bar.update(1)
                bar.set_postfix(inertia=f"{inertia:.6g}")
            converged = empty.size == 0 and (shift.max() == 0 or previous - inertia <= tol * inertia)
            previous = inertia
            tree = cKDTree(centers)
            spacing, _ = tree.query(centers, k=2)  # column 0 is the centre itself (distance 0)
            half = (0.5 * (1 - _SLACK)) * spacing[:, 1]
            each(_Chunk.update, tree, m, shift, half, _movers(centers, shift))
            if converged:
                break
    finally:
        if pool is not None:
            pool.shutdown()
    assigned = np.concatenate([chunk.assigned for chunk in chunks])
    return LloydResult(centers, assigned, iteration, converged, chunks)


def _cell_means(
    rgb: np.ndarray, x: np.ndarray, w: np.ndarray, bits: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted means and total weights of the occupied cells of a 2**(3 bits) colour grid, and the
    cell (row of those) of each colour."""
    shift = 8 - bits
    cells = (
        (rgb[:, 0] >> shift).astype(np.int64) << (2 * bits)
        | (rgb[:, 1] >> shift).astype(np.int64) << bits
        | (rgb[:, 2] >> shift)
    )
    occupied = np.bincount(cells, minlength=1 << (3 * bits)) > 0
    index = np.cumsum(occupied) - 1  # cell -> row, ascending cell order (no sort)
    inverse = index[cells]
    n = int(occupied.sum())
    cw = np.bincount(inverse, weights=w, minlength=n)
    cx = np.stack([np.bincount(inverse, weights=w * x[:, j], minlength=n) for j in range(3)], 1)
    return cx / cw[:, None], cw, inverse


def fit_weighted(
    rgb: np.ndarray, w: np.ndarray, k: int, seed: int, max_iter: int, tol: float, bar: Any = None
) -> tuple[np.ndarray, np.ndarray, int, bool]:
    """k-means of distinct uint8 colours `rgb` (U, 3), U > k, weighted by `w`, in [-1, 1] units.

    Coarse to fine: k-means++ and a short Lloyd on the weighted means of a coarse colour grid's
    cells (>= 8k of them), Lloyd on the cell means of 2**18- and 2**21-cell grids, then Lloyd over
    the exact distinct colours to `tol`, so the result is a Lloyd iterate of the full data. Each
    finer stage starts near its fixed point, so the costly full-data stage needs few iterations,
    and from the coarser stage's state (grid cells nest), so it starts without a full search.
    Returns (centers, assign, iterations, converged) of the last stage."""
    rng = np.random.default_rng(seed)
    levels = ((np.arange(256) / 127.5) - 1.0).astype(np.float32).astype(np.float64)  # `normalise`'s values
    x = levels[rgb]
    bits = 5
    while True:
        cx, cw, cell = _cell_means(rgb, x, w, bits)
        if len(cx) >= 8 * k or bits == 8:
            break
        bits += 1
    if len(cx) <= k or bits == 8:
        start = kmeans_plus_plus(x, w, k, rng)
        return lloyd(x, w, start, max_iter, tol, bar)
    start = kmeans_plus_plus(cx, cw, k, rng)
    fit = run_lloyd(cx, cw, start, max_iter=10, tol=1e-3)
    for finer, stage_tol in _STAGES:
        if finer <= bits:
            continue
        fine_x, fine_w, fine_cell = _cell_means(rgb, x, w, finer)
        if len(fine_x) >= 0.8 * len(x):  # worth a stage only when it merges colours
            break
        parent = np.empty(len(fine_x), np.int64)
        parent[fine_cell] = cell  # grid cells nest: each fine cell lies in one coarse cell
        groups = dataclasses.replace(fit.state, group=parent)
        fit = run_lloyd(fine_x, fine_w, fit.centers, max_iter, stage_tol or tol, None, groups)
        cell = fine_cell
    final = run_lloyd(x, w, fit.centers, max_iter, tol, bar, dataclasses.replace(fit.state, group=cell))
    return final.centers, final.assign, final.iterations, final.converged
