"""Pretraining: next-pixel prediction on token shards, as a Ray Train `TorchTrainer` (DDP over N workers).

`pretrain` (the driver) checks its inputs, starts the trainer and relays metrics; `train_loop_per_worker`
(each worker) reads top to bottom: setup, resume, loop, evaluate, report. Checkpoint format and save /
keep / resume policy live in `igpt_core.checkpoint`.

Data (per-rank streams, held-out set) lives in `igpt_core.data`: every rank takes the same number of steps
whatever the shards, so DDP never waits on a rank that ran out.

A rerun with the same `out_dir` and `run_name` continues from the run's latest checkpoint (Ray Train V2
restores it for a new `TorchTrainer` with the same `RunConfig(name, storage_path)`), at the same step,
learning rate and data position; asking for more `steps` extends the run.

`init_from` warm-starts a new run from another checkpoint folder (continued training on new data): the
weights are loaded and the step count continues from the source's step, while the optimizer and the data
stream start fresh (see `pretrain`). A run that already has a checkpoint of its own resumes that instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from igpt_core.config import ModelConfig, TrainConfig, from_dict, to_dict
from igpt_core.data import DataPlan, PretrainError, TokenStream, held_out, plan_data

if TYPE_CHECKING:
    import torch

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


# ---------------------------------------------------------------------------------------- schedule


def learning_rate(step: int, train: TrainConfig) -> float:
    """The learning rate of optimizer step `step` (1-based): linear warmup to `lr` over `warmup_steps`,
    then cosine decay to `lr * min_lr_ratio` at `steps`."""
    if train.warmup_steps and step <= train.warmup_steps:
        return train.lr * step / train.warmup_steps
    floor = train.lr * train.min_lr_ratio
    span = max(train.steps - train.warmup_steps, 1)
    progress = min(max((step - train.warmup_steps) / span, 0.0), 1.0)
    return floor + 0.5 * (train.lr - floor) * (1.0 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------- worker


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    import torch

    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    # auto: bf16 where the hardware does it natively: CUDA GPUs that support it, and CPUs with AVX512-BF16
    # or AMX, where bf16 autocast measured ~1.7x fp32's training step (bench/bench_train_step.py) with the
    # same loss curve; elsewhere bf16 on a CPU is emulated and slower, so fp32
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if device.type == "cpu" and _cpu_has_native_bf16():
        return torch.bfloat16
    return None


def _agreed_autocast_dtype(precision: str, device: Any, world: int) -> torch.dtype | None:
    """`_autocast_dtype` for this rank, made the same on every rank: `auto` is decided by each worker's
    hardware, and a cluster mixing CPU kinds (or GPU generations) must not train some ranks in bf16 and
    others in fp32 under one DDP model. bf16 only when every rank has it natively; warned otherwise."""
    dtype = _autocast_dtype(precision, device)
    if precision != "auto" or world == 1:
        return dtype
    import torch

    ranks_with_bf16 = _all_reduce_sum([1.0 if dtype is torch.bfloat16 else 0.0], device, world)[0]
    if ranks_with_bf16 == world:
        return dtype
    if ranks_with_bf16 > 0 and dtype is torch.bfloat16:
        logger.warning(
            "precision=auto: %d of %d workers have native bf16; all train in fp32",
            int(ranks_with_bf16),
            world,
        )
    return None


def _cpu_has_native_bf16() -> bool:
    import torch

    from igpt_core import native

    # torch.cpu's capability probes are private; a torch without them gets fp32, the safe choice
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return native.cpu_has_avx512_bf16() or (bool(amx()) if amx is not None else False)


def _loss(
    model: torch.nn.Module, tokens: np.ndarray, config: ModelConfig, device: Any, dtype: Any
) -> torch.Tensor:
    """Mean next-token cross-entropy (nats) of a batch of image tokens."""
    import torch
    import torch.nn.functional as F

    from igpt_core.model import inputs_from_tokens

    inputs, targets = inputs_from_tokens(torch.from_numpy(tokens.astype(np.int64)), config.start_token)
    inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    with autocast:
        logits = model(inputs)  # (B, T, K)
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))


def _all_reduce_sum(values: list[float], device: Any, world: int) -> list[float]:
    if world == 1:
        return values
    import torch
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def _evaluate(
    model: torch.nn.Module,
    held_out: np.ndarray,
    batch: int,
    config: ModelConfig,
    device: Any,
    dtype: Any,
    world: int,
) -> dict[str, float]:
    """Held-out loss in nats and bits per token, averaged over every rank's held-out samples."""
    import torch

    was_training = model.training
    model.eval()
    total, count = 0.0, 0.0
    with torch.no_grad():
        for start in range(0, len(held_out), batch):
            chunk = held_out[start : start + batch]
            total += float(_loss(model, chunk, config, device, dtype)) * chunk.size
            count += chunk.size
    model.train(was_training)
    total, count = _all_reduce_sum([total, count], device, world)
    nats = total / max(count, 1.0)
    return {"eval_loss": nats, "eval_bits_per_token": nats / LN2}


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The Ray Train worker function. `config` holds `model` and `train` (config dicts), `shards` (an
    absolute path every node reads), `plan` (DataPlan fields), `palette` (float32 (K, 3) or None),
    `palette_digest` and `init_from` (None, or {"path", "step"} of the checkpoint a fresh run starts from)."""
    import ray.train
    import ray.train.torch
    import torch
    from torch.nn.parallel import DistributedDataParallel

    from igpt_core.checkpoint import Checkpointer, load_weights
    from igpt_core.model import ImageGPT

    # --- setup
    model_config: ModelConfig = from_dict(ModelConfig, config["model"])
    train: TrainConfig = from_dict(TrainConfig, config["train"])
    plan = DataPlan(**config["plan"])
    shards = config["shards"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    dtype = _agreed_autocast_dtype(train.precision, device, world)
    batch = train.per_worker_batch_size
    checkpointer = Checkpointer(
        train=train,
        model_config=model_config,
        palette=config.get("palette"),
        palette_digest=config.get("palette_digest"),
        shards=shards,
        init_from=config.get("init_from"),
    )

    torch.manual_seed(train.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    model = ImageGPT(model_config)

    # --- resume
    restored = checkpointer.restore()
    start_step, position, tokens_seen = 0, {"epoch": 0, "offset": 0}, 0
    if restored is not None:
        model.load_state_dict(restored.weights)
        start_step, tokens_seen = restored.step, int(restored.state.get("tokens_seen", 0))
        if restored.state["world_size"] == world:
            position = dict(restored.state["data"][rank])
            rng = restored.state["rng"][rank]
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], device)
        else:
            # A new world size splits the samples differently: the saved offsets mean nothing here, so
            # every rank starts the epoch after the furthest one any rank had begun.
            position = {"epoch": 1 + max(int(p["epoch"]) for p in restored.state["data"]), "offset": 0}
            logger.warning(
                "resuming with %d workers instead of %d: starting a new data epoch",
                world,
                restored.state["world_size"],
            )
    else:
        if checkpointer.init_from is not None:
            # Warm start: the source's weights and step count; optimizer and data begin anew (see pretrain).
            model.load_state_dict(load_weights(checkpointer.init_from["path"]))
            start_step = int(checkpointer.init_from["step"] or 0)
        torch.manual_seed(train.seed + 1 + rank)  # dropout masks differ across ranks
    wrapped = ray.train.torch.prepare_model(model)  # to the device; DDP when world > 1
    raw: ImageGPT = wrapped.module if isinstance(wrapped, DistributedDataParallel) else wrapped  # type: ignore[assignment]
    # the step runs through the compiled module; evaluation and checkpoints use the plain one (same weights)
    step_model: torch.nn.Module = torch.compile(wrapped) if train.compile else wrapped  # type: ignore[assignment]
    optimizer = raw.configure_optimizer(train.weight_decay, train.lr, (train.beta1, train.beta2))
    if restored is not None:
        optimizer.load_state_dict(restored.state["optimizer"])

    held_out_tokens, exclude = held_out(shards, plan, rank, world)
    stream = TokenStream(
        shards, plan.train_split, rank=rank, world_size=world, seed=train.seed, exclude=exclude, **position
    )
    schedule = {
        "kind": "warmup_cosine",
        "lr": train.lr,
        "warmup_steps": train.warmup_steps,
        "steps": train.steps,
        "min_lr_ratio": train.min_lr_ratio,
    }
    tokens_per_step = batch * world * model_config.block_size

    # --- loop
    wrapped.train()
    steps_taken = 0
    window_loss, window_steps, window_start = torch.zeros((), device=device), 0, time.perf_counter()
    for step in range(start_step + 1, train.steps + 1):
        lr = learning_rate(step, train)
        for group in optimizer.param_groups:
            group["lr"] = lr
        tokens = stream.next_batch(batch)
        loss = _loss(step_model, tokens, model_config, device, dtype)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), train.grad_clip or math.inf)
        optimizer.step()
        steps_taken += 1
        tokens_seen += tokens_per_step
        window_loss += loss.detach()  # summed on the device: no host sync per step
        window_steps += 1

        log = step % train.log_every == 0
        evaluate = step % train.eval_every == 0 or step == train.steps
        save = checkpointer.due(step)
        if not (log or evaluate or save):
            continue

        # --- evaluate, report
        loss_sum, steps_sum = _all_reduce_sum([float(window_loss), float(window_steps)], device, world)
        elapsed = time.perf_counter() - window_start
        metrics: dict[str, Any] = {
            "step": step,
            "loss": loss_sum / steps_sum,
            "lr": lr,
            "grad_norm": float(grad_norm),
            "tokens_per_s": window_steps * tokens_per_step / max(elapsed, 1e-9),
            "tokens_seen": tokens_seen,
            "epoch": stream.epoch,
            "data_offset": stream.offset,
            "resumed_from": start_step,
        }
        if evaluate:
            # held-out loss in fp32 whatever the training precision: the recorded figure then matches a
            # later evaluation of the saved checkpoint and compares across runs (bf16 moves it ~1e-4)
            metrics.update(_evaluate(raw, held_out_tokens, batch, model_config, device, None, world))
        if step == train.steps:
            metrics["rank_steps"] = [int(n) for n in _gather_ints(steps_taken, world)]
        if save:
            checkpointer.save(
                step,
                metrics,
                model=raw,
                optimizer=optimizer,
                schedule=schedule,
                data_position=stream.position(),
                tokens_seen=tokens_seen,
            )
        else:
            ray.train.report(metrics)
        window_loss, window_steps, window_start = torch.zeros((), device=device), 0, time.perf_counter()


def _gather_ints(value: int, world: int) -> list[int]:
    from igpt_core.checkpoint import gather_objects

    return [int(v) for v in gather_objects(value, world)]


# ---------------------------------------------------------------------------------------- driver


class _Inbox:
    """A zero-CPU actor the Ray Train controller posts reports to and the driver drains (see _Relay)."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self.ready = asyncio.Event()

    async def push(self, item: dict[str, Any]) -> None:
        self.items.append(item)
        self.ready.set()

    async def take(self, timeout_s: float) -> list[dict[str, Any]]:
        if not self.items:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.ready.wait(), timeout_s)
        items, self.items = self.items, []
        self.ready.clear()
        return items


