"""The checkpoint folder: its format, the one loader and the one writer (resume policy: `igpt_core.checkpointer`).

A checkpoint folder holds

- `model.safetensors` and `config.json`: the weights and the model config plus `train` (the TrainConfig),
  `palette_digest`, `step`, `shards` and, for a run warm-started from another checkpoint, `init_from`
  ({"path", "step"}); `save_model` writes them, `load_model` reads them (`ImageGPT.save/load` call these);
- for a classifier (`ImageGPTClassifier`), the same files: model.safetensors also holds the head
  `score.weight` (C, n_embd), and config.json a `classifier` section {"n_classes", "head_layer",
  "class_names" (None when the data named no classes)} plus the fine-tuning record; `load_model` of such
  a folder gives its transformer, `load_classifier` the whole classifier;
- `palette.npy`: the palette the tokens were made with (when the run was given one);
- `trainer_state.pt`: everything else a resumed run needs, as plain tensors, numbers, lists and dicts
  (written with `torch.save`, read with `weights_only=True`): optimizer state, schedule, step, every
  rank's torch RNG state and data position.

This module is the only one that names these files and the only reader of a checkpoint folder.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np

from igpt_core.config import ModelConfig, TrainConfig, from_dict, to_dict
from igpt_core.palette import Palette

if TYPE_CHECKING:
    import torch
    from torch import nn

    from igpt_core.classifier import ImageGPTClassifier
    from igpt_core.model import ImageGPT

    Trained: TypeAlias = ImageGPT | ImageGPTClassifier

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
PALETTE_FILE = "palette.npy"
STATE_FILE = "trainer_state.pt"
CHECKPOINT_FILES = (WEIGHTS_FILE, CONFIG_FILE, PALETTE_FILE, STATE_FILE)
STATE_FORMAT = 1
HEAD_WEIGHT = "score.weight"
CLASSIFIER_KEY = "classifier"


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or does not fit the run resuming from it."""


def checkpoint_name(step: int) -> str:
    """Folder name of the checkpoint at `step` in the run's storage (sorts by step)."""
    return f"checkpoint-{step:08d}"


# ---------------------------------------------------------------------------------------- the folder


def _classifier_type() -> type[ImageGPTClassifier]:
    from igpt_core.classifier import ImageGPTClassifier  # heavy: torch

    return ImageGPTClassifier


def file_state(model: Trained) -> dict[str, torch.Tensor]:
    """The tensors model.safetensors holds: the transformer's names, plus `score.weight` for a classifier."""
    if isinstance(model, _classifier_type()):
        return {**model.model.state_dict(), HEAD_WEIGHT: model.score.weight}
    return dict(model.state_dict())


def restore(model: Trained, weights: dict[str, torch.Tensor], *, transformer_only: bool = False) -> None:
    """Loads `weights` (as `file_state` names them) into `model`, strictly; `transformer_only` loads a
    pretraining checkpoint's weights into a classifier's transformer and leaves its head as it is."""
    if isinstance(model, _classifier_type()):
        weights = dict(weights)
        head = weights.pop(HEAD_WEIGHT, None)
        model.model.load_state_dict(weights)
        if transformer_only:
            return
        if head is None:
            raise CheckpointError(f"checkpoint: no {HEAD_WEIGHT}, so not a classifier checkpoint")
        model.score.load_state_dict({"weight": head})
        return
    model.load_state_dict(weights)


def _classifier_meta(model: nn.Module) -> dict[str, Any]:
    if not isinstance(model, _classifier_type()):
        return {}
    section = {"n_classes": model.n_classes, "head_layer": model.head_layer, "class_names": model.class_names}
    return {CLASSIFIER_KEY: section}


def save_model(model: Trained, out_dir: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
    """Writes model.safetensors and config.json (the model config plus `extra` keys) into `out_dir`."""
    from safetensors.torch import save_file  # heavy: torch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in file_state(model).items()}
    tmp = out / (WEIGHTS_FILE + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / WEIGHTS_FILE)  # a reader never sees half a file
    meta = {"model_type": "igpt", **to_dict(model.config), **_classifier_meta(model), **(extra or {})}
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
    state.pop(HEAD_WEIGHT, None)  # a classifier's head: its transformer is a model of its own
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


def load_classifier(
    folder: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> tuple[ImageGPTClassifier, Palette | None, dict[str, Any]]:
    """(classifier in eval mode, palette or None, config.json) of a classifier checkpoint folder."""
    import torch  # heavy: torch
    from safetensors.torch import load_file

    path = Path(folder)
    model, palette, config = load(path, map_location)
    section = config.get(CLASSIFIER_KEY)
    if not isinstance(section, dict):
        raise CheckpointError(
            f"checkpoint: {path} is a pretraining checkpoint, not a classifier (no {CLASSIFIER_KEY!r} in "
            f"{CONFIG_FILE}); fine-tune it first (igpt finetune)"
        )
    head = load_file(str(path / WEIGHTS_FILE), device=str(torch.device(map_location))).get(HEAD_WEIGHT)
    if head is None or tuple(head.shape) != (int(section["n_classes"]), model.config.n_embd):
        shape = None if head is None else tuple(head.shape)
        raise CheckpointError(
            f"checkpoint: {path}/{WEIGHTS_FILE} holds {HEAD_WEIGHT} of shape {shape}, expected "
            f"({section['n_classes']}, {model.config.n_embd})"
        )
    classifier = _classifier_type()(
        model, int(section["n_classes"]), section.get("head_layer"), section.get("class_names")
    )
    with torch.no_grad():
        classifier.score.weight.copy_(head)
    return classifier.eval(), palette, config


def write_checkpoint(
    folder: str | os.PathLike[str],
    *,
    model: Trained,
    trainer_state: dict[str, Any],
    train: TrainConfig,
    palette: np.ndarray | None,
    palette_digest: str | None,
    shards: str,
    init_from: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Writes one checkpoint folder (see the module docstring); `trainer_state` must hold `step`;
    `init_from` ({"path", "step"}) records the checkpoint a warm-started run began from; `extra` adds
    config.json keys (a fine-tuning run's record)."""
    import torch  # heavy: torch

    out = Path(folder)
    meta: dict[str, Any] = {
        "train": to_dict(train),
        "palette_digest": palette_digest,
        "step": int(trainer_state["step"]),
        "shards": shards,
    }
    if init_from is not None:
        meta["init_from"] = dict(init_from)
    save_model(model, out, extra={**meta, **(extra or {})})
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
