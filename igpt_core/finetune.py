"""Fine-tuning: a pretrained transformer with a classification head, trained on labelled token shards.

`finetune` (the driver) checks its inputs and runs `run_worker` on every Ray Train worker
(`igpt_core.ray_train.fit`), like pretraining: DDP over `workers` ranks, checkpoints, resume after a killed
run, Ray Train's fault tolerance. `run_worker` hands the classifier, the `Classify` objective and the rank's
stream of labelled samples to the one training loop (`igpt_core.loop.train`). The checkpoint with the best
validation accuracy is the result; test accuracy is measured once, on it, at the end.
Shapes: B batch, T positions, C classes, K palette colours, R image side.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from igpt_core import loop, ray_train
from igpt_core.checkpoint import (
    CLASSIFIER_KEY,
    CONFIG_FILE,
    PALETTE_FILE,
    CheckpointError,
    load_classifier,
    publish,
    read_config,
)
from igpt_core.checkpointer import Checkpointer, check_resumable
from igpt_core.config import FinetuneConfig, ModelConfig, from_dict, to_dict
from igpt_core.distributed import ensure_ray
from igpt_core.labelled import (
    FinetuneError,
    LabelledSplit,
    LabelledStream,
    check_palette,
    check_resolution,
    class_space,
    draw_subsets,
    load_split,
)
from igpt_core.palette import Palette
from igpt_core.storage import check_shared_storage

if TYPE_CHECKING:
    import torch
    from torch import nn

    from igpt_core.classifier import ImageGPTClassifier

logger = logging.getLogger(__name__)

DEFAULT_RUN_NAME = "finetune"
RAY_STORAGE_DIR = "ray"
REPORT_FILE = "finetune.json"
TABLE_FILE = "finetune.md"
SCORE = "val_accuracy"

__all__ = [
    "Classify",
    "FinetuneConfig",
    "FinetuneResult",
    "finetune",
    "finetune_loss",
    "format_finetune_table",
]


def finetune_loss(
    classifier: ImageGPTClassifier, tokens: torch.Tensor, labels: torch.Tensor, config: FinetuneConfig
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The objective of `config` on a batch: image tokens (B, R*R) and labels (B,) -> (loss, terms).

    Under `clf` the next-pixel head (and, for an early head, the blocks past it) get no gradient:
    `ImageGPTClassifier.freeze_unread` stops them, so DDP finds no unused parameter.
    """
    from igpt_core.classifier import batch_loss  # heavy: torch

    return batch_loss(
        classifier,
        tokens,
        labels,
        n_classes=classifier.n_classes,
        start_token=classifier.config.start_token,
        need_lm=config.needs_lm_logits,
        gen_weight=config.gen_weight,
    )