def _relay_class() -> type:
    import ray
    from ray.train import UserCallback

    class _Relay(UserCallback):
        """Runs in the Ray Train controller: forwards rank 0's metrics of each report to the inbox."""

        def __init__(self, inbox: Any) -> None:
            self.inbox = inbox

        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            record = dict(metrics[0]) if metrics else {}
            if checkpoint is not None:
                record["checkpoint"] = checkpoint.path
            # Wait for the inbox to hold it, so every report is there before fit() returns.
            ray.get(self.inbox.push.remote(record))

    return _Relay


def _resolve_palette(palette_dir: str | Path | None, shards: Path) -> tuple[np.ndarray | None, str | None]:
    """The palette to store with the checkpoints, checked against the shards' palette digest."""
    from igpt_core.palette import Palette
    from igpt_core.shards import read_meta

    expected = read_meta(shards).get("palette_digest")
    source = Path(palette_dir) if palette_dir is not None else shards
    if palette_dir is None and not (shards / "palette.npy").is_file():
        logger.warning(
            "no palette_dir given and %s holds no palette.npy: checkpoints carry no palette", shards
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


def _latest_checkpoint(run_dir: Path) -> Any | None:
    """The latest checkpoint Ray Train recorded under `run_dir`, or None for a new run."""
    from ray.train import Result

    if not run_dir.is_dir():
        return None
    try:
        return Result.from_path(str(run_dir)).checkpoint
    except RuntimeError:  # Ray Train has recorded no checkpoint of this run (yet)
        return None


def _check_warm_start(
    init_from: str | Path | None, model: ModelConfig, train: TrainConfig, palette_digest: str | None
) -> dict[str, Any] | None:
    """The lineage record {"path", "step"} of `init_from`, checked against the run (None: no warm start)."""
    from igpt_core.checkpoint import check_init_from, read_config

    if init_from is None:
        return None
    warm = check_init_from(init_from, model)
    source_step = warm["step"] or 0
    if train.steps <= source_step:
        raise PretrainError(
            f"train.steps: {train.steps} is not beyond init_from's step {source_step} ({warm['path']}); a warm "
            f"start continues the step count, so ask for {source_step} + the steps to train"
        )
    source_palette = read_config(warm["path"]).get("palette_digest")
    if source_palette is not None and palette_digest is not None and source_palette != palette_digest:
        # Allowed (a refit palette keeps K colours), but the tokens now name other colours than it learned.
        logger.warning(
            "init_from %s was trained on palette %s, these shards use %s",
            warm["path"],
            source_palette[:12],
            palette_digest[:12],
        )
    logger.info("warm start from %s at step %d", warm["path"], source_step)
    return warm


def pretrain(
    shards: str | Path,
    out_dir: str | Path,
    *,
    model: ModelConfig,
    train: TrainConfig,
    palette_dir: str | Path | None = None,
    ray_address: str | None = None,
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
    a background thread, as they arrive.

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
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from igpt_core.checkpoint import check_resumable, publish, read_trainer_state
    from igpt_core.distributed import ensure_ray
    from igpt_core.storage import check_shared_storage

    shards_path = Path(shards).expanduser().absolute()
    out = Path(out_dir).expanduser().absolute()
    name = run_name or DEFAULT_RUN_NAME
    if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise PretrainError(f"run_name: must be letters, digits, '-', '_' or '.', got {name!r}")
    eval_path = Path(eval_shards).expanduser().absolute() if eval_shards is not None else None
    plan = plan_data(shards_path, model, train, eval_path)
    palette, palette_digest = _resolve_palette(palette_dir, shards_path)
    storage = out / RAY_STORAGE_DIR
    latest = _latest_checkpoint(storage / name)
    if latest is not None:
        with latest.as_directory() as folder:
            check_resumable(folder, model)
            reached = int(read_trainer_state(folder)["step"])
        if reached >= train.steps:
            logger.warning(
                "%s is already at step %d (steps=%d): nothing to train", storage / name, reached, train.steps
            )
        else:
            logger.info("resuming %s from step %d", storage / name, reached)
        if init_from is not None:
            logger.info(
                "%s has a checkpoint of its own: resuming it, init_from=%s ignored", storage / name, init_from
            )
    warm = _check_warm_start(init_from, model, train, palette_digest) if latest is None else None

    ensure_ray(ray_address)
    storage.mkdir(parents=True, exist_ok=True)
    shared = (
        [storage, shards_path] + ([eval_path] if eval_path else []) + ([Path(warm["path"])] if warm else [])
    )
    for path in shared:  # workers on other nodes read these (shards, warm start) and write checkpoints
        check_shared_storage(path, ray_address)
    use_gpu = train.use_gpu
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) >= train.workers

    inbox: Any = ray.remote(num_cpus=0)(_Inbox).remote()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
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
        scaling_config=ray.train.ScalingConfig(
            num_workers=train.workers, use_gpu=use_gpu, placement_strategy=train.placement_strategy
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=str(storage),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=train.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=train.max_failures),
            callbacks=[_relay_class()(inbox)],
        ),
    )

    reports: list[dict[str, Any]] = []
    done = threading.Event()

    def drain() -> None:
        while True:
            finished = done.is_set()  # read before taking, so the last take sees every report
            for record in ray.get(inbox.take.remote(0.5)):
                reports.append(record)
                if on_report is not None:
                    try:
                        on_report(record)
                    except Exception:  # a failing listener must not stop the run or the relay
                        logger.exception("on_report failed for step %s", record.get("step"))
            if finished:
                return

    relay = threading.Thread(target=drain, name="igpt-pretrain-reports", daemon=True)
    relay.start()
    try:
        result = trainer.fit()
    finally:
        done.set()
        relay.join()
        ray.kill(inbox)

    if result.checkpoint is None:
        raise PretrainError(f"train: the run {storage / name} ended without a checkpoint")
    publish(result.checkpoint, out)
    step = int(read_trainer_state(out)["step"])
    by_step = {int(r["step"]): r for r in reports if "step" in r}  # the last report of a step wins
    history = [by_step[s] for s in sorted(by_step)]
    metrics = history[-1] if history else dict(result.metrics or {})
    return PretrainResult(checkpoint_dir=out, step=step, metrics=metrics, history=history)
