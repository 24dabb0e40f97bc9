"""Pretraining data: every rank's endless, seeded, resumable stream of token batches, and the held-out set.

Every rank reads only its own share of the train split: whole shards, balanced to the sample, so that
every rank takes the same number of samples per epoch (and of steps) and DDP never waits on a rank that
ran out, while the bytes a rank reads in an epoch are its share's plus at most one shard's
(`igpt_core.shares` holds the layout: the epoch's shards in a seeded order laid end to end, rank r taking
the r-th of W equal contiguous ranges, at most one shard cut between two neighbours). The stream is an
infinite sequence of epochs, each reshuffled with a seed of (seed, epoch). A step takes
`batch_size // workers` samples from it on every rank. The rank's next batches are decoded in a
background thread (`prefetch`) while the current step runs, in the same order a plain loop would give.

The stream's state (epoch, samples taken in the epoch, the layout's "version") is saved with each
checkpoint, and a stream built from it continues with the same samples. Resumed at another world size
(`TokenStream.load_resharded`, given every old rank's state), the samples the old ranks had not yet taken
in their unfinished epochs are split among the new ranks, so each sample of an epoch is still taken once.
States written before this layout (no "version") resume in the old layout until their epoch ends.

Held-out data: the `eval_split` of the shard folder (default: `val`, else `test`), or of a separate
held-out shard folder (`eval_shards`, made with the same palette) when one is given; when there is no
held-out split, the first `eval_batches * batch_size` train samples (in shard order) are held out and every
training stream skips them (by content hash, so the same image never counts as both). Either way rank r
evaluates on samples r, r + W, r + 2W, ... of the first ones in shard order, so the held-out set does not
depend on the world size.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from igpt_core.config import ModelConfig, TrainConfig
from igpt_core.prefetch import Prefetcher
from igpt_core.shard_reader import decode_sample, read_shard, read_shard_rows
from igpt_core.shards import TokenizeError, read_meta, shard_entries
from igpt_core.shares import VERSION, Piece, epoch_pieces, last_epoch, legacy_pieces, rank_pieces

EVAL_SPLITS = ("val", "test")


class PretrainError(ValueError):
    """Pretraining cannot start as asked; the message names the argument or option at fault."""


def digest(tokens: np.ndarray) -> bytes:
    """A 128-bit content hash of one image's tokens (how held-out samples are recognised)."""
    return hashlib.blake2b(np.ascontiguousarray(tokens).tobytes(), digest_size=16).digest()


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def _counted(path: str | os.PathLike[str], split: str | None) -> list[dict[str, Any]]:
    """The split's shard entries, each with its sample count (read from the shard when the folder has
    no manifest)."""
    entries = shard_entries(path, split)
    for entry in entries:
        if entry["samples"] is None:
            entry["samples"] = len(read_shard(entry["path"]))
    return entries


def samples_per_rank(path: str | os.PathLike[str], split: str | None = None, world_size: int = 1) -> int:
    """How many samples `read_shards(..., world_size=world_size)` yields on every rank (the same on all)."""
    return sum(int(entry["samples"]) for entry in _counted(path, split)) // world_size


class _PieceReader:
    """Reads pieces (shard, rows) of a split, reading each shard only as far as its last row wanted;
    counts the bytes it read."""

    def __init__(self, entries: list[dict[str, Any]], verify: bool = False) -> None:
        self.entries, self.verify = entries, verify
        self.bytes_read = 0

    def samples(self, pieces: list[Piece], skip: int = 0) -> Iterator[tuple[np.ndarray, int | None]]:
        """The pieces' samples in order, after dropping the first `skip` (whole pieces unread)."""
        for shard, rows in pieces:
            if skip >= len(rows):
                skip -= len(rows)
                continue
            wanted, skip = rows[skip:], 0
            entry = self.entries[shard]
            if self.verify:
                whole = read_shard(entry["path"], entry["sha256"], verify=True)
                picked = [whole[int(row)] for row in wanted]
                self.bytes_read += int(entry.get("bytes") or Path(entry["path"]).stat().st_size)
            else:
                picked, read = read_shard_rows(
                    entry["path"],
                    wanted,
                    size=entry.get("bytes"),
                    samples=entry["samples"],
                    sample_bytes=entry.get("sample_bytes"),
                )
                self.bytes_read += read
            for sample in picked:
                yield decode_sample(entry["path"], *sample)


