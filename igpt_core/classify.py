"""Classify: a fine-tuned classifier's predictions for every image of a source, as a parquet table.

Images are read as tokenize reads them (`sources.read_part`, part by part, each input a Sample or a
Reject with its reason) and turned into tokens by the checkpoint's own palette at the checkpoint's
resolution (`Palette.quantize`: the exact nearest colour, the tokens `igpt tokenize` would write). Batches
of `batch_size` images run through `ImageGPTClassifier` as the probe's features do
(`features.fast_inference`): under `torch.inference_mode`, in bf16 where the hardware has it natively
(`precision` auto), through the training attention backend, and only up to the block the head reads.

Two files come out, both parquet, both written under a temporary name and renamed when complete, so a
failed run leaves nothing new under either name:

- `predictions.parquet` (`out`): one row per classified image, in source order: `key`, `class` (index),
  `name` (the checkpoint's class name, null when it names none), `probability` (of that class), `top5`
  and `top5_probability` (the min(5, C) likeliest classes, likeliest first), and `label` when the source
  has labels (null for an image without one);
- `predictions.rejects.parquet` (`rejects_path(out)`): `key` and `reason` of every input that could not
  be classified (unreadable, not an image, a repeated key).

So images = classified + rejected, always. The schema's `igpt` metadata records the checkpoint, the
source, the class names and the counts. Reading runs in this process, not on Ray: classifying a
folder of new images needs no cluster.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from igpt_core.checkpoint import CONFIG_FILE, PALETTE_FILE, load_classifier, read_config
from igpt_core.features import ProbeError, fast_inference, feature_dtype
from igpt_core.palette import Palette
from igpt_core.sources import Sample, Source, open_source, read_part
from igpt_core.tokens import sample_problem

if TYPE_CHECKING:
    import pyarrow

    from igpt_core.classifier import ImageGPTClassifier

DEFAULT_BATCH_SIZE = 64
TOP_K = 5
_TMP_PREFIX = ".tmp-"


class ClassifyError(ValueError):
    """Bad classify input (not a classifier checkpoint, no palette, no valid image); names the input."""


@dataclass(frozen=True)
class ClassifyResult:
    out: Path
    """predictions.parquet: one row per classified image."""
    rejects_path: Path
    """The rejects table beside it: key and reason of every input not classified."""
    counts: dict[str, int]
    """images, classified, rejected (images = classified + rejected)."""
    class_names: list[str] | None
    """The checkpoint's class names by index, None when it names none."""
    accuracy: float | None = None
    """Share of labelled images whose predicted class is their label, when the source's labels and the
    checkpoint's classes are the same label space (`note` says why not otherwise)."""
    labelled: int = 0
    rejects: list[tuple[str, str]] = field(default_factory=list)
    """(key, reason) of each rejected input, in source order."""
    note: str | None = None
    seconds: float = 0.0


def rejects_path(out: str | os.PathLike[str]) -> Path:
    """Where the rejects of `out` go: `predictions.parquet` -> `predictions.rejects.parquet`."""
    path = Path(out)
    return path.with_name(f"{path.stem if path.suffix == '.parquet' else path.name}.rejects.parquet")


def load(checkpoint: str | os.PathLike[str], device: str) -> tuple[ImageGPTClassifier, Palette, dict]:
    """(classifier in eval mode on `device`, its palette, config.json); ClassifyError naming the folder
    for a missing folder, a pretraining checkpoint, or a missing or foreign palette."""
    folder = Path(checkpoint)
    if not (folder / CONFIG_FILE).is_file():
        raise ClassifyError(f"checkpoint: {folder} is not a checkpoint folder (no {CONFIG_FILE})")
    if read_config(folder).get("model_type") == "imagegpt":
        raise ClassifyError(
            f"checkpoint: {folder} is a transformers folder; import it first "
            f"(igpt import-hf --hf {folder} --out DIR --palette PALETTE)"
        )
    try:
        classifier, palette, config = load_classifier(folder, map_location=device)
    except (ValueError, FileNotFoundError) as error:  # CheckpointError, and weights that do not fit
        message = str(error).removeprefix("checkpoint_dir: ").removeprefix("checkpoint: ")
        raise ClassifyError(f"checkpoint: {message}") from error
    if palette is None:
        raise ClassifyError(
            f"checkpoint: {folder} has no {PALETTE_FILE}, so images cannot be turned into its tokens; "
            "fine-tune from a checkpoint that stores its palette"
        )
    recorded = config.get("palette_digest")
    if recorded is not None and recorded != palette.digest():
        raise ClassifyError(
            f"checkpoint: {folder}/{PALETTE_FILE} is palette {palette.digest()[:12]}, but the model was "
            f"trained on tokens of palette {str(recorded)[:12]} ({CONFIG_FILE}: palette_digest)"
        )
    if palette.clusters != classifier.config.vocab_size:
        raise ClassifyError(
            f"checkpoint: {folder}/{PALETTE_FILE} has {palette.clusters} colours, the model "
            f"{classifier.config.vocab_size} tokens"
        )
    return classifier, palette, config


