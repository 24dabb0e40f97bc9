"""Resume policy of a training run: the checks before any worker starts, and the `Checkpointer` that owns
save / keep / resume on every rank.

The `Checkpointer` runs on every rank of a training run, behind the loop's runtime
(`igpt_core.loop.Runtime`): the loop asks it once for the starting step (`load`) and calls `save` every
step; it decides whether a step is due, writes the folder on rank 0 (`igpt_core.checkpoint`, which owns the
folder's format) and hands it to the runtime's `report`. Which checkpoints are kept is the runtime's
business (Ray Train: `CheckpointConfig(num_to_keep)`).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from igpt_core.checkpoint import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    checkpoint_name,
    load_weights,
    read_config,
    read_trainer_state,
    restore,
    write_checkpoint,
)
from igpt_core.config import ModelConfig, TrainConfig, from_dict, to_dict
from igpt_core.data import PretrainError

if TYPE_CHECKING:
    import torch

    from igpt_core.checkpoint import Trained
    from igpt_core.loop import Runtime, Stream

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------- checks


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


def check_start(
    latest: Path | None,
    run: str,
    *,
    model: ModelConfig,
    train: TrainConfig,
    init_from: str | os.PathLike | None,
    palette_digest: str | None,
) -> dict[str, Any] | None:
    """Driver side, before any worker starts: checks that the run's `latest` checkpoint (None for a new
    run) can be resumed, or that `init_from` can warm-start it. Returns the warm start's lineage record
    {"path", "step"}, or None when there is none (a new run from scratch, or a resume: a run with a
    checkpoint of its own resumes that and ignores `init_from`)."""
    if latest is not None:
        check_resumable(latest, model)
        reached = int(read_trainer_state(latest)["step"])
        if reached >= train.steps:
            logger.warning("%s is already at step %d (steps=%d): nothing to train", run, reached, train.steps)
        else:
            logger.info("resuming %s from step %d", run, reached)
        if init_from is not None:
            logger.info("%s has a checkpoint of its own: resuming it, init_from=%s ignored", run, init_from)
        return None
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


# ---------------------------------------------------------------------------------------- checkpointer


@dataclass
class Progress:
    """The loop's own counters, saved with each checkpoint."""

    step: int = 0
    """The last optimizer step taken (counted across reruns and from a warm start's source)."""
    tokens_seen: int = 0


@dataclass(frozen=True)
class Saved:
    """A checkpoint `Checkpointer.save` wrote for `step`; `folder` is None except on rank 0."""

    step: int
    folder: Path | None


