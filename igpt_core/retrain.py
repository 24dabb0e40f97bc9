"""Retraining decisions: the batches in the watched folder, which of them are new, the palette's drift on
them, the step a warm-started retrain continues from, the replay share of the champion's training images
mixed into the new ones, and whether a challenger takes the alias `champion`.

The watched folder holds batches: each entry (a folder of images, a tar, an .npz, a parquet file) is one
source, published whole by `publish_batches`. A batch is new until a registered model version lists its
content digest in the tag `NEW_DATA_TAG`; so the registry, not a local file, says what has been learned.
These are plain functions over paths, digests and tag dicts; the flow (flows/retrain.py) calls them.

Champion and challenger: every registered version after the first is a challenger, scored beside the
champion on the champion's fixed held-out shards by `heldout_bits` (the held-out evaluation pretraining
reports, `pretrain.NextPixel.evaluate`), and a classifier by `classifier_accuracy` on the champion classifier's
test shards; `promotion_decision` says whether it is not worse within the tolerance.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import random
import shutil
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np

from igpt_core.checkpoint import load_classifier, load_model
from igpt_core.data import load_tokens
from igpt_core.loop import ProcessGroupRuntime
from igpt_core.palette import Palette, normalise
from igpt_core.pretrain import NextPixel
from igpt_core.shards import read_meta
from igpt_core.sources import Sample, iter_source, open_source
from igpt_core.split import write_npz

NEW_DATA_TAG = "igpt.new_data"
"""Model version tag: JSON list of the batch digests that version was trained on."""
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}

RefitReason = Literal["no", "asked", "drift"]
Decision = Literal["first", "promoted", "kept"]
T = TypeVar("T")

DEFAULT_REPLAY_SHARE = 0.5
"""Replayed images from the champion's training data, as a share of the new training images."""
DEFAULT_TOLERANCE_BITS = 0.01
"""A challenger is promoted when its held-out bits/token is at most the champion's plus this."""
DEFAULT_TOLERANCE_ACCURACY = 0.01
"""A challenger classifier is promoted when its test accuracy is at least the champion's minus this."""


def watched_folder(watch: str | None, root: str | Path) -> Path:
    """The watched folder: `watch` when given, else `<root>/incoming`."""
    return Path(watch).expanduser().resolve() if watch else Path(root) / "incoming"


def list_batches(watch: Path) -> list[Path]:
    """The batches in the watched folder, by name; hidden entries (batches being copied in) are skipped."""
    if not watch.is_dir():
        return []
    return sorted(p for p in watch.iterdir() if not p.name.startswith("."))


def publish_batches(paths: Iterable[str | Path], to: str | Path) -> tuple[Path, list[str]]:
    """Copies `paths` into the watched folder `to`; returns the folder (resolved) and the batch names.

    Folders, tars, .npz and parquet files become a batch each (sources keep their own layout); loose image
    files are gathered into one folder batch. A batch's name carries a digest of its content, and it is
    copied under a hidden name and renamed when complete, so a reader never sees half a batch and adding
    the same content twice publishes it once.
    """
    watch = Path(to).expanduser().resolve()
    watch.mkdir(parents=True, exist_ok=True)
    sources = [Path(p).expanduser() for p in paths]
    if not sources:
        raise ValueError("paths: give at least one image file, folder or tar to add")
    missing = [str(p) for p in sources if not p.exists()]
    if missing:
        raise FileNotFoundError(f"paths: no such file or folder: {', '.join(missing)}")
    loose = [p for p in sources if p.is_file() and p.suffix.lower() in IMAGE_EXTS]
    batches: list[str] = []
    for src in (p for p in sources if p not in loose):
        digest = _tree_digest(src)[:10]
        name = f"{src.name.split('.')[0]}-{digest}{''.join(src.suffixes) if src.is_file() else ''}"
        batches.append(_publish(watch, name, functools.partial(_copy, src)))
    if loose:
        # the sha256 of the JSON list of the files' digests, as names were made before this module
        listing = json.dumps([sorted(_file_digest(p) for p in loose)], separators=(",", ":"))
        digest = hashlib.sha256(listing.encode()).hexdigest()[:10]

        def copy_loose(tmp: Path) -> None:
            tmp.mkdir()
            for path in loose:
                shutil.copy2(path, tmp / path.name)

        batches.append(_publish(watch, f"images-{digest}", copy_loose))
    return watch, batches


def consumed_digests(version_tags: Iterable[Mapping[str, str]]) -> set[str]:
    """Digests of the batches that model versions (given by their tags) were trained on."""
    seen: set[str] = set()
    for tags in version_tags:
        seen.update(json.loads(tags.get(NEW_DATA_TAG, "[]")))
    return seen


def new_batches(found: Mapping[str, str], consumed: set[str]) -> dict[str, str]:
    """The batches (spec -> content digest) of `found` that no version has been trained on."""
    return {spec: digest for spec, digest in found.items() if digest not in consumed}


