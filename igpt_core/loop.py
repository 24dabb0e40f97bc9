"""The training loop: one loop for every objective, with no launcher in it.

`train` gets the model, an `Objective` (what to minimise on a batch, how to evaluate), the rank's data
`Stream`, a `Checkpointer` and a `Runtime` (rank, world size, device, collectives, the latest checkpoint,
`report`), and reads top to bottom: setup, resume, loop, evaluate, report. It imports nothing of Ray: Ray
Train is one `Runtime` (`igpt_core.ray_train`); a test's in-process runtime is another. Pretraining's
next-pixel objective lives in `igpt_core.pretrain`.

Every rank runs the same steps and makes the same collective calls in the same order (the stream gives
every rank a batch each step, so DDP never waits on a rank that ran out).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from igpt_core.checkpointer import Checkpointer, Progress
from igpt_core.config import TrainConfig

if TYPE_CHECKING:
    import torch
    from torch import nn

    from igpt_core.model import ImageGPT

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Batch:
    """One rank's share of a step's samples."""

    tokens: np.ndarray
    """(B, R*R) uint16 image tokens."""
    labels: np.ndarray | None
    """(B,) int64 class labels; None when the data has none."""


class Runtime(Protocol):
    """Where the loop runs: one rank of `world_size`, and the launcher's checkpoint storage."""

    rank: int
    world_size: int
    device: torch.device

    def prepare(self, model: nn.Module) -> nn.Module:
        """The model moved to `device`, wrapped for data parallelism when world_size > 1."""
        ...

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Element-wise sums over every rank."""
        ...

    def all_gather(self, value: Any) -> list[Any]:
        """Every rank's `value` (picklable), in rank order."""
        ...

    def latest_checkpoint(self) -> contextlib.AbstractContextManager[Path | None]:
        """The run's latest reported checkpoint as a local folder for the block, or None (a new run)."""
        ...

    def report(self, metrics: dict[str, Any], checkpoint_folder: Path | None) -> None:
        """Reports a step's metrics (every rank, same steps), with rank 0's checkpoint folder when one was
        saved; the folder is stored (copied) before this returns. The folder's name names it in storage."""
        ...


class Stream(Protocol):
    """A rank's endless, resumable stream of samples (`igpt_core.data.TokenStream`)."""

    def next_labelled_batch(self, batch_size: int) -> tuple[np.ndarray, np.ndarray | None]: ...

    def state_dict(self) -> dict[str, int]:
        """The position {"epoch", "offset"}."""
        ...

    def load_state_dict(self, state: dict[str, int]) -> None: ...


