"""Linear probe: C selection, baselines, the layer sweep, errors and its subsets, on tiny models and synthetic data."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from igpt_core.config import ModelConfig, ProbeConfig
from igpt_core.features import ProbeError
from igpt_core.probe import (
    _split_train,
    _take,
    fit_linear_probe,
    format_probe_table,
    probe_arrays,
    run_probe,
)

SIDE = 8
COLOURS = 16
N_LAYER = 3
C_GRID = (0.01, 0.1, 1.0)


def _centers() -> np.ndarray:
    corners = np.array([[r, g, b] for r in (-1, 1) for g in (-1, 1) for b in (-1, 1)], dtype=np.float32)
    return np.concatenate([corners, corners * 0.4]).astype(np.float32)


def _colour_classes(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Images whose class is their dominant hue (red, green, blue), with 30% of pixels random noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, size=count)
    images = rng.integers(0, 256, size=(count, SIDE, SIDE, 3), dtype=np.uint8)
    base = np.zeros((count, SIDE, SIDE, 3), dtype=np.uint8)
    base[np.arange(count), :, :, labels] = 230
    keep = rng.random((count, SIDE, SIDE, 1)) < 0.7
    return np.where(keep, base, images).astype(np.uint8), labels


@pytest.fixture(scope="module")
def palette():
    from igpt_core.palette import Palette

    return Palette(centers=_centers())


@pytest.fixture(scope="module")
def data(palette) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    train_images, train_labels = _colour_classes(80, seed=0)
    test_images, test_labels = _colour_classes(40, seed=1)
    return {
        "train": (palette.quantize(train_images), train_labels),
        "test": (palette.quantize(test_images), test_labels),
    }


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, palette) -> Path:
    import torch

    from igpt_core.model import ImageGPT

    folder = tmp_path_factory.mktemp("probe-ckpt")
    torch.manual_seed(1)
    ImageGPT(ModelConfig(vocab_size=COLOURS, resolution=SIDE, n_layer=N_LAYER, n_head=2, n_embd=32)).save(
        folder
    )
    palette.save(folder, {"test": True})
    return folder


# --- logistic regression and baselines: no model needed ------------------------------------------------


def test_raw_pixels_separate_colour_classes_and_shuffled_labels_do_not() -> None:
    train_images, train_labels = _colour_classes(90, seed=3)
    test_images, test_labels = _colour_classes(60, seed=4)
    train_x = train_images.reshape(90, -1).astype(np.float32) / 127.5 - 1
    test_x = test_images.reshape(60, -1).astype(np.float32) / 127.5 - 1
    fit_index, val_index = _split_train(train_labels, 0.2, seed=0)
    fit = fit_linear_probe(
        train_x, train_labels, test_x, test_labels, fit_index=fit_index, val_index=val_index, c_grid=C_GRID
    )
    assert fit["accuracy"]["test"] >= 0.95
    assert fit["C"] in C_GRID and set(fit["val_by_C"]) == {str(c) for c in C_GRID}
    assert fit["feature_dim"] == SIDE * SIDE * 3
    # The same features with labels unrelated to them must not score like that: the check can fail.
    shuffled = np.random.default_rng(5).permutation(test_labels)
    chance = fit_linear_probe(
        train_x,
        np.random.default_rng(6).permutation(train_labels),
        test_x,
        shuffled,
        fit_index=fit_index,
        val_index=val_index,
        c_grid=C_GRID,
    )
    assert chance["accuracy"]["test"] < 0.7


def test_c_is_chosen_on_validation_and_ties_go_to_the_smaller_c() -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 40)
    features = labels[:, None] * 10.0 + rng.normal(size=(80, 4))  # trivially separable: every C scores 1.0
    fit_index, val_index = _split_train(labels, 0.25, seed=0)
    fit = fit_linear_probe(
        features, labels, features, labels, fit_index=fit_index, val_index=val_index, c_grid=(10.0, 0.1, 1.0)
    )
    assert fit["C"] == 0.1
    assert fit["accuracy"] == {"train": 1.0, "val": 1.0, "test": 1.0}


def test_fits_along_c_from_the_previous_solution_reach_the_fits_from_scratch() -> None:
    """Warm starts change where L-BFGS begins, not the optimum: run to convergence, every C's validation
    accuracy, the chosen C and the refit's scores equal independent scikit-learn pipelines'."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(3)
    labels = rng.integers(0, 3, size=600)
    features = rng.normal(size=(600, 12)) + 0.6 * np.eye(3, 12)[labels] * rng.normal(1, 0.5, (600, 1))
    test_x, test_y = features[:150], labels[:150]
    train_x, train_y = features[150:], labels[150:]
    fit_index, val_index = _split_train(train_y, 0.2, seed=0)
    grid = (0.001, 0.01, 0.1, 1.0)
    fit = fit_linear_probe(
        train_x, train_y, test_x, test_y, fit_index=fit_index, val_index=val_index, c_grid=grid, max_iter=5000
    )

    def scratch(c: float):  # type: ignore[no-untyped-def]
        return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000, tol=1e-8))

    for c in grid:
        clf = scratch(c).fit(train_x[fit_index], train_y[fit_index])
        assert fit["val_by_C"][str(c)] == pytest.approx(
            clf.score(train_x[val_index], train_y[val_index]), abs=1e-9
        )
    assert all(n < 5000 for n in fit["iterations"]["by_C"].values())  # converged, not capped
    refit = scratch(fit["C"]).fit(train_x, train_y)
    assert fit["accuracy"]["test"] == pytest.approx(refit.score(test_x, test_y), abs=1e-9)
    assert fit["accuracy"]["train"] == pytest.approx(refit.score(train_x, train_y), abs=1e-9)