class Classify:
    """The fine-tuning objective (`joint` or `clf`); evaluated as accuracy on the rank's validation share."""

    def __init__(
        self,
        config: FinetuneConfig,
        n_classes: int,
        start_token: int,
        val_tokens: np.ndarray,
        val_labels: np.ndarray,
        batch_size: int,
    ) -> None:
        self.config, self.n_classes, self.start_token = config, n_classes, start_token
        self.val_tokens, self.val_labels, self.batch_size = val_tokens, val_labels, batch_size

    def loss(
        self, model: nn.Module, batch: loop.Batch, *, device: torch.device, dtype: torch.dtype | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        import torch  # heavy: torch

        from igpt_core.classifier import batch_loss  # heavy: torch

        if batch.labels is None:
            raise FinetuneError("--train: a batch came without labels")
        tokens = torch.from_numpy(batch.tokens.astype(np.int64)).to(device, non_blocking=True)
        labels = torch.from_numpy(batch.labels).to(device, non_blocking=True)
        autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
        with autocast:
            return batch_loss(
                model,
                tokens,
                labels,
                n_classes=self.n_classes,
                start_token=self.start_token,
                need_lm=self.config.needs_lm_logits,
                gen_weight=self.config.gen_weight,
            )

    def evaluate(self, model: nn.Module, runtime: loop.Runtime) -> dict[str, float]:
        """Validation accuracy and loss over every rank's share (each rank takes every world-th sample)."""
        from igpt_core.classifier import evaluate_classifier  # heavy: torch

        rank, world = runtime.rank, runtime.world_size
        correct, nats, count = evaluate_classifier(
            model,  # type: ignore[arg-type]
            self.val_tokens[rank::world],
            self.val_labels[rank::world],
            self.batch_size,
            runtime.device,
        )
        correct, nats, total = runtime.all_reduce_sum([correct, nats, float(count)])
        return {SCORE: correct / max(total, 1.0), "val_loss": nats / max(total, 1.0)}


# ---------------------------------------------------------------------------------------- worker


def run_worker(runtime: loop.Runtime, config: dict[str, Any]) -> None:
    """One rank of a fine-tuning run. `config` holds `model` and `finetune` (config dicts), `train`,
    `val` ({"path", "split", "index"}: what to read and which samples), `n_classes`, `class_names`,
    `palette`, `palette_digest`, `init_from` ({"path", "step"} of the pretrained checkpoint, or None from
    scratch) and `record` (config.json keys of every checkpoint)."""
    import torch  # heavy: torch

    from igpt_core.classifier import ImageGPTClassifier  # heavy: torch
    from igpt_core.model import ImageGPT  # heavy: model imports torch

    model_config: ModelConfig = from_dict(ModelConfig, config["model"])
    tune: FinetuneConfig = from_dict(FinetuneConfig, config["finetune"])
    train = tune.train_config()
    torch.manual_seed(tune.seed)  # the same initial weights (and head) on every rank
    classifier = ImageGPTClassifier(
        ImageGPT(model_config), config["n_classes"], tune.head_layer, config["class_names"]
    )
    frozen = classifier.freeze_unread(tune.needs_lm_logits)
    if frozen:
        logger.info("clf objective: %d parameters the class logits never read are frozen", len(frozen))
    train_part, val_part = config["train"], config["val"]
    train_split = _load(train_part)
    # a carved-out validation set is a share of the same split: read it once
    same = (val_part["path"], val_part["split"]) == (train_part["path"], train_part["split"])
    val_split = train_split if same else _load(val_part)
    tokens, labels = _take(train_split, train_part)
    val_tokens, val_labels = _take(val_split, val_part)
    stream = LabelledStream(
        tokens,
        labels,
        rank=runtime.rank,
        world_size=runtime.world_size,
        seed=tune.seed,
        flip_resolution=model_config.resolution if tune.flip else None,
    )
    checkpointer = Checkpointer(
        runtime,
        train=train,
        model_config=model_config,
        palette=config.get("palette"),
        palette_digest=config.get("palette_digest"),
        shards=config["train"]["path"],
        init_from=config.get("init_from"),
        continue_steps=False,
        extra=config["record"],
    )
    objective = Classify(
        tune,
        config["n_classes"],
        model_config.start_token,
        val_tokens,
        val_labels,
        train.per_worker_batch_size,
    )
    loop.train(
        model=classifier,  # type: ignore[arg-type]
        objective=objective,
        stream=stream,
        checkpointer=checkpointer,
        runtime=runtime,
        config=train,
    )


def _load(part: dict[str, Any]) -> LabelledSplit:
    """The labelled split a part {"path", "option", "split", "index"} names."""
    return load_split(part["path"], part["option"], part["split"])


def _take(split: LabelledSplit, part: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """The part's chosen samples (its `index`) of `split`: tokens and labels."""
    index = np.asarray(part["index"], dtype=np.int64)
    return split.tokens[index], split.labels[index]


# ---------------------------------------------------------------------------------------- driver


@dataclass
class FinetuneResult:
    checkpoint_dir: Path
    """out_dir: the classifier checkpoint with the best validation accuracy (`load_classifier` reads it)."""
    report: dict[str, Any]
    """What out_dir/finetune.json holds."""
    history: list[dict[str, Any]] = field(default_factory=list)
    """Every report of this call in step order: loss (and loss_clf, loss_gen), lr; val_accuracy and
    val_loss on evaluation steps."""


def _pretrained(checkpoint: str | os.PathLike[str]) -> tuple[Path, ModelConfig, dict[str, Any]]:
    path = Path(checkpoint).expanduser().absolute()
    if not (path / CONFIG_FILE).is_file():
        raise FinetuneError(f"--checkpoint: {path} is not a checkpoint folder (no {CONFIG_FILE})")
    saved = read_config(path)
    try:
        return path, from_dict(ModelConfig, saved), saved
    except (TypeError, ValueError) as exc:
        raise FinetuneError(f"--checkpoint: {path}/{CONFIG_FILE} is not an igpt model config: {exc}") from exc


def _part(split: LabelledSplit, index: np.ndarray) -> dict[str, Any]:
    return {"path": str(split.path), "split": split.split, "option": split.option, "index": index.tolist()}


def finetune(
    checkpoint: str | os.PathLike[str],
    train_shards: str | os.PathLike[str],
    test_shards: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    config: FinetuneConfig | None = None,
    val_shards: str | os.PathLike[str] | None = None,
    ray_address: str | None = None,
    ray_logs: bool = False,
    run_name: str | None = None,
    on_report: Callable[[dict[str, Any]], None] | None = None,
) -> FinetuneResult:
    """Fine-tunes the pretrained `checkpoint` (or, with `config.from_scratch`, its architecture from random
    initialisation) on the labelled `train_shards` with `config.workers` Ray Train workers.

    The validation set is `val_shards` when given, else `config.val_fraction` of the training subset
    (stratified, seeded). The checkpoint with the best validation accuracy is published into `out_dir`,
    and test accuracy measured once on it, at the end; both go to `out_dir/finetune.json`, and the
    accuracy table (the probe's probe.md beside it) to `out_dir/finetune.md`. Ray Train's
    storage is `out_dir/ray/<run_name>`: a rerun with the same out_dir and run_name resumes the run.
    Every input is checked before anything is written (FinetuneError naming the option). `on_report` and
    `ray_logs` are as in `pretrain.pretrain`.
    """
    import ray  # heavy: ray

    began = time.perf_counter()
    tune = config or FinetuneConfig()
    pretrained, model_config, saved = _pretrained(checkpoint)
    palette_digest = saved.get("palette_digest")
    train = load_split(train_shards, "--train")
    test = load_split(test_shards, "--test")
    val = load_split(val_shards, "--val") if val_shards is not None else None
    splits = [train, test] + ([val] if val is not None else [])
    for split in splits:
        check_palette(split, palette_digest, pretrained)
        check_resolution(split, model_config.block_size, pretrained)
    if tune.head_layer is not None and tune.head_layer >= model_config.n_layer:
        raise FinetuneError(
            f"--head-layer: {tune.head_layer} is not a block of the {model_config.n_layer}-layer --checkpoint"
        )
    n_classes, class_names = class_space(train, *splits[1:])
    subsets = draw_subsets(
        train,
        test,
        val,
        max_train=tune.max_train,
        max_test=tune.max_test,
        val_fraction=tune.val_fraction,
        seed=tune.seed,
    )
    if subsets.absent_test_classes:
        logger.warning(
            "test classes %s never occur in the training subset: every such image is misclassified",
            subsets.absent_test_classes,
        )
    val_split = val if val is not None else train
    init_from = None if tune.from_scratch else {"path": str(pretrained), "step": saved.get("step")}
    record = {
        "finetune": to_dict(tune),
        "pretrained": {"path": str(pretrained), "step": saved.get("step")},
        "splits": subsets.record(train, val_split, test),
    }

    out = Path(out_dir).expanduser().absolute()
    name = run_name or DEFAULT_RUN_NAME
    storage = out / RAY_STORAGE_DIR
    with ray_train.latest_checkpoint(storage / name) as latest:
        if latest is not None:
            _check_resumable(latest, model_config, n_classes)
    ensure_ray(ray_address, ray_logs=ray_logs)
    for path in (out, train.path, test.path, pretrained, *([val.path] if val else [])):
        check_shared_storage(path, ray_address)
    storage.mkdir(parents=True, exist_ok=True)
    palette = (
        Palette.load(pretrained).centers.astype(np.float32) if (pretrained / PALETTE_FILE).is_file() else None
    )
    use_gpu = ray.cluster_resources().get("GPU", 0) >= tune.workers
    fitted = ray_train.fit(
        run_worker,
        {
            "model": to_dict(model_config),
            "finetune": to_dict(tune),
            "train": _part(train, subsets.train),
            "val": _part(val_split, subsets.val),
            "n_classes": n_classes,
            "class_names": class_names,
            "palette": palette,
            "palette_digest": palette_digest,
            "init_from": init_from,
            "record": record,
        },
        name=name,
        storage=storage,
        workers=tune.workers,
        use_gpu=use_gpu,
        placement_strategy="PACK",
        keep_checkpoints=tune.keep_checkpoints,
        max_failures=tune.max_failures,
        on_report=on_report,
        score_attribute=SCORE,
    )
    if fitted.best is None:
        raise FinetuneError(f"--out: the run {storage / name} ended without a checkpoint")
    best, best_metrics = fitted.best
    publish(best, out)

    import torch  # heavy: torch

    from igpt_core.classifier import evaluate_classifier  # heavy: torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    classifier, _, published = load_classifier(out, map_location=device)
    correct, nats, count = evaluate_classifier(
        classifier, test.tokens[subsets.test], test.labels[subsets.test], 64, device
    )
    report = {
        "objective": tune.objective,
        "from_scratch": tune.from_scratch,
        "init_from": init_from,
        "pretrained": record["pretrained"],
        "steps": tune.steps,
        "best_step": int(published["step"]),
        "val_accuracy": float(best_metrics[SCORE]),
        "val_loss": float(best_metrics.get("val_loss", float("nan"))),
        "test_accuracy": correct / max(count, 1),
        "test_loss": nats / max(count, 1),
        "n_classes": n_classes,
        "class_names": class_names,
        "splits": record["splits"],
        "val_from_train": subsets.val_from_train,
        "absent_test_classes": subsets.absent_test_classes,
        "test_in_train": subsets.test_in_train,
        "config": to_dict(tune),
        "seconds": round(time.perf_counter() - began, 1),
    }
    for name, text in (
        (REPORT_FILE, json.dumps(report, indent=2, sort_keys=True)),
        (TABLE_FILE, format_finetune_table(report)),
    ):
        tmp = out / (name + ".tmp")
        tmp.write_text(text + "\n")
        os.replace(tmp, out / name)  # a reader never sees half a file
    return FinetuneResult(checkpoint_dir=out, report=report, history=fitted.history)


def _check_resumable(latest: Path, model: ModelConfig, n_classes: int) -> None:
    try:
        check_resumable(latest, model)
    except CheckpointError as exc:
        raise FinetuneError(f"--checkpoint: {exc}") from exc
    section = read_config(latest).get(CLASSIFIER_KEY) or {}
    if section.get("n_classes") != n_classes:
        raise FinetuneError(
            f"--train: the run's checkpoint {latest} has {section.get('n_classes')} classes, the data "
            f"{n_classes}; use a new --out or run name"
        )
    logger.info("resuming the fine-tuning run from %s", latest)


def format_finetune_table(*reports: dict[str, Any]) -> str:
    """A Markdown table of fine-tuning runs (finetune.json reports), one row each."""
    lines = [
        "| objective | init | steps | best step | val acc | test acc |",
        "|---|---|---|---|---|---|",
    ]
    for report in reports:
        init = "random" if report["from_scratch"] else "pretrained"
        lines.append(
            f"| {report['objective']} | {init} | {report['steps']} | {report['best_step']} | "
            f"{report['val_accuracy']:.4f} | {report['test_accuracy']:.4f} |"
        )
    return "\n".join(lines)
