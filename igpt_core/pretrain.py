"""Pretraining: next-pixel prediction on token shards, DDP over `train.workers` Ray Train workers.

`pretrain` (the driver) checks its inputs and the run's resume or warm start (`checkpointer.check_start`),
then runs `run_worker` on every worker through `igpt_core.ray_train.fit`; `run_worker` builds the model,
the rank's data stream, the `NextPixel` objective and the checkpointer, and hands them to the one training
loop (`igpt_core.loop.train`). Checkpoint format and save / resume policy live in `igpt_core.checkpoint`;
data (per-rank streams, held-out set) in `igpt_core.data`.

A rerun with the same `out_dir` and `run_name` continues from the run's latest checkpoint, at the same
step, learning rate and data position; asking for more `steps` extends the run. `init_from` warm-starts a
new run from another checkpoint folder (see `pretrain`).

This module imports torch and Ray only inside functions, so importing it (and `igpt_core`) stays cheap.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from igpt_core import loop, ray_train
from igpt_core.checkpoint import PALETTE_FILE, publish, read_trainer_state
from igpt_core.checkpointer import Checkpointer, check_start
from igpt_core.config import ModelConfig, TrainConfig, from_dict, to_dict
from igpt_core.data import DataPlan, PretrainError, TokenStream, held_out, plan_data
from igpt_core.distributed import ensure_ray
from igpt_core.palette import Palette
from igpt_core.shards import read_meta
from igpt_core.storage import check_shared_storage

if TYPE_CHECKING:
    import torch
    from torch import nn

logger = logging.getLogger(__name__)

DEFAULT_RUN_NAME = "pretrain"
RAY_STORAGE_DIR = "ray"
LN2 = math.log(2.0)


@dataclass
class PretrainResult:
    checkpoint_dir: Path
    """A plain checkpoint folder (out_dir itself) that `ImageGPT.load` reads."""
    step: int
    """Optimizer steps the checkpoint has taken in total (across reruns)."""
    metrics: dict[str, Any]
    """The last metrics reported."""
    history: list[dict[str, Any]] = field(default_factory=list)
    """Every report of this call, in step order (a step repeated after a worker restart appears once)."""


# ---------------------------------------------------------------------------------------- objective


def _loss(model: nn.Module, tokens: np.ndarray, config: ModelConfig, device: Any, dtype: Any) -> torch.Tensor:
    """Mean next-token cross-entropy (nats) of a batch of image tokens."""
    import torch  # heavy: torch
    import torch.nn.functional as F

    from igpt_core.model import inputs_from_tokens  # heavy: model imports torch

    inputs, targets = inputs_from_tokens(torch.from_numpy(tokens.astype(np.int64)), config.start_token)
    inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    with autocast:
        logits = model(inputs)  # (B, T, K)
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))


class NextPixel:
    """The pretraining objective: next-pixel cross-entropy; evaluated on the rank's held-out tokens."""

    def __init__(self, config: ModelConfig, held_out: np.ndarray, batch_size: int) -> None:
        self.config, self.held_out, self.batch_size = config, held_out, batch_size

    def loss(
        self, model: nn.Module, batch: loop.Batch, *, device: torch.device, dtype: torch.dtype | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return _loss(model, batch.tokens, self.config, device, dtype), {}

    def evaluate(self, model: nn.Module, runtime: loop.Runtime) -> dict[str, float]:
        """Held-out loss in nats and bits per token, averaged over every rank's held-out samples."""
        import torch  # heavy: torch

        was_training = model.training
        model.eval()
        total, count = 0.0, 0.0
        with torch.no_grad():
            for start in range(0, len(self.held_out), self.batch_size):
                chunk = self.held_out[start : start + self.batch_size]
                # in fp32 whatever the training precision: the recorded figure then matches a later
                # evaluation of the saved checkpoint and compares across runs (bf16 moves it ~1e-4)
                total += float(_loss(model, chunk, self.config, runtime.device, None)) * chunk.size
                count += chunk.size
        model.train(was_training)
        total, count = runtime.all_reduce_sum([total, count])
        nats = total / max(count, 1.0)
        return {"eval_loss": nats, "eval_bits_per_token": nats / LN2}


# ---------------------------------------------------------------------------------------- worker


def run_worker(runtime: loop.Runtime, config: dict[str, Any]) -> None:
    """One rank of a pretraining run. `config` holds `model` and `train` (config dicts), `shards` (an
    absolute path every node reads), `plan` (DataPlan fields), `palette` (float32 (K, 3) or None),
    `palette_digest` and `init_from` (None, or {"path", "step"} of the checkpoint a fresh run starts from)."""
    import torch  # heavy: torch

    from igpt_core.model import ImageGPT  # heavy: model imports torch

    model_config: ModelConfig = from_dict(ModelConfig, config["model"])
    train: TrainConfig = from_dict(TrainConfig, config["train"])
    plan = DataPlan(**config["plan"])
    shards = config["shards"]
    torch.manual_seed(train.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    model = ImageGPT(model_config)
    held_out_tokens, exclude = held_out(shards, plan, runtime.rank, runtime.world_size)
    stream = TokenStream(
        shards,
        plan.train_split,
        rank=runtime.rank,
        world_size=runtime.world_size,
        seed=train.seed,
        exclude=exclude,
    )
    checkpointer = Checkpointer(
        runtime,
        train=train,
        model_config=model_config,
        palette=config.get("palette"),
        palette_digest=config.get("palette_digest"),
        shards=shards,
        init_from=config.get("init_from"),
    )
    objective = NextPixel(model_config, held_out_tokens, train.per_worker_batch_size)
    with stream:  # stops its prefetch thread however the loop ends
        loop.train(
            model=model,
            objective=objective,
            stream=stream,
            checkpointer=checkpointer,
            runtime=runtime,
            config=train,
        )


# ---------------------------------------------------------------------------------------- driver


def _resolve_palette(palette_dir: str | Path | None, shards: Path) -> tuple[np.ndarray | None, str | None]:
    """The palette to store with the checkpoints, checked against the shards' palette digest."""
    expected = read_meta(shards).get("palette_digest")
    source = Path(palette_dir) if palette_dir is not None else shards
    if palette_dir is None and not (shards / PALETTE_FILE).is_file():
        logger.warning(
            "no palette_dir given and %s holds no %s: checkpoints carry no palette", shards, PALETTE_FILE
        )
        return None, expected
    try:
        palette = Palette.load(source)
    except (FileNotFoundError, ValueError) as exc:
        raise PretrainError(f"palette_dir: {exc}") from exc
    if expected is not None and palette.digest() != expected:
        raise PretrainError(
            f"palette_dir: {source} holds palette {palette.digest()[:12]}, but the shards were made with "
            f"{expected[:12]}"
        )
    return palette.centers.astype(np.float32), palette.digest()


def pretrain(
    shards: str | Path,
    out_dir: str | Path,
    *,
    model: ModelConfig,
    train: TrainConfig,
    palette_dir: str | Path | None = None,
    ray_address: str | None = None,
    ray_logs: bool = False,
    run_name: str | None = None,
    on_report: Callable[[dict[str, Any]], None] | None = None,
    init_from: str | Path | None = None,
    eval_shards: str | Path | None = None,
) -> PretrainResult:
    """Pretrains `model` on the token shards with `train.workers` Ray Train workers.

    Ray Train's storage (checkpoints it keeps, its run state) is `out_dir/ray/<run_name>`; the latest
    checkpoint is also copied into `out_dir` itself, so `ImageGPT.load(out_dir)` works. Rerunning with the
    same out_dir and run_name resumes from the latest checkpoint. On a multi-node cluster out_dir and
    shards must be on storage every node sees. `on_report` gets each report's metrics on the driver, from
    a background thread, as they arrive. Ray's own output (Ray Train's controller and workers) stays in
    Ray's log files unless `ray_logs` (see `distributed.ensure_ray`).

    `init_from` (a checkpoint folder: model.safetensors + config.json with the same model config) warm-
    starts a fresh run: every worker loads those weights, and the step count continues from the source's
    `step`, so `train.steps` is the total and must exceed it (the learning rate follows the schedule from
    there, as a resume with more steps would). The optimizer state (AdamW moments) and the data stream
    start fresh: they belong to the source's data, not to these shards. The source is recorded as
    `init_from` {"path", "step"} in every checkpoint's config.json. When the run already has a checkpoint of
    its own (a rerun after a crash), that is resumed and `init_from` is ignored.

    `eval_shards` (a token folder made with the same palette) is the held-out set to evaluate on instead
    of the shards' own `eval_split` or held-back train samples; its split is `train.eval_split`, else
    `val`, else `test`, else its only split.
    """
    import ray  # heavy: ray

    shards_path = Path(shards).expanduser().absolute()
    out = Path(out_dir).expanduser().absolute()
    name = run_name or DEFAULT_RUN_NAME
    if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise PretrainError(f"run_name: must be letters, digits, '-', '_' or '.', got {name!r}")
    eval_path = Path(eval_shards).expanduser().absolute() if eval_shards is not None else None
    plan = plan_data(shards_path, model, train, eval_path)
    palette, palette_digest = _resolve_palette(palette_dir, shards_path)
    storage = out / RAY_STORAGE_DIR
    with ray_train.latest_checkpoint(storage / name) as latest:
        warm = check_start(
            latest,
            str(storage / name),
            model=model,
            train=train,
            init_from=init_from,
            palette_digest=palette_digest,
        )

    ensure_ray(ray_address, ray_logs=ray_logs)
    storage.mkdir(parents=True, exist_ok=True)
    shared = (
        [storage, shards_path] + ([eval_path] if eval_path else []) + ([Path(warm["path"])] if warm else [])
    )
    for path in shared:  # workers on other nodes read these (shards, warm start) and write checkpoints
        check_shared_storage(path, ray_address)
    use_gpu = train.use_gpu
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) >= train.workers

    fitted = ray_train.fit(
        run_worker,
        {
            "model": to_dict(model),
            "train": to_dict(train),
            "shards": str(shards_path),
            "plan": {
                "train_split": plan.train_split,
                "eval_split": plan.eval_split,
                "holdout": plan.holdout,
                "eval_shards": plan.eval_shards,
            },
            "palette": palette,
            "palette_digest": palette_digest,
            "init_from": warm,
        },
        name=name,
        storage=storage,
        workers=train.workers,
        use_gpu=use_gpu,
        placement_strategy=train.placement_strategy,
        keep_checkpoints=train.keep_checkpoints,
        max_failures=train.max_failures,
        on_report=on_report,
    )
    if fitted.checkpoint is None:
        raise PretrainError(f"train: the run {storage / name} ended without a checkpoint")
    publish(fitted.checkpoint, out)
    step = int(read_trainer_state(out)["step"])
    metrics = fitted.history[-1] if fitted.history else fitted.metrics
    return PretrainResult(checkpoint_dir=out, step=step, metrics=metrics, history=fitted.history)