def test_max_iter_caps_every_fit_and_is_recorded() -> None:
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 4, size=400)
    features = rng.normal(size=(400, 30)) + np.eye(4, 30)[labels]
    fit_index, val_index = _split_train(labels, 0.25, seed=0)

    def fit(grid: tuple[float, ...], max_iter: int) -> dict:  # type: ignore[type-arg]
        return fit_linear_probe(
            features,
            labels,
            features,
            labels,
            fit_index=fit_index,
            val_index=val_index,
            c_grid=grid,
            max_iter=max_iter,
        )

    assert fit((1.0, 100.0), 3)["iterations"] == {"by_C": {"1.0": 3, "100.0": 3}, "refit": 3, "max_iter": 3}
    with pytest.raises(ProbeError, match="max_iter: must be positive, got 0"):
        fit((1.0,), 0)
    with pytest.raises(ValueError, match="max_iter"):
        ProbeConfig(max_iter=0)


def test_validation_split_is_stratified_and_disjoint() -> None:
    labels = np.repeat([0, 1, 2], [50, 30, 20])
    fit_index, val_index = _split_train(labels, 0.1, seed=0)
    assert len(val_index) == 10 and len(fit_index) == 90
    assert not set(fit_index) & set(val_index)
    assert np.bincount(labels[val_index]).tolist() == [5, 3, 2]


# --- with a model -----------------------------------------------------------------------------------------


def test_run_probe_reports_all_three_accuracies_and_writes_files(
    checkpoint: Path, data, tmp_path: Path
) -> None:
    config = ProbeConfig(layer=1, c_grid=C_GRID, val_fraction=0.25, batch_size=32)
    result = run_probe(checkpoint, data["train"], data["test"], config, out_dir=tmp_path)
    assert result["layer"] == 1 and result["C"] in C_GRID
    assert result["counts"] == {"train": 80, "fit": 60, "val": 20, "test": 40, "classes": 3}
    assert result["feature_dim"] == 32
    for fit in (result, result["baselines"]["random_init"], result["baselines"]["raw_pixels"]):
        assert set(fit["accuracy"]) == {"train", "val", "test"}
        assert all(0.0 <= acc <= 1.0 for acc in fit["accuracy"].values())
        assert fit["C"] in C_GRID
    assert result["baselines"]["raw_pixels"]["feature_dim"] == SIDE * SIDE * 3
    # Colour classes survive the 16-colour palette: the raw-pixel baseline must see them.
    assert result["baselines"]["raw_pixels"]["accuracy"]["test"] >= 0.9
    assert result["per_layer"] is None
    saved = json.loads((tmp_path / "probe.json").read_text())
    assert saved["accuracy"] == result["accuracy"] and saved["baselines"] == result["baselines"]
    table = (tmp_path / "probe.md").read_text()
    assert "random init" in table and "raw pixels" in table and f"{result['accuracy']['test']:.4f}" in table


