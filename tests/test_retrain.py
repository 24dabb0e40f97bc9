"""Retraining decisions (igpt_core.retrain) as plain functions, without Prefect or MLflow: the watched
folder, which batches are new, the base step, drift, the palette's quantization error."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from igpt_core.palette import Palette
from igpt_core.retrain import (
    NEW_DATA_TAG,
    base_step,
    consumed_digests,
    list_batches,
    new_batches,
    publish_batches,
    quantization_mse,
    refit_decision,
    watched_folder,
)
from igpt_core.split import write_npz


def test_watched_folder_defaults_to_incoming_in_the_workspace(tmp_path):
    assert watched_folder(None, tmp_path) == tmp_path / "incoming"
    assert watched_folder(str(tmp_path / "w"), "elsewhere") == (tmp_path / "w").resolve()


def test_a_batch_is_new_until_a_version_lists_its_digest():
    tags = [{NEW_DATA_TAG: json.dumps(["a", "b"])}, {"igpt.step": "6"}, {NEW_DATA_TAG: json.dumps(["c"])}]
    consumed = consumed_digests(tags)
    assert consumed == {"a", "b", "c"}
    found = {"/w/one": "a", "/w/two": "d", "/w/three": "c"}
    assert new_batches(found, consumed) == {"/w/two": "d"}
    assert new_batches(found, set()) == found


def test_base_step_prefers_the_checkpoint_then_the_version_tag():
    assert base_step({"step": 6}, {"igpt.step": "9"}) == 6
    assert base_step({}, {"igpt.step": "9"}) == 9
    assert base_step({}, {}) == 0


def test_refit_decision_asked_drift_or_no():
    assert refit_decision(0.1, 0.1, refit=True, threshold=1.5).reason == "asked"
    drift = refit_decision(0.3, 0.1, refit=False, threshold=1.5)
    assert drift.reason == "drift" and drift.refit and drift.ratio == pytest.approx(3.0)
    keep = refit_decision(0.12, 0.1, refit=False, threshold=1.5)
    assert keep.reason == "no" and not keep.refit
    unknown = refit_decision(0.5, float("nan"), refit=False, threshold=1.5)
    assert unknown.reason == "no" and math.isnan(unknown.ratio)  # no recorded baseline: never drift
    assert math.isnan(refit_decision(0.5, 0.0, refit=False, threshold=1.5).ratio)


def test_quantization_mse_is_zero_on_palette_colours_and_grows_off_them(tmp_path):
    palette = Palette(np.array([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]], np.float32))
    exact = np.zeros((3, 4, 4, 3), np.uint8)
    exact[1] = 255
    grey = np.full((3, 4, 4, 3), 128, np.uint8)
    on = write_npz(tmp_path / "on.npz", exact, None)
    off = write_npz(tmp_path / "off.npz", grey, None)
    assert quantization_mse(palette, str(on), 4) == pytest.approx(0.0, abs=1e-12)
    assert quantization_mse(palette, str(off), 4) == pytest.approx(
        (1 - (128 / 127.5 - 1)) ** 2, rel=1e-5
    )  # nearest: white


def test_publish_batches_names_by_content_and_skips_partial_copies(tmp_path):
    folder = tmp_path / "new"
    (folder / "3").mkdir(parents=True)
    (folder / "3" / "a.png").write_bytes(b"x")
    loose = tmp_path / "b.png"
    loose.write_bytes(b"y")
    watch, names = publish_batches([folder, loose], tmp_path / "incoming")
    assert watch == (tmp_path / "incoming").resolve()
    assert [p.name for p in list_batches(watch)] == sorted(names)
    assert names[0].startswith("new-") and names[1].startswith("images-")
    (watch / ".half.partial").mkdir()  # a batch still being copied in
    assert len(list_batches(watch)) == 2
    assert publish_batches([folder, loose], watch)[1] == names
    assert list_batches(Path(tmp_path / "absent")) == []
