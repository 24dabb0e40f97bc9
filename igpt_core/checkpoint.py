"""The pretraining checkpoint: its folder format, and the checkpointer that owns save / keep / resume.

A checkpoint folder holds

- `model.safetensors` and `config.json`: written by `ImageGPT.save`, so `ImageGPT.load(folder)` reads it;
  config.json carries the model config plus `train` (the TrainConfig), `palette_digest`, `step`,
  `shards` and, for a run warm-started from another checkpoint, `init_from` ({"path", "step"});
- `palette.npy`: the palette the tokens were made with (when the run was given one);
- `trainer_state.pt`: everything else a resumed run needs, as plain tensors, numbers, lists and dicts
  (written with `torch.save`, read with `weights_only=True`): optimizer state, schedule, step, every
  rank's torch RNG state and data position.

The `Checkpointer` runs inside a Ray Train worker. The train loop asks it whether a step is due, hands it
the state, and it writes the folder on rank 0 and passes it to `ray.train.report`; Ray Train copies it to
the run's storage and keeps the last `keep_checkpoints` (`CheckpointConfig(num_to_keep)`). On (re)start
it restores from `ray.train.get_checkpoint()`, which is the latest checkpoint of this run name and storage
path, whether the worker group was restarted after a failure or the whole run was started again.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from igpt_core.config import ModelConfig, TrainConfig, from_dict, to_dict

if TYPE_CHECKING:
    import torch

    from igpt_core.model import ImageGPT

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
PALETTE_FILE = "palette.npy"
STATE_FILE = "trainer_state.pt"
CHECKPOINT_FILES = (WEIGHTS_FILE, CONFIG_FILE, PALETTE_FILE, STATE_FILE)
STATE_FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or does not fit the run resuming from it."""


def checkpoint_name(step: int) -> str:
    """Folder name of the checkpoint at `step` in Ray Train's storage (sorts by step)."""
    return f"checkpoint-{step:08d}"


def write_checkpoint(
    folder: str | os.PathLike[str],
    *,
    model: ImageGPT,
    trainer_state: dict[str, Any],
    train: TrainConfig,
    palette: np.ndarray | None,
    palette_digest: str | None,
    shards: str,
    init_from: dict[str, Any] | None = None,
) -> Path:
    """Writes one checkpoint folder (see the module docstring); `trainer_state` must hold `step`;
    `init_from` ({"path", "step"}) records the checkpoint a warm-started run began from."""
    import torch

    out = Path(folder)
    extra: dict[str, Any] = {
        "train": to_dict(train),
        "palette_digest": palette_digest,
        "step": int(trainer_state["step"]),
        "shards": shards,
    }
    if init_from is not None:
        extra["init_from"] = dict(init_from)
    model.save(out, extra=extra)
    if palette is not None:
        np.save(out / PALETTE_FILE, np.asarray(palette, dtype=np.float32), allow_pickle=False)
    tmp = out / (STATE_FILE + ".tmp")
    torch.save({"format": STATE_FORMAT, **trainer_state}, tmp)
    os.replace(tmp, out / STATE_FILE)  # a reader never sees half a file
    return out


def read_trainer_state(folder: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict:
    """trainer_state.pt of a checkpoint folder, loaded with `weights_only=True` (no pickle)."""
    import torch

    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"checkpoint: {folder} has no {STATE_FILE}")
    state = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"checkpoint: {path} is not an igpt trainer state (format {STATE_FORMAT})")
    return state


def read_config(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """config.json of a checkpoint folder."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"checkpoint: {folder} has no {CONFIG_FILE}")
    return json.loads(path.read_text())


def _model_changes(saved: ModelConfig, model: ModelConfig) -> str:
    return "; ".join(
        f"{name}: checkpoint {getattr(saved, name)!r}, now {getattr(model, name)!r}"
        for name in to_dict(model)
        if getattr(saved, name) != getattr(model, name)
    )


def check_resumable(folder: str | os.PathLike[str], model: ModelConfig) -> None:
    """Raises CheckpointError when the checkpoint's model config differs from `model` (a resumed run must
    keep the architecture; train settings such as `steps` may change)."""
    saved = from_dict(ModelConfig, read_config(folder))
    if saved != model:
        raise CheckpointError(
            f"model: the run's checkpoint {folder} was trained with a different model config "
            f"({_model_changes(saved, model)}); use a new out_dir or run_name, or the saved config"
        )


def check_init_from(folder: str | os.PathLike[str], model: ModelConfig) -> dict[str, Any]:
    """Checks that `folder` is a checkpoint whose weights fit `model` and returns the lineage record
    {"path": absolute folder, "step": its step, or None when its config.json has none}.

    Raises CheckpointError naming the folder and every model config field that differs.
    """
    path = Path(folder).expanduser().absolute()
    if not path.is_dir():
        raise CheckpointError(f"init_from: {folder} is not a checkpoint folder")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path / name).is_file():
            raise CheckpointError(f"init_from: {path} has no {name}")
    config = read_config(path)
    try:
        saved = from_dict(ModelConfig, config)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"init_from: {path}/{CONFIG_FILE} is not an igpt model config: {exc}") from exc
    if saved != model:
        raise CheckpointError(
            f"init_from: {path} holds a model with a different config ({_model_changes(saved, model)}); "
            "warm-starting needs the same architecture"
        )
    step = config.get("step")
    return {"path": str(path), "step": None if step is None else int(step)}


def publish(checkpoint: Any, out_dir: str | os.PathLike[str]) -> Path:
    """Copies a checkpoint (a `ray.train.Checkpoint` or a folder) into `out_dir`, file by file with an
    atomic rename, so `ImageGPT.load(out_dir)` reads the run's latest weights."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".publish-", dir=out))
    try:
        if hasattr(checkpoint, "to_directory"):  # a ray.train.Checkpoint (which refuses os.fspath)
            checkpoint.to_directory(str(staging))  # downloads when the storage is remote
            source = staging
        else:
            source = Path(checkpoint)
        for name in CHECKPOINT_FILES:
            if (source / name).is_file():
                if source != staging:
                    shutil.copy2(source / name, staging / name)
                os.replace(staging / name, out / name)
            elif name == PALETTE_FILE:
                (out / name).unlink(missing_ok=True)  # a stale palette would not belong to these weights
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


