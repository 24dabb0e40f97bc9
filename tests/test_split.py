"""The deterministic held-out split (igpt_core.split): membership by key hash, reproducible .npz bytes,
and split_source's counts and labels."""

from __future__ import annotations

import numpy as np
import pytest

from igpt_core.sources import SourceError
from igpt_core.split import is_heldout, split_source, write_npz


def test_heldout_split_is_by_key_and_npz_bytes_are_reproducible(tmp_path):
    keys = [f"digits:{i}" for i in range(2000)]
    held = [k for k in keys if is_heldout(k, 0.2)]
    assert held == [k for k in keys if is_heldout(k, 0.2)]  # the same on every call
    assert 300 < len(held) < 500
    assert set(held) <= {k for k in keys if is_heldout(k, 0.5)}  # a larger fraction only adds keys
    images = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    first = write_npz(tmp_path / "a.npz", images, np.array([0, 1])).read_bytes()
    second = write_npz(tmp_path / "b.npz", images, np.array([0, 1])).read_bytes()
    assert first == second
    with np.load(tmp_path / "a.npz", allow_pickle=False) as loaded:
        assert (loaded["x"] == images).all() and loaded["y"].tolist() == [0, 1]


def test_split_source_puts_each_key_on_one_side_and_keeps_labels(tmp_path):
    images = np.arange(40 * 4 * 4 * 3, dtype=np.uint8).reshape(40, 4, 4, 3)
    labels = np.arange(40, dtype=np.int64) % 3
    src = write_npz(tmp_path / "src.npz", images, labels)
    out = tmp_path / "out"
    out.mkdir()
    counts = split_source(str(src), out, fraction=0.3, resolution=4)
    assert counts["train"] + counts["heldout"] == 40 and counts["rejected"] == 0
    with np.load(out / "train.npz") as train, np.load(out / "heldout.npz") as held:
        assert len(train["x"]) == counts["train"] and len(held["x"]) == counts["heldout"]
        assert set(train["y"].tolist()) | set(held["y"].tolist()) <= {0, 1, 2}
    first = (out / "heldout.npz").read_bytes()
    split_source(str(src), out, fraction=0.3, resolution=4)
    assert (out / "heldout.npz").read_bytes() == first  # same keys, same bytes


def test_split_source_refuses_an_empty_side(tmp_path):
    src = write_npz(tmp_path / "one.npz", np.zeros((1, 4, 4, 3), np.uint8), None)
    with pytest.raises(SourceError, match="no images left"):
        split_source(str(src), tmp_path, fraction=0.01, resolution=4)
