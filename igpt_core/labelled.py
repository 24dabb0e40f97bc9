"""Labelled token splits for fine-tuning: loading them with their checks, the subsets a run trains,
validates and tests on, and each rank's resumable stream of labelled batches.

Every check names the option the user passed (`--train`, `--val`, `--test`, `--checkpoint`) and the
folder at fault. Subsets are seeded samples stratified by class over the whole split (`igpt_core.subsets`),
never a prefix in shard order. Shapes: N samples, R image side.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from igpt_core.data import digest, load_tokens
from igpt_core.shards import TokenizeError, read_meta
from igpt_core.subsets import SubsetError, carve_validation, check_classes, class_counts, stratified_sample

MOSTLY_TRAIN = 0.5
"""A test set with more than this share of images also in train (by content digest) is refused."""


class FinetuneError(ValueError):
    """Fine-tuning cannot start as asked; the message names the option and the input at fault."""


@dataclass(frozen=True)
class LabelledSplit:
    """One split of a token folder, every sample labelled."""

    option: str
    """The option that named it ("--train", "--val", "--test"): errors name it."""
    path: Path
    split: str
    tokens: np.ndarray = field(repr=False)
    """(N, R*R) uint16."""
    labels: np.ndarray = field(repr=False)
    """(N,) int64, each >= 0."""
    meta: dict[str, Any] = field(repr=False)
    """The folder's meta.json."""

    @property
    def label_names(self) -> list[str] | None:
        names = self.meta.get("label_names")
        return None if not names else [str(name) for name in names]


def _default_split(meta: dict[str, Any], preferred: str) -> str | None:
    names = list(meta.get("splits", {}))
    return preferred if preferred in names else (names[0] if len(names) == 1 else None)


def load_split(path: str | os.PathLike[str], option: str, split: str | None = None) -> LabelledSplit:
    """The labelled split `split` of the token folder `path` (default: the split named like the option,
    e.g. "test" for --test, else the folder's only split); FinetuneError for anything unusable."""
    folder = Path(path).expanduser().absolute()
    preferred = option.lstrip("-")
    try:
        meta = read_meta(folder)
        chosen = split or _default_split(meta, preferred)
        if chosen is None:
            held = ", ".join(meta.get("splits", {})) or "none"
            raise FinetuneError(f"{option}: {folder} has no split {preferred!r} (it holds {held}); name one")
        tokens, labels = load_tokens(folder, split=chosen)
    except TokenizeError as exc:
        raise FinetuneError(f"{option}: {exc}") from exc
    if labels is None:
        raise FinetuneError(
            f"{option}: {folder} split {chosen!r} is unlabelled; fine-tuning needs a class for every image "
            "(tokenize a labelled source: class sub-folders, .cls entries, a label column)"
        )
    missing = int((labels < 0).sum())
    if missing:
        raise FinetuneError(
            f"{option}: {missing} of {len(labels)} samples in {folder} split {chosen!r} have no label"
        )
    return LabelledSplit(option, folder, chosen, tokens, labels, meta)


def class_space(train: LabelledSplit, *others: LabelledSplit) -> tuple[int, list[str] | None]:
    """(C, class names or None): C from the train folder's label_names, else its largest label + 1.

    Refuses a split whose label_names count differs from train's, and any label outside [0, C)."""
    names = train.label_names
    for split in others:
        theirs = split.label_names
        if names is not None and theirs is not None and len(theirs) != len(names):
            raise FinetuneError(
                f"{split.option}: {split.path} has {len(theirs)} classes, {train.option} {train.path} has "
                f"{len(names)}; both must be tokenized with the same classes"
            )
        names = names if names is not None else theirs
    n_classes = len(names) if names is not None else int(train.labels.max()) + 1
    for split in (train, *others):
        top = int(split.labels.max())
        if top >= n_classes:
            where = "its label_names" if names is not None else f"the largest {train.option} label"
            raise FinetuneError(
                f"{split.option}: {split.path} split {split.split!r} has label {top}, outside [0, {n_classes}) "
                f"({n_classes} classes from {where})"
            )
    if n_classes < 2:
        raise FinetuneError(f"{train.option}: {train.path} has {n_classes} class; a classifier needs two")
    return n_classes, names


def check_palette(split: LabelledSplit, palette_digest: str | None, checkpoint: Path) -> None:
    """Refuses shards made with another palette than the checkpoint's (its tokens name other colours)."""
    theirs = split.meta.get("palette_digest")
    if palette_digest and theirs and theirs != palette_digest:
        raise FinetuneError(
            f"--checkpoint: {checkpoint} was trained on palette {palette_digest[:12]}, but {split.option} "
            f"{split.path} was tokenized with palette {theirs[:12]}; tokenize with the checkpoint's palette"
        )