def predict_tokens(classifier: ImageGPTClassifier, tokens: np.ndarray, device: str) -> tuple[np.ndarray, ...]:
    """(top-k classes int64 (B, k), their probabilities float32 (B, k)) of uint16 tokens (B, R*R)."""
    import torch  # heavy: torch

    from igpt_core.model import inputs_from_tokens  # heavy: torch

    batch = torch.from_numpy(tokens.astype(np.int64)).to(device)
    inputs = inputs_from_tokens(batch, classifier.config.start_token)[0]
    logits, _ = classifier(inputs)  # (B, C)
    probabilities = torch.softmax(logits.float(), dim=-1)
    top = probabilities.topk(min(TOP_K, classifier.n_classes), dim=-1)  # sorted, likeliest first
    return top.indices.cpu().numpy(), top.values.cpu().numpy()


def classify(
    checkpoint: str | os.PathLike[str],
    source: str | os.PathLike[str] | np.ndarray | Source,
    out: str | os.PathLike[str] | None = None,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str | None = None,
    progress: bool = True,
    precision: str = "auto",
    announce: Callable[[str], None] | None = None,
) -> ClassifyResult:
    """Classifies every image of `source` (any spec `open_source` reads) with a classifier checkpoint
    folder and writes `out` (default predictions.parquet) and its rejects table (see the module doc).

    `device` defaults to CUDA when available; `precision` (auto, bf16, fp32) as `ProbeConfig.precision`.
    `announce` receives one line saying how many images the source holds, before any is read. Raises
    ClassifyError (naming the input) for a bad checkpoint, batch size or precision, or a source of which
    not one image could be classified; SourceError for a source that cannot be opened.
    """
    import torch  # heavy: torch

    wall = time.perf_counter()
    if batch_size < 1:
        raise ClassifyError(f"batch_size: must be positive, got {batch_size}")
    target = Path(out if out is not None else "predictions.parquet")
    if target.is_dir():
        raise ClassifyError(
            f"out: {target} is a folder; give the predictions file (e.g. predictions.parquet)"
        )
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dtype = feature_dtype(precision, device)
    except ProbeError as error:
        raise ClassifyError(str(error)) from error
    classifier, palette, _ = load(checkpoint, device)
    opened = source if isinstance(source, Source) else open_source(source)
    resolution = classifier.config.resolution
    if announce is not None:
        count = f"{opened.size:,} images" if opened.size is not None else "images (count known once read)"
        announce(
            f"classify: {count} from {opened.spec} at {resolution}x{resolution}, batches of {batch_size}, "
            f"{'bf16' if dtype is not None else 'fp32'} on {device}"
        )

    keys: list[str] = []
    labels: list[int | None] = []
    top_classes: list[np.ndarray] = []
    top_probabilities: list[np.ndarray] = []
    rejects: list[tuple[str, str]] = []
    batch: list[Sample] = []
    seen: set[str] = set()

    def flush() -> None:
        if batch:
            classes, probabilities = predict_tokens(
                classifier, palette.quantize(np.stack([s.image for s in batch])), device
            )
            top_classes.append(classes)
            top_probabilities.append(probabilities)
            keys.extend(s.key for s in batch)
            labels.extend(s.label for s in batch)
            batch.clear()

    images = 0
    with (
        fast_inference(classifier, precision),
        tqdm(total=opened.size, desc="classify", unit="img", disable=not progress) as bar,
    ):
        for part in opened.parts():
            for record in read_part(part, resolution):
                images += 1
                bar.update(1)
                problem = sample_problem(record, resolution)
                if problem is None and record.key in seen:
                    problem = "duplicate key: an earlier input of the source has it"
                if problem is not None:
                    rejects.append((record.key, problem))
                    continue
                assert isinstance(record, Sample)
                seen.add(record.key)
                batch.append(record)
                if len(batch) == batch_size:
                    flush()
        flush()
    if images != len(keys) + len(rejects):  # a bug, not bad input: every input must be accounted for
        raise RuntimeError(
            f"classify {opened.spec}: {images} inputs, {len(keys)} classified + {len(rejects)} rejected"
        )
    if not keys:
        examples = "; ".join(f"{key}: {reason}" for key, reason in rejects[:3]) or "it yielded no images"
        raise ClassifyError(
            f"source: {opened.spec}: no image could be classified ({len(rejects)} rejected; {examples})"
        )

    classes = np.concatenate(top_classes)
    probabilities = np.concatenate(top_probabilities)
    names = classifier.class_names
    counts = {"images": images, "classified": len(keys), "rejected": len(rejects)}
    accuracy, labelled, note = _accuracy(classes[:, 0], labels, names, opened.classes, classifier.n_classes)
    meta = {
        "checkpoint": str(checkpoint),
        "source": opened.spec,
        "class_names": names,
        "counts": counts,
    }
    table = _predictions_table(keys, labels, classes, probabilities, names, meta)
    _publish(target, table, _rejects_table(rejects, meta))
    return ClassifyResult(
        out=target,
        rejects_path=rejects_path(target),
        counts=counts,
        class_names=names,
        accuracy=accuracy,
        labelled=labelled,
        rejects=rejects,
        note=note,
        seconds=time.perf_counter() - wall,
    )


