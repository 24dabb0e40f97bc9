"""Stratified subsets on a class-sorted split (the layout every folder-of-class-folders source has)."""

from __future__ import annotations

import numpy as np
import pytest

from igpt_core.subsets import (
    SubsetError,
    absent_note,
    allocate,
    carve_validation,
    check_classes,
    class_counts,
    stratified_sample,
    take_rows,
)

# Tiny-ImageNet's train split as tokenize writes it: 200 classes x 500 images, class after class
SORTED = np.repeat(np.arange(200), 500)


def test_a_prefix_would_hold_20_classes_the_sample_holds_all_200():
    assert len(np.unique(SORTED[:10_000])) == 20  # what `--max-train 10000` took before
    index = stratified_sample(SORTED, 10_000, seed=0)
    assert len(index) == 10_000 and np.all(np.diff(index) > 0)  # sorted, no repeats
    counts = class_counts(SORTED[index])
    assert len(counts) == 200 and set(counts.values()) == {50}


@pytest.mark.parametrize("n", [201, 1234, 9_999, 10_007, 99_999])
def test_counts_are_within_one_of_proportional(n):
    index = stratified_sample(SORTED, n, seed=3)
    assert len(index) == n == len(np.unique(index))
    counts = np.array(list(class_counts(SORTED[index]).values()))
    assert len(counts) == 200
    assert np.all(np.abs(counts - n / 200) < 1)


def test_unbalanced_classes_get_proportional_shares_and_at_least_one():
    labels = np.concatenate([np.full(9_000, 7), np.full(900, 2), np.full(90, 5), np.full(10, 1)])
    index = stratified_sample(labels, 1_000, seed=0)
    assert class_counts(labels[index]) == {1: 1, 2: 90, 5: 9, 7: 900}
    # 20 of 10,000 (quotas 0.02, 1.8, 0.18, 18): the two small classes get their one sample, each
    # taken from the class then furthest above its quota
    assert class_counts(labels[stratified_sample(labels, 20, seed=0)]) == {1: 1, 2: 1, 5: 1, 7: 17}


def test_allocation_is_deterministic_and_exact():
    counts = np.array([5, 5, 5])
    assert allocate(counts, 4).tolist() == [2, 1, 1]  # the remainder's tie goes to the smaller label
    assert allocate(counts, 2).tolist() == [1, 1, 0]  # fewer samples than classes: not all present
    assert allocate(np.array([3, 1]), 4).tolist() == [3, 1]
    assert allocate(np.array([10, 10]), 6, upper=np.array([9, 2])).tolist() == [4, 2]
    with pytest.raises(SubsetError, match="n: must be in"):
        allocate(counts, 16)


def test_the_sample_is_seeded_and_spread_within_each_class():
    same = stratified_sample(SORTED, 2_000, seed=5)
    assert np.array_equal(same, stratified_sample(SORTED, 2_000, seed=5))
    assert not np.array_equal(same, stratified_sample(SORTED, 2_000, seed=6))
    # members are drawn from the whole class, not its first images
    offsets = same % 500
    assert offsets.min() < 50 and offsets.max() > 450


def test_everything_when_n_covers_the_split():
    labels = np.array([3, 1, 3, 2])
    assert stratified_sample(labels, None).tolist() == [0, 1, 2, 3]
    assert stratified_sample(labels, 10).tolist() == [0, 1, 2, 3]
    with pytest.raises(SubsetError, match="n: must be positive"):
        stratified_sample(labels, 0)
    with pytest.raises(SubsetError, match="labels: expected integer"):
        stratified_sample(np.array([0.5, 1.0]), 1)


def test_validation_is_carved_stratified_from_a_sorted_split():
    train, val = carve_validation(SORTED, 0.1, seed=0)
    assert len(val) == 10_000 and len(train) == 90_000
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(len(SORTED)))
    assert set(class_counts(SORTED[val]).values()) == {50}
    again = carve_validation(SORTED, 0.1, seed=0)
    assert np.array_equal(again[1], val)


def test_validation_leaves_every_class_in_train():
    labels = np.array([0] * 10 + [1] + [2] * 3)
    train, val = carve_validation(labels, 0.5, seed=1)
    assert len(val) == 7 and set(class_counts(labels[train])) == {0, 1, 2}
    assert 1 not in class_counts(labels[val])  # its only sample stays in train
    with pytest.raises(SubsetError, match="none to spare"):
        carve_validation(np.array([0, 1, 2]), 0.5)
    with pytest.raises(SubsetError, match="fraction"):
        carve_validation(labels, 1.0)


def test_classes_check_refuses_one_class_and_reports_absent_test_classes():
    assert check_classes(SORTED[:10_000], SORTED) == list(range(20, 200))
    index = stratified_sample(SORTED, 10_000)
    assert check_classes(SORTED[index], SORTED) == []
    with pytest.raises(SubsetError, match="train_labels: needs at least two classes"):
        check_classes(np.zeros(10, np.int64), SORTED)


def test_a_sample_then_its_validation_carve_keep_every_class_in_fit():
    """What the probe does with `max_train` and `val_fraction` on a class-sorted split."""
    index = stratified_sample(SORTED, 1_000, seed=0)
    fit, val = carve_validation(SORTED[index], 0.1, seed=0)
    assert len(fit) == 900 and len(val) == 100
    assert set(class_counts(SORTED[index][fit]).values()) == {4, 5}  # 5 per class, 100 of them give one
    assert len(class_counts(SORTED[index][val])) == 100  # 100 of the 200 classes, one sample each
    assert check_classes(SORTED[index][fit], SORTED) == []


def test_take_rows_keeps_only_the_sample_and_names_the_option_when_it_is_one_class():
    rows = np.arange(len(SORTED) * 2).reshape(len(SORTED), 2)
    kept, labels, record = take_rows(rows, SORTED, 400, seed=1, option="max_train", need_classes=True)
    assert record == {"of": 100_000, "kept": 400} and kept.shape == (400, 2)
    assert np.array_equal(labels, SORTED[kept[:, 0] // 2]) and set(class_counts(labels).values()) == {2}
    assert take_rows(rows, SORTED, None)[0] is rows  # everything kept: nothing copied
    with pytest.raises(SubsetError, match=r"^max_train: a sample of 1 train images holds only class \[\d+\]"):
        take_rows(rows, SORTED, 1, option="max_train", need_classes=True)
    with pytest.raises(SubsetError, match=r"^train: needs at least two classes, got only \[0\]"):
        take_rows(rows[:500], SORTED[:500], 10, option="max_train", need_classes=True)
    with pytest.raises(SubsetError, match="^max_test: must be positive"):
        take_rows(rows, SORTED, 0, split="test", option="max_test")
    assert len(take_rows(rows[:500], SORTED[:500], 10, split="test")[0]) == 10  # one class is a fine test set


def test_absent_note_counts_the_test_images_no_training_class_covers():
    assert absent_note([], {0: 5}) is None
    test = {str(c): 25 for c in range(200)}
    note = absent_note(check_classes(SORTED[:10_000], SORTED), test, {"of": 100_000, "kept": 10_000})
    assert note is not None
    assert note.startswith(
        "180 of 200 test classes never occur in train (20, 21, 22, 23, 24, 25, 26, 27, 28, 29, ...)"
    )
    assert "their 4500 of 5000 test images" in note and note.endswith(
        "(max_train kept 10000 of 100000 train images)"
    )