@dataclass
class Restored:
    """What a worker restores from the run's latest checkpoint."""

    step: int
    state: dict[str, Any]
    """trainer_state.pt as loaded."""
    weights: dict[str, Any]
    """The model's state dict (tensors on CPU)."""


def load_weights(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """model.safetensors of a checkpoint folder as a state dict (tensors on CPU)."""
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / WEIGHTS_FILE), device="cpu")


class Checkpointer:
    """Save / keep / resume policy of one pretraining run, seen from one Ray Train worker.

    Every rank calls `due`, `save` and `restore` at the same steps: `save` gathers every rank's RNG state
    and data position (a collective), then rank 0 writes the folder and every rank reports, because
    `ray.train.report` is a barrier that all workers must reach.
    """

    def __init__(
        self,
        *,
        train: TrainConfig,
        model_config: ModelConfig,
        palette: np.ndarray | None,
        palette_digest: str | None,
        shards: str,
        init_from: dict[str, Any] | None = None,
    ) -> None:
        self.train = train
        self.model_config = model_config
        self.palette = palette
        self.palette_digest = palette_digest
        self.shards = shards
        self.init_from = init_from
        """The warm start's lineage record, written into every checkpoint's config.json."""

    def due(self, step: int) -> bool:
        """Whether `step` ends with a checkpoint: every `checkpoint_every` steps and at the last step."""
        return step % self.train.checkpoint_every == 0 or step == self.train.steps

    def restore(self) -> Restored | None:
        """The latest checkpoint Ray Train holds for this run, or None on a fresh start.

        A resumed run keeps the lineage its own checkpoint records (the warm start it began from, if
        any), whatever `init_from` this invocation was given.
        """
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as folder:
            check_resumable(folder, self.model_config)
            state = read_trainer_state(folder)
            weights = load_weights(folder)
            self.init_from = read_config(folder).get("init_from")
        return Restored(step=int(state["step"]), state=state, weights=weights)

    def save(
        self,
        step: int,
        metrics: dict[str, Any],
        *,
        model: ImageGPT,
        optimizer: torch.optim.Optimizer,
        schedule: dict[str, Any],
        data_position: dict[str, int],
        tokens_seen: int,
    ) -> None:
        """Writes and reports the checkpoint of `step` (all ranks call this; `model` is unwrapped)."""
        import ray.train
        import torch

        context = ray.train.get_context()
        rank, world = context.get_world_rank(), context.get_world_size()
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        positions, rngs = gather_objects(dict(data_position), world), gather_objects(rng, world)
        name = checkpoint_name(step)
        if rank != 0:
            ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=name)
            return
        trainer_state = {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "schedule": schedule,
            "world_size": world,
            "data": positions,
            "rng": rngs,
            "tokens_seen": tokens_seen,
        }
        folder = Path(tempfile.mkdtemp(prefix=f"igpt-{name}-"))
        try:
            write_checkpoint(
                folder,
                model=model,
                trainer_state=trainer_state,
                train=self.train,
                palette=self.palette,
                palette_digest=self.palette_digest,
                shards=self.shards,
                init_from=self.init_from,
            )
            ray.train.report(
                metrics, checkpoint=ray.train.Checkpoint.from_directory(str(folder)), checkpoint_dir_name=name
            )
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def gather_objects(value: Any, world_size: int) -> list[Any]:
    """Every rank's `value`, in rank order (no collective when there is one rank)."""
    if world_size == 1:
        return [value]
    import torch.distributed as dist

    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, value)
    return gathered