def _accuracy(
    predicted: np.ndarray,
    labels: list[int | None],
    names: list[str] | None,
    source_names: tuple[str, ...] | None,
    n_classes: int,
) -> tuple[float | None, int, str | None]:
    """(accuracy over the labelled images or None, how many are labelled, why there is none)."""
    known = np.array([label is not None for label in labels])
    labelled = int(known.sum())
    if labelled == 0:
        return None, 0, None
    truth = np.array([label for label in labels if label is not None], dtype=np.int64)
    if names is not None and source_names is not None and list(source_names) != names:
        return (
            None,
            labelled,
            (
                f"no accuracy: the source's classes [{_listed(source_names)}] are not the checkpoint's "
                f"[{_listed(names)}], so its labels number other classes"
            ),
        )
    if truth.max() >= n_classes:
        return (
            None,
            labelled,
            f"no accuracy: the source has label {truth.max()}, the checkpoint {n_classes} classes",
        )
    return float((predicted[known] == truth).mean()), labelled, None


def _listed(names: list[str] | tuple[str, ...]) -> str:
    return ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")


def _schema_meta(meta: dict[str, Any]) -> dict[bytes, bytes]:
    return {b"igpt": json.dumps(meta, sort_keys=True).encode()}


def _predictions_table(
    keys: list[str],
    labels: list[int | None],
    classes: np.ndarray,
    probabilities: np.ndarray,
    names: list[str] | None,
    meta: dict[str, Any],
) -> pyarrow.Table:
    import pyarrow as pa  # heavy: pyarrow

    best = classes[:, 0]
    k = classes.shape[1]
    columns: dict[str, pa.Array] = {
        "key": pa.array(keys, pa.string()),
        "class": pa.array(best, pa.int64()),
        "name": pa.array([names[i] for i in best] if names else [None] * len(keys), pa.string()),
        "probability": pa.array(probabilities[:, 0], pa.float32()),
        "top5": pa.FixedSizeListArray.from_arrays(pa.array(classes.reshape(-1), pa.int64()), k).cast(
            pa.list_(pa.int64())
        ),
        "top5_probability": pa.FixedSizeListArray.from_arrays(
            pa.array(probabilities.reshape(-1), pa.float32()), k
        ).cast(pa.list_(pa.float32())),
    }
    if any(label is not None for label in labels):
        columns["label"] = pa.array(labels, pa.int64())
    return pa.table(columns).replace_schema_metadata(_schema_meta(meta))


def _rejects_table(rejects: list[tuple[str, str]], meta: dict[str, Any]) -> pyarrow.Table:
    import pyarrow as pa  # heavy: pyarrow

    table = pa.table(
        {
            "key": pa.array([key for key, _ in rejects], pa.string()),
            "reason": pa.array([reason for _, reason in rejects], pa.string()),
        }
    )
    return table.replace_schema_metadata(_schema_meta(meta))


def _publish(target: Path, predictions: pyarrow.Table, rejects: pyarrow.Table) -> None:
    """Writes both tables under temporary names beside `target`, then renames them: rejects first, so
    a predictions file is never there without the rejects of the same run."""
    import pyarrow.parquet as pq  # heavy: pyarrow

    target.parent.mkdir(parents=True, exist_ok=True)
    run = uuid.uuid4().hex[:12]
    pairs = [(rejects, rejects_path(target)), (predictions, target)]
    temporary = [path.with_name(f"{_TMP_PREFIX}{run}-{path.name}") for _, path in pairs]
    try:
        for (table, _), tmp in zip(pairs, temporary, strict=True):
            pq.write_table(table, tmp)
        for (_, path), tmp in zip(pairs, temporary, strict=True):
            os.replace(tmp, path)
    finally:
        for tmp in temporary:
            tmp.unlink(missing_ok=True)