class Checkpointer:
    """Save and resume policy of one training run, seen from one rank.

    Every rank calls `load` once and `save` every step. `save` gathers every rank's RNG state and data
    position when a step is due (a collective), then rank 0 writes the folder, which the caller hands to
    `runtime.report` (a barrier every rank reaches); the folder is removed at the next save or `close`.
    """

    def __init__(
        self,
        runtime: Runtime,
        *,
        train: TrainConfig,
        model_config: ModelConfig,
        palette: np.ndarray | None,
        palette_digest: str | None,
        shards: str,
        init_from: dict[str, Any] | None = None,
        continue_steps: bool = True,
        extra: dict[str, Any] | None = None,
    ) -> None:
        self.runtime = runtime
        self.train = train
        self.model_config = model_config
        self.palette = palette
        self.palette_digest = palette_digest
        self.shards = shards
        self.init_from = init_from
        """The warm start's lineage record, written into every checkpoint's config.json."""
        self.continue_steps = continue_steps
        """Whether a warm start continues the source's step count (pretraining) or counts from 0
        (fine-tuning a pretrained checkpoint, whose transformer alone is loaded)."""
        self.extra = extra
        """More config.json keys for every checkpoint (a fine-tuning run's record)."""
        self._state: tuple[Trained, torch.optim.Optimizer, Stream, Progress] | None = None
        self._staged: Path | None = None

    def due(self, step: int, *, last: bool) -> bool:
        """Whether `step` ends with a checkpoint: every `checkpoint_every` steps and at the last step."""
        return step % self.train.checkpoint_every == 0 or last

    def load(
        self, *, model: Trained, optimizer: torch.optim.Optimizer, stream: Stream, progress: Progress
    ) -> int:
        """Restores the run's latest checkpoint into these objects and returns its step; 0 for a new run.

        - the run's own checkpoint (the runtime's latest): weights, optimizer, progress; and this rank's
          data position and RNG when the world size is the one saved. At a new world size a stream that
          can (`load_resharded`) is given every old rank's position and takes its part of what they had not
          taken; any other starts the epoch after the furthest one any rank had begun. The lineage its config.json records is kept, whatever `init_from` was given.
        - else a warm start (`init_from`): its weights (into a classifier's transformer when `model` is
          one) and, when `continue_steps`, its step; optimizer and data start fresh (they belong to the
          source's data).
        - else nothing; a run that restored no RNG seeds each rank apart, so dropout masks differ.

        `model` is the unwrapped module; these objects are also what `save` writes.
        """
        import torch  # heavy: torch

        self._state = (model, optimizer, stream, progress)
        rank, world = self.runtime.rank, self.runtime.world_size
        with self.runtime.latest_checkpoint() as folder:
            if folder is not None:
                check_resumable(folder, self.model_config)
                state = read_trainer_state(folder)
                weights = load_weights(folder)
                self.init_from = read_config(folder).get("init_from")
        if folder is None:
            if self.init_from is not None:
                restore(model, load_weights(self.init_from["path"]), transformer_only=not self.continue_steps)
                progress.step = int(self.init_from["step"] or 0) if self.continue_steps else 0
            torch.manual_seed(self.train.seed + 1 + rank)
            return progress.step
        restore(model, weights)
        optimizer.load_state_dict(state["optimizer"])
        progress.step, progress.tokens_seen = int(state["step"]), int(state.get("tokens_seen", 0))
        if state["world_size"] == world:
            stream.load_state_dict(state["data"][rank])
            rng = state["rng"][rank]
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and self.runtime.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], self.runtime.device)
        elif hasattr(stream, "load_resharded"):  # the stream splits what the old ranks had left
            stream.load_resharded(state["data"], int(state["world_size"]))
            logger.warning(
                "resuming with %d workers instead of %d: the rest of the data epoch is split among them",
                world,
                state["world_size"],
            )
        else:
            stream.load_state_dict({"epoch": 1 + max(int(p["epoch"]) for p in state["data"]), "offset": 0})
            logger.warning(
                "resuming with %d workers instead of %d: starting a new data epoch",
                world,
                state["world_size"],
            )
        return progress.step

    def save(self, step: int, *, last: bool) -> Saved | None:
        """The checkpoint of `step` when it is due (every rank calls this every step), else None."""
        import torch  # heavy: torch

        if not self.due(step, last=last):
            return None
        assert self._state is not None, "Checkpointer.save before load"
        model, optimizer, stream, progress = self._state
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        positions = self.runtime.all_gather(stream.state_dict())
        rngs = self.runtime.all_gather(rng)
        if self.runtime.rank != 0:
            return Saved(step, None)
        self.close()
        trainer_state = {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "schedule": {
                "kind": "warmup_cosine",
                "lr": self.train.lr,
                "warmup_steps": self.train.schedule_warmup_steps,
                "steps": self.train.steps,
                "min_lr_ratio": self.train.min_lr_ratio,
            },
            "world_size": self.runtime.world_size,
            "data": positions,
            "rng": rngs,
            "tokens_seen": progress.tokens_seen,
        }
        name = checkpoint_name(step)
        self._staged = Path(tempfile.mkdtemp(prefix=f"igpt-{name}-")) / name  # its name names it in storage
        write_checkpoint(
            self._staged,
            model=model,
            trainer_state=trainer_state,
            train=self.train,
            palette=self.palette,
            palette_digest=self.palette_digest,
            shards=self.shards,
            init_from=self.init_from,
            extra=self.extra,
        )
        return Saved(step, self._staged)

    def close(self) -> None:
        """Removes the last folder `save` wrote (the runtime's report has stored its copy by then)."""
        if self._staged is not None:
            shutil.rmtree(self._staged.parent, ignore_errors=True)
            self._staged = None