def read_shards(
    path: str | os.PathLike[str],
    *,
    split: str | None = None,
    rank: int = 0,
    world_size: int = 1,
    shuffle_seed: int | None = None,
    skip: int = 0,
    verify: bool = False,
) -> Iterator[tuple[np.ndarray, int | None]]:
    """Yields (tokens uint16 (R*R,), label or None) for this rank, one pass over `split`.

    Ranks take whole shards balanced to the sample (`igpt_core.shares`): every rank yields exactly
    `samples_per_rank(path, split, world_size)` samples, the ranks' sets are disjoint, and a rank reads
    its share's bytes plus at most one shard's. With shuffle_seed, shard order and the order within each
    shard are permuted; use a new seed per epoch. `skip` drops this rank's first samples (without reading
    the shards they fill). `verify` checks each shard's sha256 against the manifest before reading it.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise TokenizeError(f"rank {rank} is not in [0, world_size={world_size})")
    entries = _counted(path, split)
    pieces = epoch_pieces([int(e["samples"]) for e in entries], world_size, rank, shuffle_seed)
    yield from _PieceReader(entries, verify).samples(pieces, skip)


def load_tokens(
    path: str | os.PathLike[str], split: str | None = None, limit: int | None = None, *, verify: bool = False
) -> tuple[np.ndarray, np.ndarray | None]:
    """The first `limit` samples (all when None) as (tokens (N, R*R) uint16, labels (N,) int64 or None).

    Labels are None when no sample is labelled; an unlabelled sample among labelled ones gets -1.
    """
    rows: list[np.ndarray] = []
    labels: list[int | None] = []
    for tokens, label in read_shards(path, split=split, verify=verify):
        if limit is not None and len(rows) >= limit:
            break
        if rows and tokens.shape != rows[0].shape:
            raise TokenizeError(
                f"{path}: samples of different lengths ({rows[0].shape[0]} and {tokens.shape[0]})"
            )
        rows.append(tokens)
        labels.append(label)
    if not rows:
        raise TokenizeError(f"{path}: no samples to load")
    array = np.stack(rows)
    if all(label is None for label in labels):
        return array, None
    return array, np.array([-1 if label is None else label for label in labels], dtype=np.int64)


Batch = tuple[np.ndarray, np.ndarray | None, dict[str, Any]]
"""(tokens (B, R*R) uint16, labels (B,) int64 or None, the stream state after the batch)."""


class TokenStream:
    """One rank's infinite, seeded, resumable stream of token batches over a split.

    Epoch e is this rank's share (`igpt_core.shares`) with shuffle seed f(seed, e); `offset` counts the
    samples taken from the current epoch (skipped held-out ones included), so the state (epoch, offset) is
    the exact position and a stream built with it continues with the same samples. `prefetch` batches
    are decoded ahead in a background thread (0: none); `close()` (or leaving a `with` block) stops it.
    `bytes_read` counts the shard bytes this stream has read.
    """

    def __init__(
        self,
        shards: str | os.PathLike[str],
        split: str | None,
        *,
        rank: int,
        world_size: int,
        seed: int,
        exclude: frozenset[bytes] = frozenset(),
        epoch: int = 0,
        offset: int = 0,
        prefetch: int = 2,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise PretrainError(f"workers: rank {rank} is not in [0, world_size={world_size})")
        self.shards, self.split = shards, split
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.exclude, self.prefetch = exclude, prefetch
        self._reader = _PieceReader(_counted(shards, split))
        self._counts = [int(entry["samples"]) for entry in self._reader.entries]
        self._history: dict[str, Any] | None = None  # the old world's positions after a resharded resume
        self._legacy_epoch: int | None = None  # a state of the old layout: this epoch continues in it
        self.epoch, self.offset = epoch, offset
        self._samples: Iterator[tuple[np.ndarray, int | None, int, int]] | None = None
        self._prefetcher: Prefetcher[Batch] | None = None
        self._prefetch_size = 0

    # --- state

    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def state_dict(self) -> dict[str, Any]:
        """The position {"epoch", "offset", "version"} (and "reshard" while in an epoch a resharded resume
        covers), as saved with each checkpoint."""
        return self._state(self.epoch, self.offset)

    def _state(self, epoch: int, offset: int) -> dict[str, Any]:
        if self._legacy_epoch == epoch:
            return {"epoch": epoch, "offset": offset}  # still in the old layout's epoch
        state: dict[str, Any] = {"epoch": epoch, "offset": offset, "version": VERSION}
        if self._history is not None and epoch <= last_epoch(self._history):
            state["reshard"] = self._history
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Moves the stream to a position this rank saved (at this world size); the next sample is the
        one that followed it."""
        self._stop()
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self._history = state.get("reshard")
        self._legacy_epoch = None if "version" in state else self.epoch
        self._samples = None

    def load_resharded(self, states: list[dict[str, Any]], world_size: int) -> None:
        """Resumes from every rank's state saved at another `world_size` (in rank order): this rank takes
        its part of what those ranks had not taken of their unfinished epochs, then goes on in its own
        layout."""
        if len(states) != world_size:
            raise PretrainError(f"resume: {len(states)} saved data positions for {world_size} workers")
        self._stop()
        self._history = {"world_size": world_size, "positions": [dict(s) for s in states]}
        self._legacy_epoch = None
        self.epoch, self.offset, self._samples = min(int(s["epoch"]) for s in states), 0, None

    # --- reading

    def _pieces(self, epoch: int) -> list[Piece]:
        if self._legacy_epoch == epoch:
            return legacy_pieces(self._counts, self.world_size, self.rank, _epoch_seed(self.seed, epoch))
        return rank_pieces(
            self._counts,
            lambda e: _epoch_seed(self.seed, e),
            epoch,
            self.rank,
            self.world_size,
            self._history,
        )

    def _generate(self, epoch: int, offset: int) -> Iterator[tuple[np.ndarray, int | None, int, int]]:
        """(tokens, label, epoch, offset after it) from a position on, forever."""
        while True:
            pieces = self._pieces(epoch)
            resharded = self._history is not None and epoch <= last_epoch(self._history)
            opened_at, yielded = offset, 0
            for tokens, label in self._reader.samples(pieces, offset):
                offset += 1
                if self.exclude and digest(tokens) in self.exclude:
                    continue
                yielded += 1
                yield tokens, label, epoch, offset
            if not resharded and opened_at == 0 and yielded == 0:  # a whole epoch gave nothing
                raise PretrainError(
                    f"shards: split {self.split!r} has no sample for rank {self.rank} of {self.world_size} "
                    "(besides the held-out ones)"
                )
            epoch, offset = epoch + 1, 0

    def _take(self, batch_size: int) -> Batch:
        """The next batch from the generator and the state after it; never touches the position (the
        prefetch thread calls it)."""
        if self._samples is None:
            self._samples = self._generate(self.epoch, self.offset)
        rows: list[np.ndarray] = []
        labels: list[int | None] = []
        epoch = offset = -1
        for tokens, label, reached_epoch, reached_offset in islice(self._samples, batch_size):
            rows.append(tokens)
            labels.append(label)
            epoch, offset = reached_epoch, reached_offset
        known = all(label is not None and label >= 0 for label in labels)
        return np.stack(rows), np.array(labels, dtype=np.int64) if known else None, self._state(epoch, offset)

    def _stop(self) -> None:
        """Stops the prefetch thread; its batches not yet taken are dropped and reread from the position."""
        if self._prefetcher is not None:
            self._prefetcher.close()
            self._prefetcher, self._samples = None, None

    def close(self) -> None:
        """Stops the background thread (the position stays where the last batch taken left it)."""
        self._stop()

    def __enter__(self) -> TokenStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def bytes_read(self) -> int:
        return self._reader.bytes_read

    def next_labelled_batch(self, batch_size: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(batch_size, R*R) uint16 tokens and their (batch_size,) int64 labels; None unless every sample
        of the batch has one."""
        if self.prefetch < 1:
            tokens, labels, state = self._take(batch_size)
        else:
            if self._prefetcher is None or self._prefetch_size != batch_size:
                self._stop()
                if self._samples is None:  # made here: the thread must not read the position
                    self._samples = self._generate(self.epoch, self.offset)
                self._prefetcher = Prefetcher(lambda: self._take(batch_size), self.prefetch)
                self._prefetch_size = batch_size
            tokens, labels, state = self._prefetcher.get()
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        return tokens, labels

    def next_batch(self, batch_size: int) -> np.ndarray:
        """(batch_size, R*R) uint16 tokens."""
        return self.next_labelled_batch(batch_size)[0]

    def next_sample(self) -> np.ndarray:
        """One sample, read in this thread (no prefetch)."""
        self._stop()
        tokens, _, state = self._take(1)
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        return tokens[0]


@dataclass(frozen=True)
class DataPlan:
    """Which splits a run trains and evaluates on (decided on the driver, used by every worker)."""

    train_split: str | None
    eval_split: str | None
    """None: the held-out samples are the first `holdout` samples of the train split."""
    holdout: int
    """Evaluation samples in all (spread over the ranks)."""
    eval_shards: str | None = None
    """The folder `eval_split` is read from; None: the train shard folder."""


def _check_meta(folder: Path, model: ModelConfig, what: str) -> dict:
    if not folder.is_dir():
        raise PretrainError(f"{what}: {folder} is not a folder of token shards")
    meta = read_meta(folder)
    for key, want in (("resolution", model.resolution), ("clusters", model.vocab_size)):
        if key in meta and int(meta[key]) != want:
            option = "resolution" if key == "resolution" else "vocab_size"
            raise PretrainError(
                f"model.{option}: {want} does not match the {what}' {key}={meta[key]} ({folder})"
            )
    return meta


def _plan_eval_shards(
    folder: Path, eval_shards: str | os.PathLike[str], meta: dict, model: ModelConfig, train: TrainConfig
) -> DataPlan:
    held = Path(eval_shards)
    held_meta = _check_meta(held, model, "eval_shards")
    ours, theirs = meta.get("palette_digest"), held_meta.get("palette_digest")
    if ours is not None and theirs is not None and ours != theirs:
        raise PretrainError(
            f"eval_shards: {held} was tokenized with palette {theirs[:12]}, the train shards with {ours[:12]}"
        )
    splits = list(held_meta.get("splits", {}))
    if train.eval_split is not None:
        if train.eval_split not in splits:
            raise PretrainError(
                f"eval_split: {held} has no split {train.eval_split!r} (it holds {', '.join(splits) or 'none'})"
            )
        eval_split = train.eval_split
    else:  # a held-out folder usually holds one split, whatever its name
        found = next((s for s in EVAL_SPLITS if s in splits), splits[0] if len(splits) == 1 else None)
        if found is None:
            raise PretrainError(
                f"eval_shards: {held} holds splits {', '.join(splits) or 'none'}; set eval_split to pick one"
            )
        eval_split = found
    available = samples_per_rank(held, eval_split, train.workers)
    if available < 1:
        raise PretrainError(
            f"eval_shards: split {eval_split!r} of {held} has fewer samples than workers={train.workers}"
        )
    per_rank = train.per_worker_batch_size * train.eval_batches
    return DataPlan(train.train_split, eval_split, min(per_rank, available) * train.workers, str(held))


def plan_data(
    shards: str | os.PathLike[str],
    model: ModelConfig,
    train: TrainConfig,
    eval_shards: str | os.PathLike[str] | None = None,
) -> DataPlan:
    """Checks the shard folder (and `eval_shards`, a held-out shard folder, when given) against the model
    config and picks the train and held-out splits."""
    folder = Path(shards)
    meta = _check_meta(folder, model, "shards")
    splits = list(meta.get("splits", {}))
    if train.train_split not in splits:
        raise PretrainError(
            f"train_split: {folder} has no split {train.train_split!r} (it holds {', '.join(splits) or 'none'})"
        )
    if eval_shards is not None:
        return _plan_eval_shards(folder, eval_shards, meta, model, train)
    if train.eval_split is not None and train.eval_split not in splits:
        raise PretrainError(
            f"eval_split: {folder} has no split {train.eval_split!r} (it holds {', '.join(splits) or 'none'})"
        )
    eval_split = train.eval_split or next((s for s in EVAL_SPLITS if s in splits), None)
    per_rank = train.per_worker_batch_size * train.eval_batches
    total = samples_per_rank(folder, train.train_split, 1)
    if eval_split is not None:
        available = samples_per_rank(folder, eval_split, train.workers)
        if available < 1:
            raise PretrainError(f"eval_split: {eval_split!r} has fewer samples than workers={train.workers}")
        return DataPlan(train.train_split, eval_split, min(per_rank, available) * train.workers)
    # A small split (a retrain on a few new images) keeps at most a quarter of itself back, not eval_batches.
    holdout = max(1, min(per_rank, total // (4 * train.workers))) * train.workers
    if total - holdout < train.per_worker_batch_size * train.workers:  # at least one batch to train on
        raise PretrainError(
            f"shards: split {train.train_split!r} has {total} samples, too few to hold out {holdout} for "
            "evaluation; tokenize a 'val' split, or lower eval_batches or batch_size"
        )
    return DataPlan(train.train_split, None, holdout)


def held_out(shards: str, plan: DataPlan, rank: int, world: int) -> tuple[np.ndarray, frozenset[bytes]]:
    """This rank's evaluation tokens, and the digests every training stream must skip."""
    per_rank = plan.holdout // world
    if plan.eval_split is not None:
        source = plan.eval_shards or shards
        first = [t for t, _ in islice(read_shards(source, split=plan.eval_split), per_rank * world)]
        return np.stack(first[rank::world]), frozenset()
    first = [tokens for tokens, _ in islice(read_shards(shards, split=plan.train_split), per_rank * world)]
    return np.stack(first[rank::world]), frozenset(digest(t) for t in first)