def test_layer_sweep_has_one_row_per_layer_and_picks_the_best(checkpoint: Path, data) -> None:
    from igpt_core.model import ImageGPT
    from igpt_core.palette import Palette

    pair = (ImageGPT.load(checkpoint), Palette.load(checkpoint))
    config = ProbeConfig(layer="all", c_grid=C_GRID, val_fraction=0.25)
    result = probe_arrays(*pair, data["train"], data["test"], config)
    assert [row["layer"] for row in result["per_layer"]] == list(range(N_LAYER))
    best_val = max(row["accuracy"]["val"] for row in result["per_layer"])
    assert result["accuracy"]["val"] == best_val
    chosen = next(row for row in result["per_layer"] if row["layer"] == result["layer"])
    assert chosen["accuracy"] == result["accuracy"]
    assert result["baselines"]["random_init"]["layer"] == result["layer"]
    assert format_probe_table(result).count("(best)") == 1


def test_unlabelled_data_is_refused_with_its_name(checkpoint: Path, data) -> None:
    with pytest.raises(ProbeError, match="train.*no labels"):
        run_probe(checkpoint, (data["train"][0], None), data["test"], ProbeConfig(), out_dir=None)  # type: ignore[arg-type]


def test_unlabelled_shards_are_refused_naming_the_path(
    checkpoint: Path, tmp_path: Path, palette, ray_local
) -> None:
    from igpt_core.tokens import tokenize

    images, _ = _colour_classes(6, seed=9)
    shards = tmp_path / "unlabelled"
    tokenize(images, palette, shards, resolution=SIDE, progress=False)
    with pytest.raises(ProbeError, match=str(shards)):
        run_probe(checkpoint, shards, shards, ProbeConfig(), out_dir=tmp_path / "out")


def test_one_folder_with_two_splits_serves_train_and_test(
    checkpoint: Path, tmp_path: Path, palette, ray_local
) -> None:
    from igpt_core.sample import complete_images
    from igpt_core.sources import open_source
    from igpt_core.tokens import tokenize

    shards = tmp_path / "shards"
    train_images, train_labels = _colour_classes(40, seed=10)
    test_images, test_labels = _colour_classes(12, seed=11)
    tokenize(
        open_source(train_images, labels=train_labels),
        palette,
        shards,
        resolution=SIDE,
        split="train",
        progress=False,
    )
    tokenize(
        open_source(test_images, labels=test_labels),
        palette,
        shards,
        resolution=SIDE,
        split="test",
        progress=False,
    )
    config = ProbeConfig(c_grid=C_GRID, val_fraction=0.25)
    result = run_probe(checkpoint, shards, shards, config, out_dir=tmp_path / "probe")
    assert (result["counts"]["train"], result["counts"]["test"]) == (40, 12)
    # Completing from the folder draws on its held-out split, not on training images.
    originals, _ = complete_images(checkpoint, shards, n=2, seed=0)
    np.testing.assert_array_equal(originals, palette.dequantize(palette.quantize(test_images[:2]), SIDE))


def test_single_class_is_refused(checkpoint: Path, data) -> None:
    tokens, labels = data["train"]
    with pytest.raises(ProbeError, match="two classes"):
        run_probe(
            checkpoint,
            (tokens, np.zeros_like(labels)),
            data["test"],
            ProbeConfig(c_grid=C_GRID),
            out_dir=None,
        )


