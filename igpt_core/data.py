"""Pretraining data: every rank's endless, seeded, resumable stream of token batches, and the held-out set.

Every rank reads its own share of the train split (`read_shards` splits samples, not shards, and
gives every rank the same count, so uneven or too few shards never starve a rank) as an infinite stream of
epochs, each shuffled with a seed of (seed, epoch); the shuffled order does not depend on the number of
ranks. A step takes `batch_size // workers` samples from it on every rank, so all ranks take the same
number of steps and DDP never waits on a rank that ran out. The stream's position (epoch, samples taken in
the epoch) is saved with each checkpoint.

Held-out data: the `eval_split` of the shard folder (default: `val`, else `test`), or of a separate
held-out shard folder (`eval_shards`, made with the same palette) when one is given; when there is no
held-out split, the first `eval_batches * batch_size` train samples (in shard order) are held out and every
training stream skips them (by content hash, so the same image never counts as both).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np

from igpt_core.config import ModelConfig, TrainConfig
from igpt_core.shards import TokenizeError, decode_sample, read_meta, read_shard, shard_entries

EVAL_SPLITS = ("val", "test")


class PretrainError(ValueError):
    """Pretraining cannot start as asked; the message names the argument or option at fault."""


def digest(tokens: np.ndarray) -> bytes:
    """A 128-bit content hash of one image's tokens (how held-out samples are recognised)."""
    return hashlib.blake2b(np.ascontiguousarray(tokens).tobytes(), digest_size=16).digest()


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def samples_per_rank(path: str | os.PathLike[str], split: str | None = None, world_size: int = 1) -> int:
    """How many samples `read_shards(..., world_size=world_size)` yields on every rank (the same on all)."""
    entries = shard_entries(path, split)
    if any(entry["samples"] is None for entry in entries):
        total = sum(len(read_shard(entry["path"])) for entry in entries)
    else:
        total = sum(entry["samples"] for entry in entries)
    return total // world_size


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

    Ranks split samples, not shards: sample i of the pass (in shard order, or the shuffled order) goes to
    rank i % world_size, and the last `total % world_size` samples are dropped, so every rank yields exactly
    `samples_per_rank(path, split, world_size)` samples and the ranks' sets are disjoint. With shuffle_seed,
    shard order and the order within each shard are permuted (the same on every rank); use a new seed per
    epoch. `skip` drops this rank's first samples without decoding them (resuming mid-pass). `verify`
    checks each shard's sha256 against the manifest before reading it.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise TokenizeError(f"rank {rank} is not in [0, world_size={world_size})")
    entries = shard_entries(path, split)
    per_rank = samples_per_rank(path, split, world_size)
    rng = np.random.default_rng(shuffle_seed) if shuffle_seed is not None else None
    order = rng.permutation(len(entries)) if rng is not None else np.arange(len(entries))
    position = 0  # index of the next sample in the whole pass
    mine = 0  # samples of this rank seen so far, yielded or skipped
    for shard_index in order:
        if mine >= per_rank:
            return
        entry = entries[int(shard_index)]
        count = entry["samples"]
        if count is not None:
            here = len(range(position + (rank - position) % world_size, position + count, world_size))
            if here == 0 or mine + here <= skip:
                # None of this rank's samples are here, or all are skipped: do not read the shard.
                position += count
                mine = min(mine + here, per_rank)
                continue
        samples = read_shard(entry["path"], entry["sha256"], verify=verify)
        within = (
            np.random.default_rng([shuffle_seed, int(shard_index)]).permutation(len(samples))
            if shuffle_seed is not None
            else range(len(samples))
        )
        for sample_index in within:
            index = position
            position += 1
            if index % world_size != rank or mine >= per_rank:
                continue
            mine += 1
            if mine <= skip:
                continue
            yield decode_sample(entry["path"], *samples[int(sample_index)])


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


class TokenStream:
    """One rank's infinite, seeded, resumable stream of token batches over a split.

    Epoch e is `read_shards(..., rank, world_size, shuffle_seed=f(seed, e))`; `offset` counts the samples
    taken from the current epoch (skipped held-out ones included), so (epoch, offset) is the exact position
    and a stream built with it continues with the same samples.
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
    ) -> None:
        self.shards, self.split = shards, split
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.exclude = exclude
        self.epoch, self.offset = epoch, offset
        self._samples: Iterator[tuple[np.ndarray, int | None]] | None = None
        self._opened_at = offset
        self._yielded_in_epoch = 0

    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def state_dict(self) -> dict[str, int]:
        """The position {"epoch", "offset"}, as saved with each checkpoint."""
        return self.position()

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Moves the stream to a saved position; the next sample is the one that followed it."""
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self._samples, self._opened_at, self._yielded_in_epoch = None, self.offset, 0

    def _open_epoch(self) -> None:
        self._samples = read_shards(
            self.shards,
            split=self.split,
            rank=self.rank,
            world_size=self.world_size,
            shuffle_seed=_epoch_seed(self.seed, self.epoch),
            skip=self.offset,
        )
        self._opened_at, self._yielded_in_epoch = self.offset, 0

    def next_sample(self) -> np.ndarray:
        return self._next()[0]

    def _next(self) -> tuple[np.ndarray, int | None]:
        while True:
            if self._samples is None:
                self._open_epoch()
            assert self._samples is not None
            for tokens, label in self._samples:
                self.offset += 1
                if self.exclude and digest(tokens) in self.exclude:
                    continue
                self._yielded_in_epoch += 1
                return tokens, label
            if self._opened_at == 0 and self._yielded_in_epoch == 0:  # a whole epoch gave nothing
                raise PretrainError(
                    f"shards: split {self.split!r} has no sample for rank {self.rank} of {self.world_size} "
                    "(besides the held-out ones)"
                )
            self.epoch, self.offset, self._samples = self.epoch + 1, 0, None

    def next_batch(self, batch_size: int) -> np.ndarray:
        """(batch_size, R*R) uint16 tokens."""
        return np.stack([self.next_sample() for _ in range(batch_size)])

    def next_labelled_batch(self, batch_size: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(batch_size, R*R) uint16 tokens and their (batch_size,) int64 labels; None unless every sample
        of the batch has one."""
        samples = [self._next() for _ in range(batch_size)]
        labels = [label for _, label in samples]
        known = all(label is not None and label >= 0 for label in labels)
        return np.stack([t for t, _ in samples]), np.array(labels, dtype=np.int64) if known else None


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
        mine = islice(read_shards(source, split=plan.eval_split, rank=rank, world_size=world), per_rank)
        return np.stack([tokens for tokens, _ in mine]), frozenset()
    first = [tokens for tokens, _ in islice(read_shards(shards, split=plan.train_split), per_rank * world)]
    return np.stack(first[rank::world]), frozenset(digest(t) for t in first)
