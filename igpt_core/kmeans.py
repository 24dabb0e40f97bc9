"""Weighted k-means over distinct colours: exact nearest-centre search, k-means++ and Lloyd.

The palette's histogram fit runs here: points are distinct colours in [-1, 1] weighted by their
pixel counts. Nearest centres come from a k-d tree over the K centres (scipy, a dependency of
scikit-learn) with float64 distances, so every assignment is the true nearest centre (ties aside)
and the same input gives the same result bit for bit.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# Relative widening of the Hamerly bounds: k-d tree distances are float64 square roots, exact to a
# few ulps, so 1e-9 keeps every bound valid.
_SLACK = 1e-9


def assign(x: np.ndarray, centers: np.ndarray, second: bool = False) -> tuple[np.ndarray, ...]:
    """Nearest centre (int64) and its squared distance (float64) per row of (N, 3) points, plus the
    squared distance to the second-nearest centre when `second`; exact in float64."""
    from scipy.spatial import cKDTree

    tree = cKDTree(np.asarray(centers, np.float64))
    x64 = np.asarray(x, np.float64)
    if second:
        dist, index = tree.query(x64, k=2)
        return index[:, 0].astype(np.int64), dist[:, 0] ** 2, dist[:, 1] ** 2
    dist, index = tree.query(x64, k=1)
    return np.asarray(index, np.int64), np.asarray(dist) ** 2


def kmeans_plus_plus(x: np.ndarray, w: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Greedy k-means++ seeding weighted by counts (2 + log k candidates per centre, keep the one
    that lowers the weighted potential most). x float64 (P, 3), P >= k distinct points."""
    trials = 2 + int(np.log(k))
    x2 = np.sum(x * x, axis=1)
    centers = np.empty((k, 3))
    first = int(np.searchsorted(np.cumsum(w), rng.random() * w.sum()))
    centers[0] = x[min(first, len(x) - 1)]
    closest = np.maximum(x2 - 2 * x @ centers[0] + centers[0] @ centers[0], 0)
    for i in range(1, k):
        potential = np.cumsum(w * closest)
        picks = np.searchsorted(potential, rng.random(trials) * potential[-1])
        picks = np.minimum(picks, len(x) - 1)
        cand = x[picks]
        d = np.maximum(x2[None, :] - 2 * cand @ x.T + np.sum(cand * cand, axis=1)[:, None], 0)
        d = np.minimum(d, closest[None, :])
        best = int(np.argmin(d @ w))
        centers[i] = cand[best]
        closest = d[best]
    return centers


