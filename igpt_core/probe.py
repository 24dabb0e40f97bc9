"""Linear probe: how much a pretrained model knows about image classes, next to two baselines.

The feature of an image is the input of block l's attention (the normalised residual stream), averaged
over positions. A standardised logistic regression is fitted on it; its strength C is chosen on a
validation split carved from train, then refitted on the whole train split and scored on test. The same
procedure runs, in the same call and on the same split, on raw pixels and on the same architecture at
random initialisation, so the headline number always comes with what it should beat.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np
from tqdm import tqdm

from igpt_core.checkpoint import read_config
from igpt_core.config import ProbeConfig, to_dict
from igpt_core.data import load_tokens
from igpt_core.sample import Checkpoint, load_checkpoint, pick_split

if TYPE_CHECKING:
    from igpt_core.model import ImageGPT
    from igpt_core.palette import Palette

ProbeData: TypeAlias = str | os.PathLike | tuple[np.ndarray, np.ndarray]
"""A labelled token shard folder, or in-memory (tokens uint16 (N, R*R), labels int (N,))."""


class ProbeError(ValueError):
    """Bad probe input (unlabelled shards, one class, wrong resolution); the message names the input."""


def resolve_layers(layer: int | str | None, n_layer: int) -> list[int]:
    """The blocks to probe: [n_layer // 2] by default, every block for 'all'."""
    if layer is None:
        return [n_layer // 2]
    if layer == "all":
        return list(range(n_layer))
    if not isinstance(layer, int) or not 0 <= layer < n_layer:
        raise ProbeError(
            f"layer: must be in [0, {n_layer - 1}] or 'all' for a {n_layer}-layer model, got {layer!r}"
        )
    return [layer]


def extract_features(
    model: ImageGPT, tokens: np.ndarray, layers: list[int], *, batch_size: int = 64, progress: bool = False
) -> dict[int, np.ndarray]:
    """Mean-pooled attention inputs of `layers`, float32 (N, n_embd) each, all from one forward pass per batch."""
    import torch  # heavy: torch

    from igpt_core.model import inputs_from_tokens  # heavy: torch

    device = next(model.parameters()).device
    out: dict[int, list[np.ndarray]] = {layer: [] for layer in layers}
    was_training = model.training
    model.eval()
    starts = range(0, len(tokens), batch_size)
    if progress:
        starts = tqdm(starts, desc="features", unit="batch")
    try:
        with torch.inference_mode():
            for start in starts:
                batch = torch.from_numpy(tokens[start : start + batch_size].astype(np.int64)).to(device)
                inputs, _ = inputs_from_tokens(batch, model.config.start_token)
                feats = model.features(inputs, layers)
                for layer in layers:
                    out[layer].append(feats[layer].float().cpu().numpy())
    finally:
        model.train(was_training)
    return {layer: np.concatenate(chunks) for layer, chunks in out.items()}


def pixel_features(tokens: np.ndarray, palette: Palette, resolution: int) -> np.ndarray:
    """The dequantized R x R x 3 pixels of each image in [-1, 1], float32 (N, 3 R^2): the raw-pixel baseline."""
    images = palette.dequantize(tokens, resolution)
    return (images.reshape(len(tokens), -1).astype(np.float32) / 127.5) - 1.0


def _split_train(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (fit, val) of a validation split carved from train, stratified when every class allows it."""
    from sklearn.model_selection import train_test_split  # heavy: sklearn

    index = np.arange(len(labels))
    n_val = max(1, int(round(val_fraction * len(labels))))
    counts = np.unique(labels, return_counts=True)[1]
    n_classes = len(counts)
    stratify = labels if counts.min() >= 2 and n_classes <= n_val <= len(labels) - n_classes else None
    fit, val = train_test_split(index, test_size=n_val, random_state=seed, stratify=stratify)
    return np.sort(fit), np.sort(val)


def _classifier(c: float, seed: int) -> Any:
    from sklearn.linear_model import LogisticRegression  # heavy: sklearn
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=1000, random_state=seed))


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
) -> dict[str, Any]:
    """Chooses C on (fit, val), refits on all of train with it, and scores train, val and test.

    Ties in validation accuracy go to the smaller C (the stronger regularisation).
    """
    from sklearn.exceptions import ConvergenceWarning  # heavy: sklearn

    val_by_c: dict[float, float] = {}
    with warnings.catch_warnings():
        # A probe at a loose C may stop at max_iter; its score still counts, the warning is noise.
        warnings.simplefilter("ignore", ConvergenceWarning)
        for c in sorted(c_grid):
            clf = _classifier(c, seed).fit(train_x[fit_index], train_y[fit_index])
            val_by_c[c] = float(clf.score(train_x[val_index], train_y[val_index]))
        best_c = max(sorted(val_by_c), key=lambda c: (val_by_c[c], -c))
        final = _classifier(best_c, seed).fit(train_x, train_y)
    return {
        "C": best_c,
        "val_by_C": {str(c): acc for c, acc in val_by_c.items()},
        "accuracy": {
            "train": float(final.score(train_x, train_y)),
            "val": val_by_c[best_c],
            "test": float(final.score(test_x, test_y)),
        },
        "feature_dim": int(train_x.shape[1]),
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
) -> dict[str, Any]:
    """The probe on in-memory tokens and labels; `run_probe` without the file handling.

    `init_seed` seeds the random-init baseline (default: `config.seed`); pass the seed the checkpoint
    was initialised with so both models come from the same seed protocol.
    """
    train_tokens, train_labels = _check_split("train", *train, model.config.block_size)
    test_tokens, test_labels = _check_split("test", *test, model.config.block_size)
    if len(np.unique(train_labels)) < 2:
        raise ProbeError(f"train: needs at least two classes, got only {np.unique(train_labels).tolist()}")
    layers = resolve_layers(config.layer, model.config.n_layer)
    fit_index, val_index = _split_train(train_labels, config.val_fraction, config.seed)

    def probe(train_x: np.ndarray, test_x: np.ndarray) -> dict[str, Any]:
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
        )

    started = time.perf_counter()
    train_feats = extract_features(
        model, train_tokens, layers, batch_size=config.batch_size, progress=progress
    )
    test_feats = extract_features(model, test_tokens, layers, batch_size=config.batch_size, progress=progress)
    seconds = {"features": time.perf_counter() - started}

    started = time.perf_counter()
    per_layer = []
    for layer in layers:
        per_layer.append({"layer": layer, **probe(train_feats[layer], test_feats[layer])})
    # The best layer is chosen on validation accuracy (never on test); ties go to the earlier layer.
    best = max(per_layer, key=lambda row: (row["accuracy"]["val"], -row["layer"]))
    seconds["fit"] = time.perf_counter() - started

    started = time.perf_counter()
    fresh = _random_init_model(model, config.seed if init_seed is None else init_seed)
    fresh_train = extract_features(
        fresh, train_tokens, [best["layer"]], batch_size=config.batch_size, progress=progress
    )
    fresh_test = extract_features(
        fresh, test_tokens, [best["layer"]], batch_size=config.batch_size, progress=progress
    )
    random_init = probe(fresh_train[best["layer"]], fresh_test[best["layer"]])
    side = model.config.resolution
    raw = probe(pixel_features(train_tokens, palette, side), pixel_features(test_tokens, palette, side))
    seconds["baselines"] = time.perf_counter() - started

    return {
        "layer": best["layer"],
        "accuracy": best["accuracy"],
        "C": best["C"],
        "val_by_C": best["val_by_C"],
        "feature_dim": best["feature_dim"],
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
        "config": to_dict(config),
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
    }


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


def _load_split(
    data: ProbeData, name: str, preferred: tuple[str, ...], limit: int | None
) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(data, tuple):
        tokens, labels = data
        if labels is None:
            raise ProbeError(f"{name}: the in-memory data has no labels; the probe needs labelled data")
        return np.asarray(tokens)[:limit], np.asarray(labels)[:limit]
    path = Path(data)
    if not path.exists():
        raise ProbeError(f"{name}: shards path {path} does not exist")
    tokens, maybe_labels = load_tokens(path, split=pick_split(path, preferred), limit=limit)
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
) -> dict[str, Any]:
    """Linear probe of `checkpoint` with raw-pixel and random-init baselines; writes probe.json and probe.md.

    Shards are read with `data.load_tokens`; a folder holding several splits gives its `train` split
    for training and its `test` (else `val`) split for testing, so one folder can serve as both. `out_dir` defaults to `<checkpoint>/probe` for a checkpoint
    folder; an in-memory checkpoint without `out_dir` writes nothing.
    """
    config = config or ProbeConfig()
    model, palette = load_checkpoint(checkpoint)
    train = _load_split(train_shards, "train", ("train",), config.max_train)
    test = _load_split(test_shards, "test", ("test", "val"), config.max_test)
    result = probe_arrays(
        model, palette, train, test, config, init_seed=_init_seed(checkpoint, config.seed), progress=progress
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

    counts = result["counts"]
    lines = [
        f"Linear probe: {counts['train']} train ({counts['fit']} fit + {counts['val']} val), "
        f"{counts['test']} test, {counts['classes']} classes",
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