class Objective(Protocol):
    """What the loop minimises and how a run is evaluated (pretraining: next-pixel cross-entropy)."""

    def loss(
        self, model: nn.Module, batch: Batch, *, device: torch.device, dtype: torch.dtype | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The scalar loss to minimise (autocast to `dtype` where the objective wants it) and its named
        terms as scalar tensors (empty when the loss is one term); each is averaged over the log window."""
        ...

    def evaluate(self, model: nn.Module, runtime: Runtime) -> dict[str, float]:
        """Evaluation metrics of the unwrapped model, agreed over every rank (a collective)."""
        ...


# ---------------------------------------------------------------------------------------- runtimes


class ProcessGroupRuntime:
    """A runtime over torch.distributed's default process group (no collective when world_size is 1):
    the base of the Ray Train runtime and of in-process ones. `latest_checkpoint` has none and `report`
    drops everything; subclasses store them."""

    def __init__(self, rank: int = 0, world_size: int = 1, device: torch.device | None = None) -> None:
        import torch  # heavy: torch

        self.rank, self.world_size = rank, world_size
        self.device = device if device is not None else torch.device("cpu")

    def prepare(self, model: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel  # heavy: torch

        model = model.to(self.device)
        return DistributedDataParallel(model) if self.world_size > 1 else model

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        if self.world_size == 1:
            return values
        import torch  # heavy: torch
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def all_gather(self, value: Any) -> list[Any]:
        if self.world_size == 1:
            return [value]
        import torch.distributed as dist  # heavy: torch

        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        yield None

    def report(self, metrics: dict[str, Any], checkpoint_folder: Path | None) -> None:
        pass


# ---------------------------------------------------------------------------------------- schedule, precision


def learning_rate(step: int, train: TrainConfig) -> float:
    """The learning rate of optimizer step `step` (1-based): linear warmup to `lr` over
    `train.schedule_warmup_steps` (warmup_steps capped at a share of the run), then cosine decay to
    `lr * min_lr_ratio` at `steps`."""
    warmup = train.schedule_warmup_steps
    if warmup and step <= warmup:
        return train.lr * step / warmup
    floor = train.lr * train.min_lr_ratio
    span = max(train.steps - warmup, 1)
    progress = min(max((step - warmup) / span, 0.0), 1.0)
    return floor + 0.5 * (train.lr - floor) * (1.0 + math.cos(math.pi * progress))


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    import torch  # heavy: torch

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


def _agreed_autocast_dtype(precision: str, runtime: Runtime) -> torch.dtype | None:
    """`autocast_dtype` for this rank, made the same on every rank: `auto` is decided by each worker's
    hardware, and a cluster mixing CPU kinds (or GPU generations) must not train some ranks in bf16 and
    others in fp32 under one DDP model. bf16 only when every rank has it natively; warned otherwise."""
    dtype = autocast_dtype(precision, runtime.device)
    world = runtime.world_size
    if precision != "auto" or world == 1:
        return dtype
    import torch  # heavy: torch

    ranks_with_bf16 = runtime.all_reduce_sum([1.0 if dtype is torch.bfloat16 else 0.0])[0]
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

    from igpt_core import attention, native  # heavy: both import torch

    # torch.cpu's capability probes are private; a torch without them gets fp32, the safe choice
    return native.cpu_has_avx512_bf16() or attention.cpu_has_amx()


def _prepare_model(model: ImageGPT, device: torch.device, dtype: torch.dtype | None) -> ImageGPT:
    """The one place the loop sets the model up for training on `device` in `dtype`, before DDP and
    torch.compile see it: the attention backend (igpt's CPU bf16 kernel where it applies, else SDPA)."""
    from igpt_core import attention  # heavy: attention registers torch ops

    backend = attention.select(model, device=device, dtype=dtype)
    logger.info("attention backend: %s", backend)
    return model


# ---------------------------------------------------------------------------------------- the loop


def train(
    *,
    model: ImageGPT,
    objective: Objective,
    stream: Stream,
    checkpointer: Checkpointer,
    runtime: Runtime,
    config: TrainConfig,
) -> Progress:
    """Trains `model` (the plain module, same initial weights on every rank) from the run's latest
    checkpoint to `config.steps`, reporting metrics every `log_every`, `eval_every` and checkpoint step.
    Returns the counters at the end."""
    import torch  # heavy: torch
    from torch.nn.parallel import DistributedDataParallel

    # --- setup
    device, world = runtime.device, runtime.world_size
    dtype = _agreed_autocast_dtype(config.precision, runtime)
    batch_size = config.per_worker_batch_size
    wrapped = runtime.prepare(_prepare_model(model, device, dtype))
    raw: ImageGPT = wrapped.module if isinstance(wrapped, DistributedDataParallel) else wrapped  # type: ignore[assignment]
    # the step runs through the compiled module; evaluation and checkpoints use the plain one (same weights)
    step_model: nn.Module = torch.compile(wrapped) if config.compile else wrapped  # type: ignore[assignment]
    optimizer = raw.configure_optimizer(config.weight_decay, config.lr, (config.beta1, config.beta2))
    tokens_per_step = batch_size * world * raw.config.block_size

    # --- resume
    progress = Progress()
    start = checkpointer.load(model=raw, optimizer=optimizer, stream=stream, progress=progress)

    # --- loop
    wrapped.train()
    steps_taken = 0
    window = _Window(device)
    try:
        for step in range(start + 1, config.steps + 1):
            lr = learning_rate(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            tokens, labels = stream.next_labelled_batch(batch_size)
            loss, terms = objective.loss(step_model, Batch(tokens, labels), device=device, dtype=dtype)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), config.grad_clip or math.inf)
            optimizer.step()
            steps_taken += 1
            progress.step, progress.tokens_seen = step, progress.tokens_seen + tokens_per_step
            window.add(loss, terms)
            elapsed = window.elapsed()

            last = step == config.steps
            saved = checkpointer.save(step, last=last)
            log = step % config.log_every == 0
            evaluate = step % config.eval_every == 0 or last
            if not (log or evaluate or saved):
                continue

            # --- evaluate, report
            position = stream.state_dict()
            metrics: dict[str, Any] = {
                "step": step,
                **window.means(runtime),
                "lr": lr,
                "grad_norm": float(grad_norm),
                "tokens_per_s": window.steps * tokens_per_step / max(elapsed, 1e-9),
                "tokens_seen": progress.tokens_seen,
                "epoch": position["epoch"],
                "data_offset": position["offset"],
                "resumed_from": start,
            }
            if evaluate:
                metrics.update(objective.evaluate(raw, runtime))
            if last:
                metrics["rank_steps"] = [int(n) for n in runtime.all_gather(steps_taken)]
            runtime.report(metrics, saved.folder if saved else None)
            window = _Window(device)
    finally:
        checkpointer.close()
    return progress


class _Window:
    """The loss (and its terms) summed on the device since the last report: no host sync per step."""

    def __init__(self, device: torch.device) -> None:
        import torch  # heavy: torch

        self.device = device
        self.loss = torch.zeros((), device=device)
        self.terms: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.start = time.perf_counter()

    def add(self, loss: torch.Tensor, terms: dict[str, torch.Tensor]) -> None:
        self.loss += loss.detach()
        for name, value in terms.items():
            self.terms[name] = self.terms.get(name, 0) + value.detach()
        self.steps += 1

    def means(self, runtime: Runtime) -> dict[str, float]:
        """ "loss" and every term, averaged over the window's steps on every rank (a collective)."""
        names = sorted(self.terms)
        sums = runtime.all_reduce_sum(
            [float(self.loss), float(self.steps), *(float(self.terms[n]) for n in names)]
        )
        steps = sums[1]
        return {"loss": sums[0] / steps, **{n: s / steps for n, s in zip(names, sums[2:], strict=True)}}

    def elapsed(self) -> float:
        return time.perf_counter() - self.start