def base_step(saved_config: Mapping[str, Any], version_tags: Mapping[str, str]) -> int:
    """The step a warm-started retrain continues from: the checkpoint's config.json `step`, else the
    version's `igpt.step` tag, else 0."""
    return int(saved_config.get("step", version_tags.get("igpt.step", 0)))


@dataclass(frozen=True)
class RefitDecision:
    """Whether a retrain refits the palette, and the numbers that decided it."""

    reason: RefitReason
    """no: keep the palette; asked: the caller asked for a refit; drift: the new data's MSE drifted."""
    new_mse: float
    """Quantization MSE of the new held-out images with the current palette."""
    base_mse: float
    """The palette's own held-out MSE when it was fitted (nan when unknown)."""
    ratio: float
    """new_mse / base_mse (nan when base_mse is unknown or zero)."""

    @property
    def refit(self) -> bool:
        return self.reason != "no"


def refit_decision(new_mse: float, base_mse: float, *, refit: bool, threshold: float) -> RefitDecision:
    """Refit when asked, or when `new_mse` exceeds `threshold` times `base_mse`; an unknown ratio
    (no base MSE recorded) never counts as drift."""
    ratio = new_mse / base_mse if not math.isnan(base_mse) and base_mse > 0 else float("nan")
    drifted = not math.isnan(ratio) and ratio > threshold
    reason: RefitReason = "asked" if refit else ("drift" if drifted else "no")
    return RefitDecision(reason, new_mse, base_mse, ratio)


@dataclass(frozen=True)
class Promotion:
    """Whether a new version takes the alias `champion`, and the figures that decided it."""

    decision: Decision
    """first: no champion yet; promoted: not worse than the champion; kept: worse, the champion stays."""
    reason: str
    """One line a person reads: both figures, the rule and the tolerance."""
    metric: str
    """What was compared (heldout_bits_per_token, lower is better; test_accuracy, higher is better)."""
    challenger: float
    """The new version's figure."""
    champion: float
    """The champion's figure on the same data, by the same code (nan for the first version)."""
    tolerance: float

    @property
    def promote(self) -> bool:
        return self.decision != "kept"


def first_champion(metric: str, figure: float) -> Promotion:
    """The decision for the first version of a model: it becomes the champion."""
    return Promotion(
        "first", f"first registered version ({metric} {figure:.4f})", metric, figure, math.nan, 0.0
    )


def promotion_decision(
    challenger: float, champion: float, *, tolerance: float, metric: str, higher_is_better: bool = False
) -> Promotion:
    """Promote when the challenger is not worse than the champion within `tolerance` (the edge counts as
    not worse): `challenger <= champion + tolerance` when lower is better, `>= champion - tolerance` when
    higher is. A challenger that could not be scored (nan, inf) is kept out; an unscored champion is an
    error, since nothing could then be compared."""
    if tolerance < 0 or not math.isfinite(tolerance):
        raise ValueError(f"tolerance: must be a finite number >= 0, got {tolerance}")
    if not math.isfinite(champion):
        raise ValueError(f"champion {metric}: {champion} is not a figure a challenger can be compared with")
    if not math.isfinite(challenger):
        return Promotion(
            "kept",
            f"challenger {metric} is {challenger}: not scored",
            metric,
            challenger,
            champion,
            tolerance,
        )
    if higher_is_better:
        ok, bound, rule = challenger >= champion - tolerance, champion - tolerance, ">="
    else:
        ok, bound, rule = challenger <= champion + tolerance, champion + tolerance, "<="
    sign = "-" if higher_is_better else "+"
    shown = f"challenger {metric} {challenger:.4f} vs champion {champion:.4f} (tolerance {sign}{tolerance:g})"
    reason = f"{shown}: not worse ({rule} {bound:.4f})" if ok else f"{shown}: worse (not {rule} {bound:.4f})"
    return Promotion("promoted" if ok else "kept", reason, metric, challenger, champion, tolerance)


def replay_count(new_samples: int, share: float) -> int:
    """How many of the champion's training images a retrain on `new_samples` new images replays."""
    if share < 0 or not math.isfinite(share):
        raise ValueError(f"replay_share: must be a finite number >= 0, got {share}")
    return int(round(share * new_samples))


def reservoir_sample(items: Iterable[T], k: int, seed: int) -> list[T]:
    """A seeded uniform sample of `k` items of a stream of unknown length (all of them when it holds
    fewer), in stream order; one pass, memory for `k` items."""
    rng = random.Random(seed)
    kept: list[tuple[int, T]] = []
    for index, item in enumerate(items):
        if len(kept) < k:
            kept.append((index, item))
        else:
            slot = rng.randrange(index + 1)
            if slot < k:
                kept[slot] = (index, item)
    return [item for _, item in sorted(kept, key=lambda pair: pair[0])]


