"""Which samples each rank takes in an epoch: whole shards per rank, balanced to the sample.

A split of S shards holding n_s samples each (N in all), at world size W, in an epoch whose shuffle seed
is h (`data` derives it from (seed, epoch)):

- the shards are put in a seeded order (by h; manifest order when unshuffled) and laid end to end, each
  in file order: one sequence of N samples;
- rank r takes positions [r*q, (r+1)*q) of it, q = N // W (the last N % W samples, a different few each
  epoch, wait for the next epoch), so every rank takes q samples per epoch and as many steps;
- a rank's share is therefore whole shards, plus at most the tail of one shard (where its range starts)
  and the head of another (where it ends). It reads the head shard only as far as its last sample
  (`shard_reader.read_shard_head`) and the tail shard whole, so the bytes it reads in an epoch are its q
  samples' plus at most one shard's;
- it takes its pieces in that order, the samples of each piece in a permutation seeded by (h, shard,
  first row).

A piece is (shard index into the split's manifest order, rows in the order they are taken).

Resuming at another world size (`resharded_pieces`): the positions the old ranks had reached say exactly
which samples of each unfinished epoch were taken. The rest of every such epoch (old rank 0's untaken
samples in its order, then rank 1's, ...) is one sequence that the new ranks split in W contiguous ranges
whose sizes differ by at most one, so nothing is lost or seen twice; later epochs use the layout above at
the new world size. Old positions may themselves come from a resharded run (they carry its history) or
from the layout before this one (`legacy_pieces`: sample i of the epoch went to rank i % W; positions
without a "version").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

VERSION = 2
"""The stream state's "version": positions in this module's layout (absent: `legacy_pieces`)."""

Piece = tuple[int, np.ndarray]
"""(shard index in manifest order, int64 rows of that shard in the order taken)."""


def shard_order(n_shards: int, shuffle_seed: int | None) -> np.ndarray:
    """The epoch's order of the shards: a seeded permutation, or manifest order when unshuffled."""
    if shuffle_seed is None:
        return np.arange(n_shards)
    return np.random.default_rng(shuffle_seed).permutation(n_shards)


def epoch_pieces(counts: Sequence[int], world: int, rank: int, shuffle_seed: int | None) -> list[Piece]:
    """This rank's pieces of one epoch in the layout of the module docstring (q = N // world samples)."""
    order = shard_order(len(counts), shuffle_seed)
    sizes = np.asarray(counts, dtype=np.int64)[order]
    ends = np.cumsum(sizes)
    per_rank = int(ends[-1]) // world if len(ends) else 0
    lo, hi = rank * per_rank, (rank + 1) * per_rank
    pieces: list[Piece] = []
    first = int(np.searchsorted(ends, lo, side="right"))  # the shard holding position lo
    for index in range(first, len(order)):
        begin = int(ends[index] - sizes[index])
        if begin >= hi:
            break
        a, b = max(lo, begin) - begin, min(hi, int(ends[index])) - begin
        if a == b:
            continue
        shard = int(order[index])
        rows = np.arange(a, b, dtype=np.int64)
        if shuffle_seed is not None:
            rows = a + np.random.default_rng([shuffle_seed, shard, a]).permutation(b - a)
        pieces.append((shard, rows))
    return pieces


def legacy_pieces(counts: Sequence[int], world: int, rank: int, shuffle_seed: int | None) -> list[Piece]:
    """A rank's pieces in the layout before shard shares (kept to resume checkpoints written by it):
    shards in `shard_order`, each shard's samples permuted by (h, shard), sample i of that pass to rank
    i % world, the last N % world left out."""
    order = shard_order(len(counts), shuffle_seed)
    per_rank = int(sum(counts)) // world
    pieces: list[Piece] = []
    position, mine = 0, 0
    for shard in order:
        count = int(counts[int(shard)])
        within = (
            np.random.default_rng([shuffle_seed, int(shard)]).permutation(count)
            if shuffle_seed is not None
            else np.arange(count)
        )
        ours = within[(rank - position) % world :: world][: max(per_rank - mine, 0)]
        position += count
        if len(ours):
            pieces.append((int(shard), ours.astype(np.int64)))
            mine += len(ours)
    return pieces


def last_epoch(history: dict[str, Any]) -> int:
    """The last epoch a reshard history covers (the furthest epoch any old rank had begun)."""
    return max(int(p["epoch"]) for p in history["positions"])


def resharded_pieces(
    counts: Sequence[int],
    shuffle_seed: Callable[[int], int | None],
    epoch: int,
    rank: int,
    world: int,
    history: dict[str, Any],
) -> list[Piece]:
    """This rank's pieces of `epoch` (at most `last_epoch(history)`) when the run resumed at `world`
    ranks from `history` = {"world_size": old W, "positions": every old rank's saved state}."""
    old_world, positions = int(history["world_size"]), history["positions"]
    legacy = "version" not in positions[0]
    older = next((p["reshard"] for p in positions if "reshard" in p), None)
    shards: list[np.ndarray] = []
    rows: list[np.ndarray] = []
    for old_rank, position in enumerate(positions):
        if int(position["epoch"]) > epoch:
            continue  # that rank had taken all of its share of this epoch
        if legacy:
            pieces = legacy_pieces(counts, old_world, old_rank, shuffle_seed(epoch))
        else:
            pieces = rank_pieces(counts, shuffle_seed, epoch, old_rank, old_world, older)
        if not pieces:
            continue
        taken = int(position["offset"]) if int(position["epoch"]) == epoch else 0
        own_rows = np.concatenate([r for _, r in pieces])
        own_shards = np.concatenate([np.full(len(r), shard, dtype=np.int64) for shard, r in pieces])
        shards.append(own_shards[taken:])
        rows.append(own_rows[taken:])
    if not rows:
        return []
    flat_shards, flat_rows = np.concatenate(shards), np.concatenate(rows)
    total = len(flat_rows)
    lo, hi = rank * total // world, (rank + 1) * total // world
    return _runs(flat_shards[lo:hi], flat_rows[lo:hi])


def _runs(shards: np.ndarray, rows: np.ndarray) -> list[Piece]:
    """Consecutive samples of one shard grouped into one piece."""
    if len(rows) == 0:
        return []
    cuts = np.flatnonzero(np.diff(shards)) + 1
    return [(int(s[0]), r) for s, r in zip(np.split(shards, cuts), np.split(rows, cuts), strict=True)]


def rank_pieces(
    counts: Sequence[int],
    shuffle_seed: Callable[[int], int | None],
    epoch: int,
    rank: int,
    world: int,
    history: dict[str, Any] | None = None,
) -> list[Piece]:
    """A rank's pieces of `epoch`: resharded from `history` while the epoch is one it covers, else the
    shard-share layout."""
    if history is not None and epoch <= last_epoch(history):
        return resharded_pieces(counts, shuffle_seed, epoch, rank, world, history)
    return epoch_pieces(counts, world, rank, shuffle_seed(epoch))
