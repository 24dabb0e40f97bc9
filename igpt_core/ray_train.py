"""Ray Train as the training loop's runtime: the worker side (`RayRuntime`), the `TorchTrainer` driver
(`fit`) and the relay that brings every report's metrics to the driver as they arrive.

A rerun with the same `RunConfig(name, storage_path)` continues from the run's latest checkpoint: Ray
Train V2 hands it to the new workers through `ray.train.get_checkpoint()`, whether the worker group was
restarted after a failure or the whole run was started again. Ray Train keeps the last `num_to_keep`.

Ray is imported inside the functions (heavy: ray), so importing this module costs nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from igpt_core.loop import ProcessGroupRuntime

if TYPE_CHECKING:
    from torch import nn

logger = logging.getLogger(__name__)

Entry = Callable[[ProcessGroupRuntime, dict[str, Any]], None]
"""What each worker runs: a function of (its runtime, the run's config), importable by name."""


# ---------------------------------------------------------------------------------------- worker


class RayRuntime(ProcessGroupRuntime):
    """The runtime of one Ray Train worker: its rank, world size and device from `ray.train.get_context()`,
    collectives over the process group Ray Train set up, checkpoints through `ray.train.report`."""

    def __init__(self) -> None:
        import ray.train  # heavy: ray
        import ray.train.torch

        context = ray.train.get_context()
        super().__init__(context.get_world_rank(), context.get_world_size(), ray.train.torch.get_device())

    def prepare(self, model: nn.Module) -> nn.Module:
        import ray.train.torch  # heavy: ray

        return ray.train.torch.prepare_model(model)  # to the device; DDP when world > 1

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        import ray.train  # heavy: ray

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as folder:
            yield Path(folder)

    def report(self, metrics: dict[str, Any], checkpoint_folder: Path | None) -> None:
        import ray.train  # heavy: ray

        if checkpoint_folder is None:
            # on a checkpoint step the other ranks report without one; rank 0's folder name is used
            ray.train.report(metrics)
            return
        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_folder))
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=checkpoint_folder.name)


def _worker(config: dict[str, Any]) -> None:
    """The Ray Train worker function: `config["entry"]` with this worker's runtime and `config["config"]`."""
    entry: Entry = config["entry"]
    entry(RayRuntime(), config["config"])


# ---------------------------------------------------------------------------------------- driver


@contextlib.contextmanager
def latest_checkpoint(run_dir: Path) -> Iterator[Path | None]:
    """The latest checkpoint Ray Train recorded under `run_dir` as a local folder, or None for a new run."""
    from ray.train import Result  # heavy: ray

    checkpoint = None
    if run_dir.is_dir():
        try:
            checkpoint = Result.from_path(str(run_dir)).checkpoint
        except RuntimeError:  # Ray Train has recorded no checkpoint of this run (yet)
            checkpoint = None
    if checkpoint is None:
        yield None
        return
    with checkpoint.as_directory() as folder:
        yield Path(folder)


@dataclass(frozen=True)
class Fitted:
    """What `fit` brings back: the run's last checkpoint (a `ray.train.Checkpoint`, or None), the final
    metrics Ray Train kept, and every report in step order (a step repeated after a restart appears once)."""

    checkpoint: Any
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    best: tuple[Any, dict[str, Any]] | None = None
    """With a `score_attribute`: the kept checkpoint scoring highest and its report's metrics."""


def fit(
    entry: Entry,
    config: dict[str, Any],
    *,
    name: str,
    storage: Path,
    workers: int,
    use_gpu: bool,
    placement_strategy: str,
    keep_checkpoints: int,
    max_failures: int,
    on_report: Callable[[dict[str, Any]], None] | None = None,
    score_attribute: str | None = None,
) -> Fitted:
    """Runs `entry` on `workers` Ray Train workers (DDP) as the run `name` stored under `storage`, relaying
    each report's rank-0 metrics to `on_report` (from a background thread) as they arrive.

    With `score_attribute` (a metric every checkpoint's report carries, higher is better), Ray Train keeps
    the `keep_checkpoints` best checkpoints by it (and always the latest, which a resume continues from),
    and `Fitted.best` is the best of them, across reruns of the run."""
    import ray  # heavy: ray
    import ray.train
    from ray.train.torch import TorchTrainer

    inbox: Any = ray.remote(num_cpus=0)(_Inbox).remote()
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"entry": entry, "config": config},
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers, use_gpu=use_gpu, placement_strategy=placement_strategy
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=str(storage),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=keep_checkpoints,
                checkpoint_score_attribute=score_attribute,
                checkpoint_score_order="max",
            ),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
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
    by_step = {int(r["step"]): r for r in reports if "step" in r}  # the last report of a step wins
    history = [by_step[s] for s in sorted(by_step)]
    best = None
    if score_attribute is not None:
        scored = [(c, dict(m)) for c, m in (result.best_checkpoints or []) if score_attribute in m]
        if scored:
            best = max(scored, key=lambda pair: pair[1][score_attribute])
    return Fitted(
        checkpoint=result.checkpoint, metrics=dict(result.metrics or {}), history=history, best=best
    )


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
    import ray  # heavy: ray
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