def _nearest(x: np.ndarray, centers: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (int64 (N, n)) and float64 distances (not squared) of the n nearest centres."""
    from scipy.spatial import cKDTree

    dist, index = cKDTree(centers).query(x, k=n)
    return index.reshape(len(x), n).astype(np.int64), dist.reshape(len(x), n)


def lloyd(
    x: np.ndarray, w: np.ndarray, centers: np.ndarray, max_iter: int, tol: float, bar: Any = None
) -> tuple[np.ndarray, np.ndarray, int, bool]:
    """Weighted Lloyd that re-assigns a point only when its centre may no longer be its nearest.

    Each point tracks its `m` nearest centres at its last search (m = 3) with an upper bound on
    the distance to its own centre, a lower bound on the distance to the other tracked ones and a
    lower bound on the distance to every untracked centre (Hamerly's bounds, split in two). When
    the bounds fail, the distances to the tracked centres are taken exactly; only when the
    nearest of them may be beaten by an untracked centre is the point searched again in a k-d
    tree. Every assignment is therefore the exact nearest centre (float64).

    Stops when an iteration lowers the inertia by at most `tol` of it. Returns (centers, assign,
    iterations, converged); `assign` is the nearest centre of every point under the returned
    centres. x (U, 3), w float64 (U,), centers float64 (K, 3)."""
    k = len(centers)
    m = min(3, k - 1)
    x64 = np.ascontiguousarray(x, np.float64)
    centers = np.asarray(centers, np.float64)
    sxx = float(w @ np.einsum("ij,ij->i", x64, x64))
    wx = w[:, None] * x64
    index, dist = _nearest(x64, centers, m + 1)
    near = index[:, :m].copy()
    assigned = index[:, 0].copy()
    upper = dist[:, 0] * (1 + _SLACK)
    lower = (dist[:, 1] if m > 1 else dist[:, m]) * (1 - _SLACK)  # other tracked centres
    rest = dist[:, m] * (1 - _SLACK)  # every untracked centre
    del index, dist
    previous = np.inf
    converged = False
    iteration = 0
    for iteration in range(1, max_iter + 1):  # noqa: B007 (returned after the loop)
        counts = np.bincount(assigned, weights=w, minlength=k)
        sums = np.stack([np.bincount(assigned, weights=wx[:, j], minlength=k) for j in range(3)], axis=1)
        inertia = sxx - 2 * float(np.sum(centers * sums)) + float(counts @ np.sum(centers * centers, axis=1))
        new = centers.copy()
        filled = counts > 0
        new[filled] = sums[filled] / counts[filled, None]
        empty = np.flatnonzero(~filled)
        if empty.size:
            # Re-seed each empty centre at a distinct point with the largest weighted error.
            worst = np.argsort(-(w * upper * upper), kind="stable")[: empty.size]
            new[empty[: worst.size]] = x64[worst]
        shift = np.sqrt(np.sum((new - centers) ** 2, axis=1))
        centers = new
        if bar is not None:
            bar.update(1)
            bar.set_postfix(inertia=f"{inertia:.6g}")
        converged = empty.size == 0 and (shift.max() == 0 or previous - inertia <= tol * inertia)
        previous = inertia
        # Bounds after the move: each distance changes by at most its centre's shift.
        upper += shift[assigned]
        # Largest shift among the tracked centres (columns: a reduction over a length-m axis is slow).
        moved = shift[near[:, 0]]
        for j in range(1, m):
            np.maximum(moved, shift[near[:, j]], out=moved)
        lower -= moved
        rest -= shift.max()
        # A point within half the distance from its centre to the centre's nearest other centre
        # keeps it (Elkan's lemma).
        _, spacing = _nearest(centers, centers, 2)  # column 0 is the centre itself (distance 0)
        half = (0.5 * (1 - _SLACK)) * spacing[:, 1]
        maybe = np.flatnonzero(upper > np.maximum(half[assigned], np.minimum(lower, rest)))
        if maybe.size == 0:
            if converged:
                break
            continue
        # Exact distances to the tracked centres settle the points whose nearest tracked centre
        # is no farther than the bound on the untracked ones.
        tracked = near[maybe]
        points = x64[maybe]
        d = np.empty(tracked.shape)
        for j in range(m):
            diff = points - centers[tracked[:, j]]
            d[:, j] = np.einsum("ij,ij->i", diff, diff)
        np.sqrt(d, out=d)
        pick = np.argmin(d, axis=1)
        rows = np.arange(len(maybe))
        best = d[rows, pick]
        d[rows, pick] = np.inf
        runner = d.min(axis=1) if m > 1 else np.full(len(maybe), np.inf)
        settled = best * (1 + _SLACK) <= rest[maybe]
        done = maybe[settled]
        assigned[done] = tracked[rows[settled], pick[settled]]
        upper[done] = best[settled] * (1 + _SLACK)
        lower[done] = runner[settled] * (1 - _SLACK)
        again = maybe[~settled]
        if again.size:
            index, dist = _nearest(x64[again], centers, m + 1)
            near[again] = index[:, :m]
            assigned[again] = index[:, 0]
            upper[again] = dist[:, 0] * (1 + _SLACK)
            lower[again] = (dist[:, 1] if m > 1 else dist[:, m]) * (1 - _SLACK)
            rest[again] = dist[:, m] * (1 - _SLACK)
        if converged:
            break
    return centers, assigned, iteration, converged


def _cell_means(
    rgb: np.ndarray, x: np.ndarray, w: np.ndarray, bits: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """Weighted means and total weights of the occupied cells of a 2**(3 bits) colour grid."""
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
    return cx / cw[:, None], cw, n


def fit_weighted(
    rgb: np.ndarray, w: np.ndarray, k: int, seed: int, max_iter: int, tol: float, bar: Any = None
) -> tuple[np.ndarray, np.ndarray, int, bool]:
    """k-means of distinct uint8 colours `rgb` (U, 3), U > k, weighted by `w`, in [-1, 1] units.

    Coarse to fine: k-means++ and a short Lloyd on the weighted means of a coarse colour grid's
    cells (>= 8k of them), Lloyd on the cell means of 2**18- and 2**21-cell grids, then Lloyd over
    the exact distinct colours to `tol`, so the result is a Lloyd iterate of the full data. Each
    finer stage starts near its fixed point, so the costly full-data stage needs few iterations.
    Returns lloyd's (centers, assign, iterations, converged) of the last stage."""
    rng = np.random.default_rng(seed)
    x = (rgb.astype(np.float64) / 127.5) - 1.0
    x = x.astype(np.float32).astype(np.float64)  # the float32 values `normalise` gives
    bits = 5
    while True:
        cx, cw, n = _cell_means(rgb, x, w, bits)
        if n >= 8 * k or bits == 8:
            break
        bits += 1
    if n > k and bits < 8:
        start = kmeans_plus_plus(cx, cw, k, rng)
        start, _, _, _ = lloyd(cx, cw, start, max_iter=10, tol=1e-3)
        for finer, stage_tol in ((6, 1e-3), (7, tol)):
            if finer <= bits:
                continue
            fine_x, fine_w, fine_n = _cell_means(rgb, x, w, finer)
            if fine_n < 0.8 * len(x):  # worth a stage only when it merges colours
                start, _, _, _ = lloyd(fine_x, fine_w, start, max_iter=max_iter, tol=stage_tol)
    else:
        start = kmeans_plus_plus(x, w, k, rng)
    return lloyd(x, w, start, max_iter, tol, bar)