# --- subsets on a class-sorted source: stratified samples, not prefixes ----------------------------------


def _sorted_classes(per_class: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Images of `classes` colour classes (the palette's corners), class after class like a folder of
    class folders; 30% of pixels noise."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), per_class)
    corners = ((_centers()[:8] + 1) * 127.5).astype(np.uint8)  # (8, 3): 0 or 255 per channel
    base = np.broadcast_to(corners[labels][:, None, None, :], (len(labels), SIDE, SIDE, 3))
    noise = rng.integers(0, 256, size=base.shape, dtype=np.uint8)
    keep = rng.random((len(labels), SIDE, SIDE, 1)) < 0.7
    return np.where(keep, base, noise).astype(np.uint8), labels


@pytest.fixture(scope="module")
def sorted_data(palette) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Train: 6 classes x 12, test: 8 classes x 4 (classes 6 and 7 never in train), both class-sorted."""
    train_images, train_labels = _sorted_classes(12, 6, seed=20)
    test_images, test_labels = _sorted_classes(4, 8, seed=21)
    return {
        "train": (palette.quantize(train_images), train_labels),
        "test": (palette.quantize(test_images), test_labels),
    }


@pytest.fixture(scope="module")
def sorted_shards(sorted_data, palette, tmp_path_factory: pytest.TempPathFactory, ray_local) -> Path:
    from igpt_core.sources import open_source
    from igpt_core.tokens import tokenize

    shards = tmp_path_factory.mktemp("sorted") / "shards"
    for split, (tokens, labels) in sorted_data.items():
        images = palette.dequantize(tokens, SIDE)
        tokenize(
            open_source(images, labels=labels), palette, shards, resolution=SIDE, split=split, progress=False
        )
    return shards


def test_max_train_and_max_test_take_every_class_in_proportion_from_sorted_shards(
    checkpoint: Path, sorted_shards: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from igpt_core.data import load_tokens

    # the shards are class-sorted: a prefix of 24 holds two of the six train classes
    assert np.unique(load_tokens(sorted_shards, split="train", limit=24)[1]).tolist() == [0, 1]
    config = ProbeConfig(c_grid=C_GRID, val_fraction=0.25, max_train=24, max_test=16)
    with caplog.at_level(logging.WARNING, logger="igpt_core.probe"):
        result = run_probe(checkpoint, sorted_shards, sorted_shards, config, out_dir=tmp_path)
    assert result["counts"] == {"train": 24, "fit": 18, "val": 6, "test": 16, "classes": 6}
    saved = json.loads((tmp_path / "probe.json").read_text())
    for recorded in (result, saved):
        per_class = recorded["class_counts"]
        assert per_class["train"] == {str(c): 4 for c in range(6)}
        assert per_class["test"] == {str(c): 2 for c in range(8)}
        assert sum(per_class["fit"].values()) == 18 and set(per_class["fit"]) == set(per_class["train"])
        assert sum(per_class["val"].values()) == 6 and set(per_class["val"].values()) == {1}
        assert recorded["absent_from_train"] == [6, 7]
        assert recorded["subsets"] == {
            "train": {"of": 72, "kept": 24},
            "test": {"of": 32, "kept": 16},
            "seed": 0,
        }
    # reported up front (logged before the features) and at the head of the table
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("2 of 8 test classes never occur in train (6, 7)" in m for m in warned)
    table = (tmp_path / "probe.md").read_text()
    assert table.startswith("Warning: 2 of 8 test classes never occur in train (6, 7); their 4 of 16")
    assert (
        "Linear probe: 24 of 72 train (18 fit + 6 val), 16 of 32 test, 6 classes; samples stratified" in table
    )


def test_the_same_seed_takes_the_same_subset_and_another_seed_another(sorted_data) -> None:
    tokens, labels = sorted_data["train"]
    first = _take("train", "max_train", tokens, labels, 18, seed=3)
    again = _take("train", "max_train", tokens, labels, 18, seed=3)
    other = _take("train", "max_train", tokens, labels, 18, seed=4)
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    assert first[2] == {"of": 72, "kept": 18}
    assert np.bincount(first[1]).tolist() == [3] * 6 == np.bincount(other[1]).tolist()
    assert not np.array_equal(first[0], other[0])  # same counts, other members
    assert _take("train", "max_train", tokens, labels, None, seed=3)[0] is tokens  # nothing to sample


def test_in_memory_probe_samples_the_same_way_and_repeats_exactly(checkpoint: Path, sorted_data) -> None:
    config = ProbeConfig(c_grid=C_GRID, val_fraction=0.25, max_train=24, max_test=16, layer=1)
    first = run_probe(checkpoint, sorted_data["train"], sorted_data["test"], config, out_dir=None)
    again = run_probe(checkpoint, sorted_data["train"], sorted_data["test"], config, out_dir=None)
    assert first["class_counts"]["train"] == {str(c): 4 for c in range(6)}
    for key in ("accuracy", "baselines", "class_counts", "subsets", "counts"):
        assert first[key] == again[key]


def test_a_train_sample_of_one_class_is_refused_naming_the_option(checkpoint: Path, sorted_data) -> None:
    with pytest.raises(ProbeError, match=r"^max_train: a sample of 1 train images holds only class \[\d\]"):
        run_probe(
            checkpoint, sorted_data["train"], sorted_data["test"], ProbeConfig(max_train=1), out_dir=None
        )
    with pytest.raises(ProbeError, match="^max_test: must be positive, got 0"):
        run_probe(
            checkpoint, sorted_data["train"], sorted_data["test"], ProbeConfig(max_test=0), out_dir=None
        )
    tokens, labels = sorted_data["train"]
    with pytest.raises(ProbeError, match=r"^train: needs at least two classes, got only \[0\]"):
        run_probe(checkpoint, (tokens[:12], labels[:12]), sorted_data["test"], ProbeConfig(), out_dir=None)


def test_no_absent_classes_means_no_warning(checkpoint: Path, sorted_data) -> None:
    tokens, labels = sorted_data["test"]
    known = labels < 6
    config = ProbeConfig(c_grid=C_GRID, val_fraction=0.25, layer=0)
    result = run_probe(checkpoint, sorted_data["train"], (tokens[known], labels[known]), config, out_dir=None)
    assert result["absent_from_train"] == []
    assert format_probe_table(result).startswith(
        "Linear probe: 72 train (54 fit + 18 val), 24 test, 6 classes"
    )


def test_cli_prints_absent_classes_before_the_table_and_names_the_flag(
    checkpoint: Path, sorted_shards: Path, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from igpt_core.cli import app

    args = [
        "probe",
        "--checkpoint",
        str(checkpoint),
        "--train",
        str(sorted_shards),
        "--test",
        str(sorted_shards),
    ]
    done = CliRunner().invoke(app, [*args, "--max-train", "24", "--max-test", "16", "--out", str(tmp_path)])
    assert done.exit_code == 0, done.output
    # the counts after subsetting are said first, before any feature is extracted or classifier fitted
    plan = done.stdout.index(
        "probe: 24 (a stratified sample of 72) train images (22 fit + 2 val), "
        "16 (a stratified sample of 32) test images, 6 classes; features of layer 1"
    )
    warning = done.stdout.index("Warning: 2 of 8 test classes never occur in train (6, 7)")
    assert plan < warning < done.stdout.index("| features |")
    assert "features train" in done.stderr and "fits raw pixels" in done.stderr  # the progress bars
    refused = CliRunner().invoke(app, [*args, "--max-train", "1", "--out", str(tmp_path / "refused")])
    assert refused.exit_code == 2
    assert "igpt: error: --max-train: a sample of 1 train images holds only class" in refused.stderr
    assert not (tmp_path / "refused" / "probe.json").exists()
