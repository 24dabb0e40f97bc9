"""Linear probe: how much a pretrained model knows about image classes, next to two baselines.

The feature of an image (`features.extract_features`) is the input of block l's attention, averaged over
positions. A standardised logistic regression is fitted on it; its strength C is chosen on a validation
split carved from train, then refitted on the whole train split and scored on test. The same procedure
runs, in the same call and on the same split, on raw pixels and on the same architecture at random
initialisation, so the headline number always comes with what it should beat.

Every subset the probe takes (`max_train`, `max_test`, the validation carve-out) is a seeded sample
stratified by class over the whole split (`igpt_core.subsets`), never a prefix in shard order: a folder of
class folders is tokenized class after class, so a prefix would hold only its first classes. The count per
class of each split is in the result, and test classes that never occur in train are reported up front.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np
from tqdm import tqdm

from igpt_core.checkpoint import read_config
from igpt_core.config import ProbeConfig, to_dict
from igpt_core.data import load_tokens
from igpt_core.features import ProbeError, extract_features, pixel_features, resolve_layers
from igpt_core.sample import Checkpoint, load_checkpoint, pick_split
from igpt_core.subsets import (
    SubsetError,
    absent_note,
    carve_validation,
    check_classes,
    class_counts,
    take_rows,
)

if TYPE_CHECKING:
    from igpt_core.model import ImageGPT
    from igpt_core.palette import Palette

ProbeData: TypeAlias = str | os.PathLike | tuple[np.ndarray, np.ndarray]
"""A labelled token shard folder, or in-memory (tokens uint16 (N, R*R), labels int (N,))."""

logger = logging.getLogger(__name__)


def _split_train(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted indices (fit, val): a seeded validation share stratified by class (`carve_validation`).

    Every class keeps at least one fitting sample, so the fit split has every class of train.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ProbeError(f"val_fraction: must be in (0, 1), got {val_fraction}")
    try:
        return carve_validation(labels, val_fraction, seed)
    except SubsetError as error:
        raise ProbeError(
            f"train: {len(labels)} samples, one per class, leave none for the validation split that "
            "chooses C; the probe needs a class with at least two samples"
        ) from error


def _take(
    name: str, option: str, tokens: np.ndarray, labels: np.ndarray, n: int | None, seed: int
) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """`subsets.take_rows` with its errors as ProbeErrors (a train split or sample needs two classes)."""
    try:
        return take_rows(tokens, labels, n, seed, split=name, option=option, need_classes=name == "train")
    except SubsetError as error:
        raise ProbeError(str(error)) from error


def _counts(labels: np.ndarray) -> dict[str, int]:
    """Samples per class with string keys, so the result and its probe.json read the same."""
    return {str(c): k for c, k in class_counts(labels).items()}


def absent_classes_note(result: dict[str, Any]) -> str | None:
    """One line on the test classes of a probe result that never occur in train (None when there are none)."""
    train = result.get("subsets", {}).get("train")
    return absent_note(result.get("absent_from_train") or [], result["class_counts"]["test"], train)


def fit_linear_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    *,
    fit_index: np.ndarray,
    val_index: np.ndarray,
    c_grid: tuple[float, ...],
    seed: int = 0,
    max_iter: int = 100,
    progress: bool = False,
    desc: str = "fits",
) -> dict[str, Any]:
    """Chooses C on (fit, val), refits on all of train with it, and scores train, val and test.

    Features are standardised (scikit-learn's StandardScaler, fitted on the rows each fit uses) and
    classified by L2-regularised multinomial logistic regression (L-BFGS, at most `max_iter` iterations a
    fit). The values of C are fitted from the strongest regularisation up, each starting from the previous
    solution, and the refit starts from the chosen C's: one standardisation of the fit rows serves every C.
    Ties in validation accuracy go to the smaller C (the stronger regularisation). The features are given
    once and serve every C. `progress` shows a bar of the len(c_grid) + 1 fits.
    """
    from sklearn.exceptions import ConvergenceWarning  # heavy: sklearn
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if max_iter < 1:
        raise ProbeError(f"max_iter: must be positive, got {max_iter}")
    val_by_c: dict[float, float] = {}
    iterations: dict[float, int] = {}
    solutions: dict[float, tuple[np.ndarray, np.ndarray]] = {}
    with (
        warnings.catch_warnings(),
        tqdm(total=len(c_grid) + 1, desc=desc, unit="fit", disable=not progress, leave=False) as bar,
    ):
        # A fit that stops at max_iter still counts (its iterations are in the result); the warning is noise.
        warnings.simplefilter("ignore", ConvergenceWarning)
        scaler = StandardScaler().fit(train_x[fit_index])
        fit_x, val_x = scaler.transform(train_x[fit_index]), scaler.transform(train_x[val_index])
        fit_y = train_y[fit_index]
        path = LogisticRegression(max_iter=max_iter, random_state=seed, warm_start=True)
        for c in sorted(c_grid):
            path.set_params(C=c).fit(fit_x, fit_y)
            val_by_c[c] = float(path.score(val_x, train_y[val_index]))
            iterations[c] = int(np.max(path.n_iter_))
            solutions[c] = (path.coef_.copy(), path.intercept_.copy())
            bar.update(1)
        del fit_x, val_x
        best_c = max(sorted(val_by_c), key=lambda c: (val_by_c[c], -c))
        final = LogisticRegression(C=best_c, max_iter=max_iter, random_state=seed, warm_start=True)
        final.coef_, final.intercept_ = solutions[best_c]  # the start: best C's solution on the fit rows
        refit = make_pipeline(StandardScaler(), final).fit(train_x, train_y)
        bar.update(1)
    return {
        "C": best_c,
        "val_by_C": {str(c): acc for c, acc in val_by_c.items()},
        "accuracy": {
            "train": float(refit.score(train_x, train_y)),
            "val": val_by_c[best_c],
            "test": float(refit.score(test_x, test_y)),
        },
        "feature_dim": int(train_x.shape[1]),
        "iterations": {
            "by_C": {str(c): n for c, n in iterations.items()},
            "refit": int(np.max(final.n_iter_)),
            "max_iter": max_iter,
        },
    }


def _random_init_model(model: ImageGPT, seed: int) -> ImageGPT:
    """The same architecture freshly initialised from `seed`, without touching the global RNG."""
    import torch  # heavy: torch

    from igpt_core.model import ImageGPT  # heavy: torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = ImageGPT(model.config)
    return fresh.to(next(model.parameters()).device)


def probe_arrays(
    model: ImageGPT,
    palette: Palette,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    config: ProbeConfig,
    *,
    init_seed: int | None = None,
    progress: bool = False,
    split_sizes: dict[str, int] | None = None,
    announce: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """The probe on in-memory tokens and labels; `run_probe` without the file handling.

    `config.max_train` / `max_test` take a seeded sample stratified by class (see `_take`).
    `split_sizes` ({"train", "test"}) are the sizes of the whole splits `train` and `test` were already
    sampled from, for the record (`run_probe` samples while loading, so it keeps only the sample).
    `init_seed` seeds the random-init baseline (default: `config.seed`); pass the seed the checkpoint
    was initialised with so both models come from the same seed protocol. `announce` receives one line
    saying how many images and fits the probe will use, before any feature is computed; `progress` shows
    bars for each feature extraction and each model's classifier fits.
    """
    train_tokens, train_labels = _check_split("train", *train, model.config.block_size)
    test_tokens, test_labels = _check_split("test", *test, model.config.block_size)
    train_tokens, train_labels, train_taken = _take(
        "train", "max_train", train_tokens, train_labels, config.max_train, config.seed
    )
    test_tokens, test_labels, test_taken = _take(
        "test", "max_test", test_tokens, test_labels, config.max_test, config.seed
    )
    layers = resolve_layers(config.layer, model.config.n_layer)
    fit_index, val_index = _split_train(train_labels, config.val_fraction, config.seed)
    for name, taken in (("train", train_taken), ("test", test_taken)):
        taken["of"] = max(taken["of"], (split_sizes or {}).get(name, 0))
    subsets = {"train": train_taken, "test": test_taken, "seed": config.seed}
    absent = check_classes(train_labels, test_labels)
    per_class = {
        "train": _counts(train_labels),
        "fit": _counts(train_labels[fit_index]),
        "val": _counts(train_labels[val_index]),
        "test": _counts(test_labels),
    }
    # Said before the features are computed: the user may prefer to stop and pick a larger subset.
    note = absent_classes_note({"absent_from_train": absent, "class_counts": per_class, "subsets": subsets})
    if note:
        logger.warning(note)
    if announce is not None:
        announce(_plan_line(subsets, len(fit_index), len(val_index), per_class, layers, config))

    def probe(train_x: np.ndarray, test_x: np.ndarray, what: str) -> dict[str, Any]:
        # Every feature set goes through the same split, grid and seed, so the rows are comparable.
        return fit_linear_probe(
            train_x,
            train_labels,
            test_x,
            test_labels,
            fit_index=fit_index,
            val_index=val_index,
            c_grid=tuple(config.c_grid),
            seed=config.seed,
            max_iter=config.max_iter,
            progress=progress,
            desc=f"fits {what}",
        )

    def features(of: ImageGPT, tokens: np.ndarray, wanted: list[int], what: str) -> dict[int, np.ndarray]:
        # once per model and split, for every layer wanted: every C and the refit reuse these arrays
        return extract_features(
            of,
            tokens,
            wanted,
            batch_size=config.batch_size,
            progress=progress,
            precision=config.precision,
            desc=f"features {what}",
        )

    started = time.perf_counter()
    train_feats = features(model, train_tokens, layers, "train")
    test_feats = features(model, test_tokens, layers, "test")
    seconds = {"features": time.perf_counter() - started}

    started = time.perf_counter()
    per_layer = []
    for layer in layers:
        per_layer.append({"layer": layer, **probe(train_feats[layer], test_feats[layer], f"layer {layer}")})
    # The best layer is chosen on validation accuracy (never on test); ties go to the earlier layer.
    best = max(per_layer, key=lambda row: (row["accuracy"]["val"], -row["layer"]))
    seconds["fit"] = time.perf_counter() - started

    started = time.perf_counter()
    fresh = _random_init_model(model, config.seed if init_seed is None else init_seed)
    fresh_train = features(fresh, train_tokens, [best["layer"]], "train (random init)")
    fresh_test = features(fresh, test_tokens, [best["layer"]], "test (random init)")
    seconds["random_init_features"] = time.perf_counter() - started
    started = time.perf_counter()
    random_init = probe(fresh_train[best["layer"]], fresh_test[best["layer"]], "random init")
    seconds["random_init_fit"] = time.perf_counter() - started
    started = time.perf_counter()
    side = model.config.resolution
    raw_train, raw_test = (
        pixel_features(train_tokens, palette, side),
        pixel_features(test_tokens, palette, side),
    )
    raw = probe(raw_train, raw_test, "raw pixels")
    seconds["raw_pixels_fit"] = time.perf_counter() - started

    return {
        "layer": best["layer"],
        "accuracy": best["accuracy"],
        "C": best["C"],
        "val_by_C": best["val_by_C"],
        "feature_dim": best["feature_dim"],
        "iterations": best["iterations"],
        "baselines": {
            "random_init": {
                "layer": best["layer"],
                "init_seed": config.seed if init_seed is None else init_seed,
                **random_init,
            },
            "raw_pixels": raw,
        },
        "per_layer": per_layer if config.layer == "all" else None,
        "counts": {
            "train": len(train_labels),
            "fit": len(fit_index),
            "val": len(val_index),
            "test": len(test_labels),
            "classes": int(len(np.unique(train_labels))),
        },
        "class_counts": per_class,
        "absent_from_train": absent,
        "subsets": subsets,
        "config": to_dict(config),
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
    }


def _plan_line(
    subsets: dict[str, Any],
    fit: int,
    val: int,
    per_class: dict[str, dict[str, int]],
    layers: list[int],
    config: ProbeConfig,
) -> str:
    """What the probe is about to do, in one line: images per split (and what they were sampled from),
    classes, layers and classifier fits."""

    def images(name: str) -> str:
        taken = subsets[name]
        whole = f" (a stratified sample of {taken['of']:,})" if taken["kept"] < taken["of"] else ""
        return f"{taken['kept']:,}{whole}"

    fits = (len(config.c_grid) + 1) * (len(layers) + 2)
    return (
        f"probe: {images('train')} train images ({fit:,} fit + {val:,} val), {images('test')} test images, "
        f"{len(per_class['train'])} classes; features of layer {', '.join(map(str, layers))} "
        f"(and a random-init copy), {fits} logistic-regression fits ({len(config.c_grid)} C values + refit, "
        f"for {len(layers)} layer{'s' if len(layers) > 1 else ''}, random init and raw pixels)"
    )


def _check_split(
    name: str, tokens: np.ndarray, labels: np.ndarray | None, block_size: int
) -> tuple[np.ndarray, np.ndarray]:
    if labels is None:
        raise ProbeError(f"{name}: the data has no labels; the probe needs labelled shards")
    tokens, labels = np.asarray(tokens), np.asarray(labels)
    if tokens.ndim != 2 or tokens.shape[1] != block_size:
        raise ProbeError(f"{name}: tokens have shape {tokens.shape}, the model expects (N, {block_size})")
    if len(labels) != len(tokens):
        raise ProbeError(f"{name}: {len(tokens)} token rows but {len(labels)} labels")
    if len(tokens) == 0:
        raise ProbeError(f"{name}: no samples")
    return tokens, labels.astype(np.int64)


def _load_split(data: ProbeData, name: str, preferred: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The whole split: a stratified sample needs every label, so nothing is cut here."""
    if isinstance(data, tuple):
        tokens, labels = data
        if labels is None:
            raise ProbeError(f"{name}: the in-memory data has no labels; the probe needs labelled data")
        return np.asarray(tokens), np.asarray(labels)
    path = Path(data)
    if not path.exists():
        raise ProbeError(f"{name}: shards path {path} does not exist")
    tokens, maybe_labels = load_tokens(path, split=pick_split(path, preferred))
    if maybe_labels is None or len(maybe_labels) != len(tokens):
        raise ProbeError(
            f"{name}: shards at {path} are unlabelled (no .cls entries); the probe needs labelled shards "
            "(tokenize a source that has labels, e.g. class sub-folders or webdataset .cls)"
        )
    unlabelled = int((maybe_labels < 0).sum())
    if unlabelled:
        raise ProbeError(f"{name}: {unlabelled} of {len(tokens)} samples in {path} have no label (.cls)")
    return tokens, maybe_labels


def _init_seed(checkpoint: Checkpoint, default: int) -> int:
    """The seed the checkpoint's trainer initialised with (config.json's train.seed), else `default`."""
    if isinstance(checkpoint, tuple):
        return default
    try:
        saved = read_config(checkpoint)
    except (OSError, ValueError):  # CheckpointError is a ValueError
        return default
    train = saved.get("train") if isinstance(saved, dict) else None
    return int(train["seed"]) if isinstance(train, dict) and "seed" in train else default


def run_probe(
    checkpoint: Checkpoint,
    train_shards: ProbeData,
    test_shards: ProbeData,
    config: ProbeConfig | None = None,
    out_dir: str | os.PathLike | None = None,
    *,
    progress: bool = False,
    announce: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Linear probe of `checkpoint` with raw-pixel and random-init baselines; writes probe.json and probe.md.

    Shards are read with `data.load_tokens`; a folder holding several splits gives its `train` split
    for training and its `test` (else `val`) split for testing, so one folder can serve as both.
    `max_train` / `max_test` sample each whole split, stratified by class and seeded, and only the chosen
    rows are kept. `out_dir` defaults to `<checkpoint>/probe` for a checkpoint folder; an in-memory
    checkpoint without `out_dir` writes nothing. `progress` and `announce` as in `probe_arrays`.
    """
    config = config or ProbeConfig()
    model, palette = load_checkpoint(checkpoint)
    block = model.config.block_size
    taken: dict[str, dict[str, int]] = {}
    splits: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, data, preferred, option, n in (
        ("train", train_shards, ("train",), "max_train", config.max_train),
        ("test", test_shards, ("test", "val"), "max_test", config.max_test),
    ):
        tokens, labels = _check_split(name, *_load_split(data, name, preferred), block)
        # rebinding drops the whole split: only the sample is held through the probe
        tokens, labels, taken[name] = _take(name, option, tokens, labels, n, config.seed)
        splits[name] = (tokens, labels)
    result = probe_arrays(
        model,
        palette,
        splits["train"],
        splits["test"],
        config,
        init_seed=_init_seed(checkpoint, config.seed),
        progress=progress,
        split_sizes={name: record["of"] for name, record in taken.items()},
        announce=announce,
    )
    result = {
        "checkpoint": "<in-memory>" if isinstance(checkpoint, tuple) else str(checkpoint),
        "train_shards": "<in-memory>" if isinstance(train_shards, tuple) else str(train_shards),
        "test_shards": "<in-memory>" if isinstance(test_shards, tuple) else str(test_shards),
        **result,
    }
    if out_dir is None and not isinstance(checkpoint, tuple):
        out_dir = Path(checkpoint) / "probe"
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "probe.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / "probe.md").write_text(format_probe_table(result) + "\n")
        result["out_dir"] = str(out)
    return result


def format_probe_table(result: dict[str, Any]) -> str:
    """A Markdown table of the probe and its baselines (and the per-layer sweep when there is one)."""

    def row(name: str, layer: Any, fit: dict[str, Any]) -> str:
        acc = fit["accuracy"]
        return (
            f"| {name} | {layer} | {fit['feature_dim']} | {fit['C']:g} | "
            f"{acc['train']:.4f} | {acc['val']:.4f} | {acc['test']:.4f} |"
        )

    subsets = result.get("subsets", {})
    sampled = {k: f" of {v['of']}" for k, v in subsets.items() if k != "seed" and v["kept"] < v["of"]}
    how = f"; samples stratified by class, seed {subsets['seed']}" if sampled else ""
    counts = result["counts"]
    note = absent_classes_note(result)
    lines = [f"Warning: {note}", ""] if note else []
    lines += [
        f"Linear probe: {counts['train']}{sampled.get('train', '')} train "
        f"({counts['fit']} fit + {counts['val']} val), {counts['test']}{sampled.get('test', '')} test, "
        f"{counts['classes']} classes{how}",
        "",
        "| features | layer | dim | C | train acc | val acc | test acc |",
        "|---|---|---|---|---|---|---|",
        row("pretrained", result["layer"], result),
        row("random init", result["baselines"]["random_init"]["layer"], result["baselines"]["random_init"]),
        row("raw pixels", "-", result["baselines"]["raw_pixels"]),
    ]
    if result.get("per_layer"):
        lines += ["", "| layer | C | train acc | val acc | test acc |", "|---|---|---|---|---|"]
        for entry in result["per_layer"]:
            acc = entry["accuracy"]
            mark = " (best)" if entry["layer"] == result["layer"] else ""
            lines.append(
                f"| {entry['layer']}{mark} | {entry['C']:g} | {acc['train']:.4f} | {acc['val']:.4f} | {acc['test']:.4f} |"
            )
    return "\n".join(lines)