def write_replay_mix(
    new_train: str, replay_source: str | None, out: str | Path, *, share: float, seed: int, resolution: int
) -> dict[str, int]:
    """Writes `out` (an .npz): the images of `new_train` followed by `replay_count(new, share)` images
    drawn (seeded, uniformly) from `replay_source`, the champion's training images, at `resolution`.

    Labels are kept when either side has them (-1 for an unlabelled image). The file is written under a
    temporary name and renamed, and is byte-for-byte reproducible. Returns counts: new, replay, and
    replay_available (images the champion's source held).
    """
    fresh = [item for item in iter_source(open_source(new_train), resolution) if isinstance(item, Sample)]
    count = replay_count(len(fresh), share)
    available, replayed = 0, []
    if count and replay_source is not None:
        stream = (
            item for item in iter_source(open_source(replay_source), resolution) if isinstance(item, Sample)
        )

        def counted() -> Iterable[Sample]:
            nonlocal available
            for item in stream:
                available += 1
                yield item

        replayed = reservoir_sample(counted(), count, seed)
    samples = fresh + replayed
    labels = [item.label for item in samples]
    y = (
        np.array([-1 if lab is None else lab for lab in labels], np.int64)
        if any(lab is not None for lab in labels)
        else None
    )
    target = Path(out)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        write_npz(tmp, np.stack([item.image for item in samples]), y)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return {"new": len(fresh), "replay": len(replayed), "replay_available": available}


def heldout_bits(
    checkpoint_dir: str | Path, shards: str | Path, *, split: str | None = None, limit: int | None = None
) -> dict[str, float]:
    """Held-out loss of a checkpoint on token shards, by pretraining's own evaluation
    (`pretrain.NextPixel.evaluate`, fp32, in this process): {bits_per_token, loss (nats), samples}, over the
    first `limit` samples (all when None), so two models scored with the same arguments see the same
    tokens. The shards must be tokens of the checkpoint's palette (ValueError naming both otherwise)."""

    _check_palette(checkpoint_dir, shards)
    tokens, _ = load_tokens(shards, split=split, limit=limit)
    model = load_model(checkpoint_dir)
    scores = NextPixel(model.config, tokens, batch_size=64).evaluate(model, ProcessGroupRuntime())
    return {
        "bits_per_token": scores["eval_bits_per_token"],
        "loss": scores["eval_loss"],
        "samples": len(tokens),
    }


def classifier_accuracy(
    checkpoint_dir: str | Path, shards: str | Path, *, split: str | None = None, limit: int | None = None
) -> dict[str, float]:
    """Accuracy of a classifier checkpoint on labelled token shards, by fine-tuning's own evaluation
    (`classifier.evaluate_classifier`, fp32): {accuracy, samples}, over the first `limit` samples."""
    from igpt_core.classifier import evaluate_classifier  # heavy: torch

    _check_palette(checkpoint_dir, shards)
    tokens, labels = load_tokens(shards, split=split, limit=limit)
    if labels is None:
        raise ValueError(f"shards: {shards} are not labelled; a classifier's accuracy needs labels")
    classifier, _, _ = load_classifier(checkpoint_dir)
    correct, _, count = evaluate_classifier(classifier, tokens, labels, 64, "cpu")
    return {"accuracy": correct / max(count, 1), "samples": count}


def _check_palette(checkpoint_dir: str | Path, shards: str | Path) -> None:

    ours = Palette.load(checkpoint_dir).digest()
    theirs = read_meta(shards).get("palette_digest")
    if theirs is not None and theirs != ours:
        raise ValueError(
            f"shards: {shards} hold tokens of palette {str(theirs)[:12]}, the checkpoint {checkpoint_dir} "
            f"uses {ours[:12]}; scores across palettes do not compare"
        )


def quantization_mse(palette: Palette, spec: str, resolution: int, limit: int = 2000) -> float:
    """Mean squared error, in the [-1, 1] pixel scale, between images of `spec` and their palette colours
    (the first `limit` images). It measures how well the palette fits data it may not have seen: the
    palette stage records it on its held-out images, and a retrain compares new data against that."""
    batch = []
    for item in iter_source(open_source(spec), resolution):
        if isinstance(item, Sample):
            batch.append(item.image)
            if len(batch) >= limit:
                break
    if not batch:
        raise ValueError(f"{spec}: no valid images to measure the palette on")
    images = np.stack(batch)
    restored = palette.dequantize(palette.quantize(images), resolution)
    return float(np.mean((normalise(images) - normalise(restored)) ** 2))


def _copy(src: Path, dst: Path) -> None:
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copy2(src, dst)


def _publish(watch: Path, name: str, write: Callable[[Path], None]) -> str:
    final = watch / name
    if final.exists():
        return name  # the same content was added before: its name is its digest
    tmp = watch / f".{name}.{uuid.uuid4().hex[:8]}.partial"
    try:
        write(tmp)
        tmp.rename(final)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
    return name


def _file_digest(path: Path, chunk: int = 1 << 20) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            sha.update(block)
    return sha.hexdigest()


def _tree_digest(path: Path) -> str:
    """sha256 over the relative names and bytes of every file under `path` (or of the file itself)."""
    if path.is_file():
        return _file_digest(path)
    sha = hashlib.sha256()
    for item in sorted(p for p in path.rglob("*") if p.is_file()):
        sha.update(str(item.relative_to(path)).encode() + b"\0" + bytes.fromhex(_file_digest(item)))
    return sha.hexdigest()
