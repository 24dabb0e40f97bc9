"""The reference's nearest-colour arithmetic, and the full 2**24 colour table computed exactly with it.

transformers' ``ImageGPTImageProcessor`` gives a pixel the first argmin of float32 squared distances
``|a|^2 - 2 a.c + |c|^2``. `reference_nearest` is that arithmetic. `build_table` gives the same token
for every one of the 2**24 colours at once: an octree over the colour cube keeps, per cell, only the
centres that can be within the float32 error margin of the nearest for some colour of the cell, fills
a cell as soon as one centre is left, and hands the single colours where two centres stay within the
margin (near-ties, ~0.2% of colours) to the reference arithmetic itself.

The table file (``palette.lut`` in a palette folder) is a 256-byte header (magic, then JSON naming the
palette digest, K and the layout) followed by 2**24 little-endian uint16 tokens, index
``r | g << 8 | b << 16``; never pickle. `read_table` memory-maps it after checking the header.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

N_COLOURS = 1 << 24
TABLE_NAME = "palette.lut"
_MAGIC = b"IGPTLUT\x01"
_HEADER = 256  # bytes: magic + JSON padded with spaces + newline
_UNFILLED = np.uint16(0xFFFF)  # never a token: clusters <= 65535, so tokens <= 65534
_CHUNK = 32768  # rows per reference distance block: 32768 x 512 float32 = 64 MiB
_CELLS = 1 << 20  # cells x candidates per octree block: bounds its float64 temporaries (~8 MiB each)
_PAD = 1e30  # coordinate of the padding centre: never near anything

# Bound on the error of the reference's float32 squared distance |a|^2 - 2 a.c + |c|^2 for pixels
# and centres in [-1, 1]: terms of magnitude <= 12 and about ten roundings of 2**-24 relative error
# each give < 4e-6; 1e-5 leaves a margin.
REFERENCE_ERROR = 1e-5
MARGIN = 2 * REFERENCE_ERROR
"""Exact squared distances further apart than this are ordered the same by the reference's float32."""


class TableError(ValueError):
    """A colour table file that is not one, or was built for another palette."""


def reference_levels() -> np.ndarray:
    """The 256 channel values exactly as transformers computes them: float32(u * (1/255)), then
    (v - 0.5) / 0.5 in float32 (its rescale upcasts to float64 before the downcast)."""
    v = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
    half = np.array([0.5], dtype=np.float32)
    return (v - half) / half


def reference_pixels(codes: np.ndarray) -> np.ndarray:
    """float32 (N, 3) pixels of uint32 colour codes with the reference's channel values."""
    levels = reference_levels()
    return np.stack([levels[codes & 255], levels[(codes >> 8) & 255], levels[codes >> 16]], axis=1)


