"""The pretraining checkpoint: its folder format, the one loader, and the checkpointer that owns save / keep /
resume.

A checkpoint folder holds

- `model.safetensors` and `config.json`: the weights and the model config plus `train` (the TrainConfig),
  `palette_digest`, `step`, `shards` and, for a run warm-started from another checkpoint, `init_from`
  ({"path", "step"}); `save_model` writes them, `load_model` reads them (`ImageGPT.save/load` call these);
- `palette.npy`: the palette the tokens were made with (when the run was given one);
- `trainer_state.pt`: everything else a resumed run needs, as plain tensors, numbers, lists and dicts
  (written with `torch.save`, read with `weights_only=True`): optimizer state, schedule, step, every
  rank's torch RNG state and data position.

This module is the only one that names these files and the only reader of a checkpoint folder. The
`Checkpointer` runs on every rank of a training run, behind the loop's runtime (`igpt_core.loop.Runtime`):
the loop asks it once for the starting step (`load`) and calls `save` every step; it decides whether a
step is due, writes the folder on rank 0 and hands it to the runtime's `report`. Which checkpoints are kept
is the runtime's business (Ray Train: `CheckpointConfig(num_to_keep)`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from igpt_core.config import ModelConfig, TrainConfig, from_dict, to_dict
from igpt_core.data import PretrainError
from igpt_core.palette import Palette

if TYPE_CHECKING:
    import torch

    from igpt_core.loop import Runtime, Stream
    from igpt_core.model import ImageGPT

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
PALETTE_FILE = "palette.npy"
STATE_FILE = "trainer_state.pt"
CHECKPOINT_FILES = (WEIGHTS_FILE, CONFIG_FILE, PALETTE_FILE, STATE_FILE)
STATE_FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or does not fit the run resuming from it."""


def checkpoint_name(step: int) -> str:
    """Folder name of the checkpoint at `step` in the run's storage (sorts by step)."""
    return f"checkpoint-{step:08d}"


# ---------------------------------------------------------------------------------------- the folder


def save_model(model: ImageGPT, out_dir: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
    """Writes model.safetensors and config.json (the model config plus `extra` keys) into `out_dir`."""
    from safetensors.torch import save_file  # heavy: torch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = out / (WEIGHTS_FILE + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / WEIGHTS_FILE)  # a reader never sees half a file
    meta = {"model_type": "igpt", **to_dict(model.config), **(extra or {})}
    tmp = out / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, out / CONFIG_FILE)
    return out


def load_model(checkpoint_dir: str | os.PathLike, map_location: str | torch.device = "cpu") -> ImageGPT:
    """The model of a checkpoint folder (unknown config.json keys are ignored), in eval mode."""
    import torch  # heavy: torch
    from safetensors.torch import load_file

    from igpt_core.model import ImageGPT  # cycle: checkpoint -> model (ImageGPT.save/load call back here)

    folder = Path(checkpoint_dir)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"checkpoint_dir: {folder} has no {name}")
    data = read_config(folder)
    if data.get("model_type") == "imagegpt":
        raise ValueError(f"checkpoint_dir: {folder} is a transformers checkpoint; use igpt_core.hf.load_hf")
    config = from_dict(ModelConfig, data)
    state = load_file(str(folder / WEIGHTS_FILE), device=str(torch.device(map_location)))
    with torch.device("meta"):  # skip random init: every tensor is replaced by the loaded one
        model = ImageGPT(config)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        raise ValueError(f"checkpoint_dir: {folder}/{WEIGHTS_FILE} does not fit its config: {err}") from err
    return model.eval()


def load(
    folder: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> tuple[ImageGPT, Palette | None, dict[str, Any]]:
    """(model in eval mode, palette or None when the folder holds none, config.json) of a checkpoint folder."""
    path = Path(folder)
    model = load_model(path, map_location)
    palette = Palette.load(path) if (path / PALETTE_FILE).is_file() else None
    return model, palette, read_config(path)


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
    import torch  # heavy: torch

    out = Path(folder)
    extra: dict[str, Any] = {
        "train": to_dict(train),
        "palette_digest": palette_digest,
        "step": int(trainer_state["step"]),
        "shards": shards,
    }
    if init_from is not None:
        extra["init_from"] = dict(init_from)
    save_model(model, out, extra=extra)
    if palette is not None:
        np.save(out / PALETTE_FILE, np.asarray(palette, dtype=np.float32), allow_pickle=False)
    tmp = out / (STATE_FILE + ".tmp")
    torch.save({"format": STATE_FORMAT, **trainer_state}, tmp)
    os.replace(tmp, out / STATE_FILE)  # a reader never sees half a file
    return out


def read_trainer_state(folder: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict:
    """trainer_state.pt of a checkpoint folder, loaded with `weights_only=True` (no pickle)."""
    import torch  # heavy: torch

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


def load_weights(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """model.safetensors of a checkpoint folder as a state dict (tensors on CPU)."""
    from safetensors.torch import load_file  # heavy: torch

    return load_file(str(Path(folder) / WEIGHTS_FILE), device="cpu")


def publish(checkpoint: Any, out_dir: str | os.PathLike[str]) -> Path:
    """Copies a checkpoint (a folder, or anything with `to_directory` such as a `ray.train.Checkpoint`) into
    `out_dir`, file by file with an atomic rename, so `ImageGPT.load(out_dir)` reads the run's latest weights."""
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
    ) -> None:
        self.runtime = runtime
        self.train = train
        self.model_config = model_config
        self.palette = palette
        self.palette_digest = palette_digest
        self.shards = shards
        self.init_from = init_from
        """The warm start's lineage record, written into every checkpoint's config.json."""
        self._state: tuple[ImageGPT, torch.optim.Optimizer, Stream, Progress] | None = None
        self._staged: Path | None = None

    def due(self, step: int, *, last: bool) -> bool:
        """Whether `step` ends with a checkpoint: every `checkpoint_every` steps and at the last step."""
        return step % self.train.checkpoint_every == 0 or last

    def load(
        self, *, model: ImageGPT, optimizer: torch.optim.Optimizer, stream: Stream, progress: Progress
    ) -> int:
        """Restores the run's latest checkpoint into these objects and returns its step; 0 for a new run.

        - the run's own checkpoint (the runtime's latest): weights, optimizer, progress; and this rank's
          data position and RNG when the world size is the one saved. A new world size splits the samples
          differently, so the saved offsets mean nothing: every rank starts the epoch after the furthest one
          any rank had begun. The lineage its config.json records is kept, whatever `init_from` was given.
        - else a warm start (`init_from`): its weights and step; optimizer and data start fresh (they
          belong to the source's data).
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
                model.load_state_dict(load_weights(self.init_from["path"]))
                progress.step = int(self.init_from["step"] or 0)
            torch.manual_seed(self.train.seed + 1 + rank)
            return progress.step
        model.load_state_dict(weights)
        optimizer.load_state_dict(state["optimizer"])
        progress.step, progress.tokens_seen = int(state["step"]), int(state.get("tokens_seen", 0))
        if state["world_size"] == world:
            stream.load_state_dict(state["data"][rank])
            rng = state["rng"][rank]
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and self.runtime.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], self.runtime.device)
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
                "warmup_steps": self.train.warmup_steps,
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
        )
        return Saved(step, self._staged)

    def close(self) -> None:
        """Removes the last folder `save` wrote (the runtime's report has stored its copy by then)."""
        if self._staged is not None:
            shutil.rmtree(self._staged.parent, ignore_errors=True)
            self._staged = None
