"""Subsets that represent the data: seeded samples stratified by class, never a prefix in shard order.

A folder of class folders is tokenized in class order, so the first n samples of a split hold only the
first few classes. Every subset the probe and fine-tuning take (`max_train`, `max_test`, the validation
carve-out) comes from here instead: each class gets its proportional share of the n samples (largest
remainder rounding, ties to the smaller label, so the counts are a function of the labels alone), and
the members of each class are drawn with a seeded permutation. All functions take labels int (N,) and
return sorted int64 indices into them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np


class SubsetError(ValueError):
    """A subset that cannot be drawn or would not represent the data; the message names the argument."""


def _check_labels(labels: np.ndarray, name: str = "labels") -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise SubsetError(f"{name}: expected shape (N,), got {labels.shape}")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise SubsetError(f"{name}: expected integer class ids, got {labels.dtype}")
    return labels.astype(np.int64, copy=False)


def class_counts(labels: np.ndarray) -> dict[int, int]:
    """Samples per class, in class order (what probe.json / finetune.json record for each split)."""
    classes, counts = np.unique(_check_labels(labels), return_counts=True)
    return {int(c): int(k) for c, k in zip(classes, counts, strict=True)}


def allocate(counts: np.ndarray, n: int, upper: np.ndarray | None = None) -> np.ndarray:
    """How many of n samples each class gets: int64 like `counts`, summing to n.

    Proportional to `counts`, rounded by largest remainder (Hamilton), so each share is within 1 of
    n * count / total, never above `upper` (default: the class's count). When n is at least the number
    of classes that can give one, each of them gets at least one; the sample that takes is taken from
    the class furthest above its quota, so only those shares can drift further than 1.
    """
    counts = np.asarray(counts, dtype=np.int64)
    upper = counts.copy() if upper is None else np.minimum(np.asarray(upper, dtype=np.int64), counts)
    if not 0 <= n <= int(upper.sum()):
        raise SubsetError(f"n: must be in [0, {int(upper.sum())}], got {n}")
    quota = n * counts / max(int(counts.sum()), 1)
    share = np.minimum(np.floor(quota).astype(np.int64), upper)
    # the rest, one each to the largest remainders; a class at its cap passes its turn on
    while (rest := n - int(share.sum())) > 0:
        open_ = np.flatnonzero(share < upper)
        by_remainder = open_[np.argsort(-(quota[open_] - share[open_]), kind="stable")]
        share[by_remainder[:rest]] += 1
    absent = np.flatnonzero((share == 0) & (upper > 0))
    if n >= int((upper > 0).sum()):
        for cls in absent:
            donors = np.flatnonzero(share >= 2)
            donor = donors[np.argmax(share[donors] - quota[donors])]  # first of the most over-served
            share[donor] -= 1
            share[cls] = 1
    return share


def _draw(labels: np.ndarray, shares: dict[int, int], seed: int) -> np.ndarray:
    """The first `shares[c]` members of each class c in a seeded permutation, as sorted indices."""
    order = np.random.default_rng(seed).permutation(len(labels))
    by_class = order[np.argsort(labels[order], kind="stable")]  # class by class, random within each
    classes, starts = np.unique(labels[by_class], return_index=True)
    picked = [by_class[start : start + shares[int(c)]] for c, start in zip(classes, starts, strict=True)]
    return np.sort(np.concatenate(picked)) if picked else np.empty(0, np.int64)


def stratified_sample(labels: np.ndarray, n: int | None, seed: int = 0) -> np.ndarray:
    """Sorted indices of a seeded sample of n samples, stratified by class over the whole split.

    n None or at least len(labels) keeps everything (np.arange). Each class gets its proportional
    share (see `allocate`); when n is at least the number of classes, every class is present.
    """
    labels = _check_labels(labels)
    if n is None or n >= len(labels):
        return np.arange(len(labels), dtype=np.int64)
    if n < 1:
        raise SubsetError(f"n: must be positive, got {n}")
    classes, counts = np.unique(labels, return_counts=True)
    shares = allocate(counts, n)
    return _draw(labels, dict(zip(classes.tolist(), shares.tolist(), strict=True)), seed)


def carve_validation(labels: np.ndarray, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) sorted indices: a stratified, seeded share `fraction` of the samples held out.

    The validation size is round(fraction * N), at least 1; every class keeps at least one training
    sample (a class seen once stays in train), and every class that can spare one is in validation
    when the size allows it.
    """
    labels = _check_labels(labels)
    if not 0.0 < fraction < 1.0:
        raise SubsetError(f"fraction: must be in (0, 1), got {fraction}")
    classes, counts = np.unique(labels, return_counts=True)
    spare = counts - 1  # what each class can give without leaving train
    if spare.sum() < 1:
        raise SubsetError(f"labels: {len(labels)} samples, none to spare for validation (one per class)")
    n_val = min(max(1, round(fraction * len(labels))), int(spare.sum()))
    shares = allocate(counts, n_val, upper=spare)
    val = _draw(labels, dict(zip(classes.tolist(), shares.tolist(), strict=True)), seed)
    return np.setdiff1d(np.arange(len(labels)), val), val


def check_classes(train_labels: np.ndarray, test_labels: np.ndarray | None = None) -> list[int]:
    """Refuses a train subset with fewer than two classes; returns the test classes absent from train.

    The caller reports the returned classes up front (a test class never seen in training can only be
    misclassified) and decides whether that is fatal.
    """
    train = np.unique(_check_labels(train_labels, "train_labels"))
    if len(train) < 2:
        raise SubsetError(f"train_labels: needs at least two classes, got {train.tolist()}")
    if test_labels is None:
        return []
    test = np.unique(_check_labels(test_labels, "test_labels"))
    return [int(c) for c in np.setdiff1d(test, train)]


def take_rows(
    rows: np.ndarray,
    labels: np.ndarray,
    n: int | None,
    seed: int = 0,
    *,
    split: str = "train",
    option: str = "n",
    need_classes: bool = False,
) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """The rows and labels of `stratified_sample(labels, n, seed)`, and {"of": N, "kept": n}.

    Only the chosen rows are copied (none when all are kept), so a caller that rebinds its names holds
    the sample alone. With `need_classes` (a train split) a split with fewer than two classes is refused
    naming `split`, and a sample with fewer naming `option` (the setting that chose n).
    """
    labels = _check_labels(labels)
    if n is not None and n < 1:
        raise SubsetError(f"{option}: must be positive, got {n}")
    whole = np.unique(labels)
    if need_classes and len(whole) < 2:
        raise SubsetError(f"{split}: needs at least two classes, got only {whole.tolist()}")
    index = stratified_sample(labels, n, seed)
    record = {"of": len(labels), "kept": len(index)}
    if len(index) < len(labels):
        rows, labels = rows[index], labels[index]
    if need_classes and len(kept := np.unique(labels)) < 2:
        raise SubsetError(
            f"{option}: a sample of {len(labels)} {split} images holds only class {kept.tolist()} of the "
            f"split's {len(whole)}; at least two classes are needed"
        )
    return rows, labels, record


def absent_note(
    absent: list[int],
    test_counts: Mapping[Any, int],
    train_taken: Mapping[str, int] | None = None,
    option: str = "max_train",
) -> str | None:
    """One line on the test classes absent from train and the test images they hold (None when none).

    `test_counts` maps class (int or its string) to count; `train_taken` is `take_rows`'s record of the
    train sample, named by `option` when it kept fewer images than the split has.
    """
    if not absent:
        return None
    by_class = {str(c): k for c, k in test_counts.items()}
    images = sum(by_class[str(c)] for c in absent)
    shown = ", ".join(map(str, absent[:10])) + (", ..." if len(absent) > 10 else "")
    note = (
        f"{len(absent)} of {len(by_class)} test classes never occur in train ({shown}); "
        f"their {images} of {sum(by_class.values())} test images can only be misclassified"
    )
    if train_taken and train_taken["kept"] < train_taken["of"]:
        note += f" ({option} kept {train_taken['kept']} of {train_taken['of']} train images)"
    return note