def reference_nearest(codes: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Token of each colour code with transformers' arithmetic (float32, first argmin), in blocks.

    Each output row depends only on its own colour: the distance block is computed row-wise by the
    same numpy calls the reference makes, so splitting into blocks does not change any result.
    """
    clusters_t = centers.T  # (3, K) as the reference transposes its clusters
    c2 = np.sum(np.square(clusters_t), axis=0)
    out = np.empty(codes.size, np.uint16)
    for start in range(0, codes.size, _CHUNK):
        block = codes[start : start + _CHUNK]
        a = reference_pixels(block)
        a2 = np.sum(np.square(a), axis=1)
        d = a2[:, None] - 2 * np.matmul(a, clusters_t) + c2[None, :]
        out[start : start + block.size] = np.argmin(d, axis=1)
    return out


class _Octree:
    """One table build: per cell size, a grid of answers (unfilled where the cell is undecided)."""

    def __init__(self, centers: np.ndarray) -> None:
        self.k = len(centers)
        self.levels = reference_levels().astype(np.float64)
        self.coords = np.full((3, self.k + 1), _PAD)  # column k pads candidate lists
        self.coords[:, : self.k] = np.asarray(centers, np.float64).T
        self.grids = {1 << s: np.full((256 >> s) ** 3, _UNFILLED, np.uint16) for s in range(9)}
        self.ties: list[np.ndarray] = []

    def refine(self, cell: np.ndarray, cand: np.ndarray, size: int) -> None:
        """Decides cells (flat int64 ``r + g m + b m^2`` in the grid of `size`, m = 256 / size) whose
        possible tokens are among the rows of `cand` (int64 (n, M), padded with k)."""
        m = 256 // size
        near = np.zeros(cand.shape)  # squared distance from each candidate to the cell's box
        far = np.zeros(cand.shape)  # ... to its farthest corner
        for axis, index in enumerate((cell % m, (cell // m) % m, cell // (m * m))):
            x = self.coords[axis][cand]
            below = self.levels[index * size][:, None] - x
            above = x - self.levels[index * size + size - 1][:, None]
            near += np.square(np.maximum(np.maximum(below, above), 0.0))
            far += np.maximum(np.square(below), np.square(above))
        # A centre farther than the best worst case plus the margin is never the reference's choice
        # for any colour of the cell: the nearest colour's true nearest is within the best worst case.
        keep = near <= (far.min(axis=1) + MARGIN)[:, None]
        count = np.count_nonzero(keep, axis=1)
        one = count == 1
        self.grids[size][cell[one]] = cand[one, np.argmax(keep[one], axis=1)]
        many = ~one
        if not many.any():
            return
        cell, cand, keep, count = cell[many], cand[many], keep[many], count[many]
        if size == 1:  # single colours with two centres within the margin: the reference decides
            self.ties.append(cell.astype(np.uint32))
            return
        widest = int(count.max())
        order = np.argsort(~keep, axis=1, kind="stable")[:, :widest]  # kept candidates first
        cand = np.take_along_axis(np.where(keep, cand, self.k), order, axis=1)
        r, g, b = cell % m, (cell // m) % m, cell // (m * m)
        bit = np.arange(2)
        m2 = 2 * m
        child = (
            (2 * r)[:, None, None, None]
            + bit[None, None, None, :]
            + ((2 * g)[:, None, None, None] + bit[None, None, :, None]) * m2
            + ((2 * b)[:, None, None, None] + bit[None, :, None, None]) * (m2 * m2)
        ).reshape(-1, 8)
        # Blocks of cells with similar candidate counts, so padding costs little.
        by_count = np.argsort(count, kind="stable")
        cand, count, child = cand[by_count], count[by_count], child[by_count]
        start = 0
        while start < len(cand):
            end = min(len(cand), start + max(1, _CELLS // 8 // int(count[start])))
            width = int(count[end - 1])
            end = min(end, start + max(1, _CELLS // 8 // width))
            width = int(count[end - 1])
            block = np.repeat(cand[start:end, :width], 8, axis=0)
            self.refine(child[start:end].reshape(-1), block, size // 2)
            start = end

    def table(self, centers: np.ndarray) -> np.ndarray:
        self.refine(np.zeros(1, np.int64), np.arange(self.k)[None, :], 256)
        for size in (256, 128, 64, 32, 16, 8, 4, 2):  # a decided cell decides its eight children
            m = 256 // size
            coarse = self.grids[size].reshape(m, m, m)
            up = coarse.repeat(2, axis=0).repeat(2, axis=1).repeat(2, axis=2).reshape(-1)
            fine = self.grids[size // 2]
            np.copyto(fine, up, where=fine == _UNFILLED)
        table = self.grids[1]
        if self.ties:
            codes = np.concatenate(self.ties)
            table[codes] = reference_nearest(codes, np.asarray(centers, np.float32))
        return table


def build_table(centers: np.ndarray) -> np.ndarray:
    """uint16 (2**24,) token of every colour code ``r | g << 8 | b << 16``, each the reference's."""
    return _Octree(centers).table(centers)


def write_table(path: Path, table: np.ndarray, digest: str, clusters: int) -> Path:
    """Writes `table` for the palette with `digest` to `path`, atomically (temporary file, rename)."""
    header = json.dumps(
        {"format": 1, "digest": digest, "clusters": clusters, "dtype": "<u2", "entries": N_COLOURS}
    ).encode()
    if len(_MAGIC) + len(header) + 1 > _HEADER:
        raise ValueError("table header does not fit")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(_MAGIC + header.ljust(_HEADER - len(_MAGIC) - 1) + b"\n")
            f.write(np.ascontiguousarray(table, "<u2").tobytes())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_table(path: Path, digest: str, clusters: int) -> np.ndarray:
    """Read-only memory map of the table at `path`; TableError naming the file unless it is a table of
    this palette (`digest`, `clusters`)."""
    with open(path, "rb") as f:
        head = f.read(_HEADER)
    try:
        if not head.startswith(_MAGIC):
            raise ValueError("no table magic")
        record = json.loads(head[len(_MAGIC) :].decode())
        if record.get("format") != 1 or record.get("entries") != N_COLOURS or record.get("dtype") != "<u2":
            raise ValueError(f"unknown layout {record}")
    except ValueError as exc:
        raise TableError(f"{path}: not an igpt colour table ({exc})") from exc
    if record.get("digest") != digest or record.get("clusters") != clusters:
        raise TableError(
            f"{path}: built for palette {str(record.get('digest'))[:12]} (K={record.get('clusters')}), "
            f"not this palette {digest[:12]} (K={clusters}); delete it and the next tokenize (or "
            "Palette.build_table + save) rebuilds it"
        )
    if path.stat().st_size != _HEADER + 2 * N_COLOURS:
        raise TableError(f"{path}: {path.stat().st_size} bytes, expected {_HEADER + 2 * N_COLOURS}")
    table = np.memmap(path, dtype="<u2", mode="r", offset=_HEADER, shape=(N_COLOURS,))
    if int(table.max()) >= clusters:
        raise TableError(f"{path}: holds tokens >= K={clusters}")
    return table