def check_resolution(split: LabelledSplit, positions: int, checkpoint: Path) -> None:
    if split.tokens.shape[1] != positions:
        raise FinetuneError(
            f"{split.option}: {split.path} holds images of {split.tokens.shape[1]} tokens, the model of "
            f"--checkpoint {checkpoint} reads {positions}"
        )


@dataclass(frozen=True)
class Subsets:
    """Sorted sample indices of what a run trains, validates and tests on, and how they were drawn."""

    train: np.ndarray
    val: np.ndarray
    """Into the val split when one was given, else into the train split (carved out of it)."""
    test: np.ndarray
    val_from_train: bool
    absent_test_classes: list[int]
    test_in_train: int
    """Test images (of the subset) whose tokens also occur in the train split."""

    def record(self, train: LabelledSplit, val: LabelledSplit, test: LabelledSplit) -> dict[str, Any]:
        """The `splits` section of finetune.json: size and count per class of each subset."""
        parts = {"train": (train, self.train), "val": (val, self.val), "test": (test, self.test)}
        return {
            name: {
                "path": str(split.path),
                "split": split.split,
                "n": len(index),
                "class_counts": {str(c): n for c, n in class_counts(split.labels[index]).items()},
            }
            for name, (split, index) in parts.items()
        }


def draw_subsets(
    train: LabelledSplit,
    test: LabelledSplit,
    val: LabelledSplit | None,
    *,
    max_train: int | None,
    max_test: int | None,
    val_fraction: float,
    seed: int,
) -> Subsets:
    """Seeded, stratified subsets: `max_train` of train (then `val_fraction` of those held out when no
    val split is given), `max_test` of test. Refuses fewer than two train classes and a test set mostly
    made of train images."""
    try:
        chosen = stratified_sample(train.labels, max_train, seed)
        if val is None:
            keep, held = carve_validation(train.labels[chosen], val_fraction, seed)
            train_index, val_index = chosen[keep], chosen[held]
        else:
            train_index, val_index = chosen, np.arange(len(val.labels), dtype=np.int64)
        test_index = stratified_sample(test.labels, max_test, seed)
        absent = check_classes(train.labels[train_index], test.labels[test_index])
    except SubsetError as exc:
        raise FinetuneError(f"{train.option}: {train.path}: {exc}") from exc
    seen = {digest(row) for row in train.tokens}
    in_train = sum(digest(row) in seen for row in test.tokens[test_index])
    if in_train > MOSTLY_TRAIN * len(test_index):
        raise FinetuneError(
            f"{test.option}: {in_train} of the {len(test_index)} test images in {test.path} also occur in "
            f"{train.option} {train.path}; a test set must be images the model was not trained on"
        )
    return Subsets(train_index, val_index, test_index, val is None, absent, int(in_train))


class LabelledStream:
    """One rank's endless, seeded, resumable stream of labelled samples held in memory.

    Epoch e is a seeded permutation of the samples cut to a multiple of the world size (so every rank
    takes the same number), of which this rank takes every world_size-th. (epoch, offset) is the exact
    position. With `flip_resolution`, each sample of a batch is mirrored with probability 1/2, chosen by
    (seed, epoch, offset, rank) alone, so a resumed run flips the same images.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        labels: np.ndarray,
        *,
        rank: int,
        world_size: int,
        seed: int,
        flip_resolution: int | None = None,
    ) -> None:
        self.per_rank = len(tokens) // world_size
        if self.per_rank < 1:
            raise FinetuneError(f"--train: {len(tokens)} training images cannot feed {world_size} workers")
        self.tokens, self.labels = tokens, labels
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.flip_resolution = flip_resolution
        self.epoch, self.offset = 0, 0
        self._order: np.ndarray | None = None

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.offset, self._order = int(state["epoch"]), int(state["offset"]), None

    def _epoch_order(self) -> np.ndarray:
        if self._order is None:
            rng = np.random.default_rng([self.seed, self.epoch])
            order = rng.permutation(len(self.tokens))[: self.per_rank * self.world_size]
            self._order = order[self.rank :: self.world_size]
        return self._order

    def next_labelled_batch(self, batch_size: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(batch_size, R*R) uint16 tokens and their (batch_size,) int64 labels."""
        start = (self.epoch, self.offset)
        picked: list[np.ndarray] = []
        need = batch_size
        while need:
            order = self._epoch_order()
            take = order[self.offset : self.offset + need]
            picked.append(take)
            need -= len(take)
            self.offset += len(take)
            if self.offset >= len(order):
                self.epoch, self.offset, self._order = self.epoch + 1, 0, None
        index = np.concatenate(picked)
        tokens, labels = self.tokens[index], self.labels[index]
        if self.flip_resolution is not None:
            from igpt_core.classifier import random_flip  # heavy: torch

            tokens, _ = random_flip(tokens, self.flip_resolution, seed=[self.seed, *start, self.rank])
        return tokens, labels
